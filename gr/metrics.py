"""Image-quality metrics on uint8 frames (..., H, W, 3)."""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: (..., H, W, C) x 2 -> (...). Identical images give +inf."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred.double() - target.double()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(max_value ** 2 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, max_value: float = 255.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03), averaged
    over channels: (..., H, W, C) x 2 -> (...)."""
    import torch.nn.functional as F

    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    lead, (h, w, c) = pred.shape[:-3], pred.shape[-3:]
    x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2).double()
    y = target.reshape(-1, h, w, c).permute(0, 3, 1, 2).double()
    k = min(window, h, w)
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g.expand(c, 1, k, k)

    def blur(z):
        return F.conv2d(z, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)
