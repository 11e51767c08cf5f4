"""Image-quality metrics on uint8 frames (..., H, W, 3), token accuracy on code grids (..., h, w), and the world-model
metrics that combine them.

Legend: B samples, N horizon steps, Nv views, S frame side, h/w code grid.
"""

from __future__ import annotations

from typing import Any, Optional

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



PSNR_CAP = 100.0  # identical frames give +inf PSNR; capped so that averages stay finite


def token_accuracy(codes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of equal codes per frame: (..., h, w) x 2 -> (...)."""
    if codes.shape != target.shape:
        raise ValueError(f"token_accuracy: shapes differ, {tuple(codes.shape)} vs {tuple(target.shape)}")
    return (codes == target).flatten(-2).double().mean(-1)


def _expand_steps(x, like: torch.Tensor) -> torch.Tensor:
    """A last-seen frame or code grid without a step axis (imagination sees one for all steps) -> like's shape."""
    x = torch.as_tensor(x)
    return x[:, None].expand_as(like) if x.dim() == like.dim() - 1 else x


def _per_step(x: torch.Tensor) -> list[float]:
    """(B, N, Nv) -> the mean over samples and views per horizon step, N floats."""
    return x.mean(dim=(0, 2)).tolist()


def world_model_metrics(*, true, pred, recon, last, last_vq, true_codes, pred_codes, last_codes,
                        view_names: Optional[list[str]] = None, reference: str = "raw",
                        pred_expected=None) -> dict[str, Any]:
    """Per horizon step, averaged over samples: a frame prediction beside the baselines that a world model which can
    only output VQGAN decodes should be judged by.

    Keys (lists of N floats): `psnr`/`ssim` (prediction vs reference), `*_copy_last` (the last seen frame, raw),
    `*_copy_last_vq` (the last seen frame through the VQGAN), `*_recon` (the VQGAN's reconstruction of the reference:
    the tokenizer's ceiling), `token_acc` (prediction vs true codes), `token_acc_copy_last` (last seen codes vs true
    codes), `token_agree_copy_last` (prediction vs last seen codes: how much the model copies), and with
    `pred_expected` also `*_expected` (the expected-code frame, `gr.expected_frame`); `reference` names what
    the frames are compared with. With `view_names`, `per_view` maps each view to the same keys, and the top-level
    values are the means over views.

    Args:
        true: uint8 reference frames (B, N, Nv, S, S, 3).
        pred: the decoded prediction, same shape.
        recon: decode(encode(true)), same shape.
        last: the last frame the model saw, (B, Nv, S, S, 3) for every step or (B, N, Nv, S, S, 3) per step.
        last_vq: decode(encode(last)), shaped like `last`.
        true_codes: (B, N, Nv, h, w) codes of the true frames.
        pred_codes: (B, N, Nv, h, w) predicted codes.
        last_codes: codes of `last`, (B, Nv, h, w) or (B, N, Nv, h, w).
        view_names: names of the Nv views, for the per-view breakdown; None for none.
        reference: "raw" (true frames) or "vqgan_decode" (decodes of the true codes stand in for them).
        pred_expected: the decoded expected-code prediction, shaped like `pred`, or None.
    """
    true, true_codes = torch.as_tensor(true), torch.as_tensor(true_codes)
    if true.dim() != 6:
        raise ValueError(f"world_model_metrics: true must be (B, N, Nv, S, S, 3), got {tuple(true.shape)}")
    if view_names is not None and len(view_names) != true.shape[2]:
        raise ValueError(f"world_model_metrics: view_names has {len(view_names)} names for {true.shape[2]} views")
    frames = {"": pred, "_copy_last": _expand_steps(last, true), "_copy_last_vq": _expand_steps(last_vq, true),
              "_recon": recon, **({"_expected": pred_expected} if pred_expected is not None else {})}
    per_image = {}  # key -> (B, N, Nv)
    for suffix, x in frames.items():
        x = torch.as_tensor(x)
        per_image[f"psnr{suffix}"] = psnr(x, true).clamp(max=PSNR_CAP)
        per_image[f"ssim{suffix}"] = ssim(x, true)
    pred_codes, last_codes = torch.as_tensor(pred_codes), _expand_steps(last_codes, true_codes)
    per_image["token_acc"] = token_accuracy(pred_codes, true_codes)
    per_image["token_acc_copy_last"] = token_accuracy(last_codes, true_codes)
    per_image["token_agree_copy_last"] = token_accuracy(pred_codes, last_codes)
    out: dict[str, Any] = {"reference": reference, **{k: _per_step(v) for k, v in per_image.items()}}
    if view_names is not None:
        out["per_view"] = {v: {k: _per_step(x[:, :, i:i + 1]) for k, x in per_image.items()}
                           for i, v in enumerate(view_names)}
    return out
