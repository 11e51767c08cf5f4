"""Atomic checkpoint writes (temp file in the same folder, fsync, rename) and rebuilding a module from a checkpoint."""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gr.safe_load import load_checkpoint, resolve_class_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """A full disk, a crash or a SIGKILL mid-save leaves either the old checkpoint or the new one, never a truncated
    file: the bytes go to `<path>.tmp-<pid>` (fsynced), which replaces `path` only once complete. Lightning's
    `ckpt_path="last"` considers only `last*.ckpt` files, so a killed save's temp file is never picked; the next
    successful save of the same path removes temp files that dead processes left."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(folder)  # the rename itself survives a power loss
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _remove_stale_temps(path)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        # Our checkpoints hold only tensors and plain containers; anything else is rebuilt inertly (gr.safe_load).
        return load_checkpoint(os.fspath(path), map_location=map_location or "cpu")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: str) -> None:
    """Delete `<path>.tmp-<pid>` files whose writer process is gone (a save killed before its rename)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        except PermissionError:  # alive, another user's process
            pass


def weights_already_in_checkpoint(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters to rebuild a finetuning module from its own checkpoint: `init_from` is not read again (the
    file may have moved since); it is kept as `pretrained_from`, for provenance."""
    if hparams.get("init_from"):
        hparams["pretrained_from"] = hparams.get("pretrained_from") or hparams["init_from"]
        hparams["init_from"] = None
    return hparams


def module_from_checkpoint(path: str, map_location: str = "cpu"):
    """Rebuild a gr LightningModule from its checkpoint (hyper-parameters + weights), running no code from the file:
    a Lightning .ckpt, a DeepSpeed ZeRO folder or a torch.distributed.checkpoint folder (gr.export consolidates them).
    the weights load through gr.safe_load and the class it names must be one of gr's modules."""
    from gr.export import read_training_checkpoint

    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path!r}")
    ckpt = read_training_checkpoint(path)  # a .ckpt file, or a DeepSpeed / DCP folder consolidated on the CPU
    hparams = dict(ckpt.get("hyper_parameters", {}))
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        raise ValueError(f"{path!r}: not a gr checkpoint (hyper_parameters lack _class_path)")
    weights_already_in_checkpoint(hparams)
    module = resolve_class_path(class_path, path)(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
