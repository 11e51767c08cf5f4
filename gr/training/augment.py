"""Random-shift augmentation of robot windows during finetuning (the DrQ-style shift ACT, Diffusion Policy and Octo
use), `augment: {pixel_shift, code_shift}` of FinetuneModule; training steps only, never validation or the policy.

Each sample's view gets one random translation, applied alike to its history frames and its future frame, so the
scene moves as a whole: the policy sees shifted observations and the frame loss still predicts a consistent future.
The draws come from torch's global RNG, which checkpoints carry, so a resumed run draws the same shifts.

- `pixel_shift: p` (frames shards, tokenized on the fly): pad every frame by p pixels (edge replicated) and crop back
  at a random offset in [0, 2p] per axis, before the VQGAN sees it. This is the standard augmentation.
- `code_shift: c` (pre-tokenized shards): translate the code grid by up to c cells per axis with edge replication. A
  cell is image_size / grid pixels (8 px at the demo's 64 px / 8x8), so this is far coarser than a pixel shift; it
  is what pre-tokenized data allows without tokenizing every step (which would give up what pre-tokenizing saves).
  To get pixel-level shifts on pre-tokenized data, pre-tokenize from frames shards instead and train on frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gr.config import ConfigError


@dataclass
class AugmentConfig:
    pixel_shift: int = 0  # frames shards: max shift in pixels (DrQ: 4 at 84 px)
    code_shift: int = 0  # pre-tokenized shards: max shift in code cells

    def __post_init__(self) -> None:
        for name in ("pixel_shift", "code_shift"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ConfigError(f"augment.{name}: must be an int >= 0, got {v!r}")


def _offsets(b: int, nv: int, max_shift: int, device) -> torch.Tensor:
    """(B, Nv, 2) integer shifts in [-max_shift, max_shift] (dy, dx)."""
    return torch.randint(-max_shift, max_shift + 1, (b, nv, 2), device=device)


def _shift_grid(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """x (B, T, Nv, H, W, ...) and shifts (B, Nv, 2) -> x translated by the shifts, edges replicated: the output at
    (i, j) reads the input at (clamp(i - dy), clamp(j - dx))."""
    b, _, nv, h, w = x.shape[:5]
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (ar_h[None, None] - shifts[..., :1]).clamp(0, h - 1)  # (B, Nv, H)
    cols = (ar_w[None, None] - shifts[..., 1:]).clamp(0, w - 1)  # (B, Nv, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    vi = torch.arange(nv, device=x.device)[None, :, None, None]
    # advanced indexing over (B, Nv, H, W) with time (and channels) moved behind
    out = x.permute(0, 2, 3, 4, 1, *range(5, x.dim()))  # (B, Nv, H, W, T, ...)
    out = out[bi, vi, rows[:, :, :, None], cols[:, :, None, :]]  # (B, Nv, H, W, T, ...)
    return out.permute(0, 4, 1, 2, 3, *range(5, x.dim()))


def shift_window(history: torch.Tensor, future: torch.Tensor, max_shift: int, pixels: bool):
    """One random shift per (sample, view), applied to history (B, Th, Nv, ...) and future (B, Nv, ...) alike.

    pixels: frames (..., S, S, 3) uint8 -> pad-and-crop shift; else codes (..., h, w) -> grid shift. Both are the
    same translation with replicated edges."""
    if max_shift <= 0:
        return history, future
    shifts = _offsets(history.shape[0], history.shape[2], max_shift, history.device)
    both = torch.cat([history, future[:, None]], dim=1)  # (B, Th + 1, Nv, ...)
    if pixels and both.dim() != 6:
        raise ValueError(f"augment.pixel_shift: frames must be (B, T, Nv, S, S, 3), got {tuple(both.shape)}")
    out = _shift_grid(both, shifts)
    return out[:, :-1], out[:, -1]
