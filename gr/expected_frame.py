"""Expected-code frames: a point prediction of the future frame for pixel metrics.

A greedy or sampled code grid commits to one code per position. Where the model is unsure (the wrist camera's next
view, exactly where the arm will be), a wrong code costs more pixel error than a blend of the likely ones, so a model
can rank codes well and still lose to copying the last frame in PSNR. The expected-code frame decodes, at every
position, the probability-weighted mean of the codebook vectors under the model's predictive distribution
(`FrozenVQGAN.decode_expected`). The distributions are taken along the generated codes: one teacher-forced pass over
them gives exactly the distributions the generation chose from (the KV-cache path equals the full pass), so position j
is conditioned on the codes generated before it, as in the greedy frame.

Rollouts report both: `psnr`/`ssim` for the generated codes' decode, `psnr_expected`/`ssim_expected` for this frame.

Legend: B samples, Nv views, h/w code grid, n = h*w, V codebook size.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def future_code_probs(model, text_feats, text_mask, history_codes, codes, state: Optional[torch.Tensor] = None):
    """The model's code distributions along generated codes.

    Args:
        model: a `GRModel`.
        text_feats, text_mask, history_codes, state: the inputs the codes were generated from.
        codes: generated future codes, (B, h, w) for text-video models or (B, Nv, h, w) for robot models.

    Returns:
        float32 probabilities (B, h, w, V), or (B, Nv, h, w, V) for robot models.
    """
    out = model(text_feats, text_mask, history_codes, codes, state)
    logits = out[0] if isinstance(out, tuple) else out  # robot: (B, Nv, n, V); text-video: (B, n, V)
    return logits.float().softmax(-1).reshape(*codes.shape, -1)
