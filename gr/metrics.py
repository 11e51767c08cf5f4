"""Image-quality metrics on uint8 frames (..., H, W, 3)."""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: (..., H, W, C) x 2 -> (...). Identical images give +inf."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred.double() - target.double()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(max_value ** 2 / mse)
