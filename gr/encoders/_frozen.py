"""Shared helpers for frozen encoders and for reading weight files with clear errors."""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from typing import Iterator

import torch
from torch import nn

from gr.safe_load import load_checkpoint


class FrozenMixin(nn.Module):
    """A module that never trains: parameters have requires_grad=False and `.train()` keeps it in eval mode."""

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D401 - keep eval() whatever the caller asks
        return super().train(False)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with a fixed torch seed without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def read_state_dict(path: str, field: str) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file; unwrap {"state_dict": ...} (Lightning/taming .ckpt).
    Torch files load through gr.safe_load: a public taming .ckpt's pickled Lightning objects become inert placeholders
    and no code from the file runs.

    Args:
        path: local file.
        field: config field that named the file, for error messages.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: checkpoint file not found: {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = load_checkpoint(path)
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(field):
            raise
        raise ValueError(f"{field}: cannot read checkpoint {path!r} (corrupt or not a weights file): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{field}: {path!r} does not hold a state dict of tensors")
    return obj


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: str, field: str) -> None:
    """Raise a ValueError naming the file and the first missing, unexpected or mis-shaped key."""
    for key, ref in expected.items():
        if key not in found:
            raise ValueError(f"{field}: {path!r} is missing key {key!r}")
        if tuple(found[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{field}: {path!r} key {key!r} has shape {tuple(found[key].shape)}, model expects {tuple(ref.shape)}"
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise ValueError(f"{field}: {path!r} has unexpected key {extra[0]!r} ({len(extra)} unexpected in all)")
