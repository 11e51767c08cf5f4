"""A robot GR model run on a text-video clip: the pretraining layout with one camera view, no state and no readouts.

    [text] [o_0^v] .. [o_{Th-1}^v] [BOS, f_0 .. f_{n-2}]^v      (v: the camera the clip stands in for)

Video co-training during finetuning (`data.cotrain`) feeds text-video batches through this path: they train the
trunk and the frame head on the frame loss alone, as in pretraining, with the view embedding of camera v (and the
copy path from the clip's last frame when the model has one). Robot batches use `GRModel.forward` as always.
"""

from __future__ import annotations

import torch

from gr.model.gr_model import GRModel


def video_frame_logits(model: GRModel, text_feats: torch.Tensor, text_mask: torch.Tensor, history: torch.Tensor,
                       future: torch.Tensor, view: int) -> torch.Tensor:
    """history (B, Th, h, w), future (B, h, w) codes of one clip -> teacher-forced logits (B, n, V)."""
    if model.robot is None:
        raise ValueError("video_frame_logits is for robot models; a pretraining model takes clips in forward()")
    b, th = history.shape[:2]
    if th != model.num_history or tuple(history.shape[2:]) != (model.grid_size, model.grid_size):
        raise ValueError(f"co-training clip codes {tuple(history.shape)} do not fit the model: (B, "
                         f"{model.num_history}, {model.grid_size}, {model.grid_size}) expected")
    if not 0 <= view < model.num_views:
        raise ValueError(f"co-training view index {view} is not one of the model's {model.num_views} views")
    text, valid = model.embed_text(text_feats, text_mask)
    frames = [model.embed_frame(history[:, tau].reshape(b, -1), tau, view=view) for tau in range(th)]
    as_views = history.new_zeros(b, th, model.num_views, *history.shape[2:])  # embed_future reads view `view`
    as_views[:, :, view] = history
    fut = model.embed_future(model.shifted_future(future), 0, view, as_views)
    x = torch.cat([text, *frames, fut], dim=1)
    n = model.tokens_per_frame
    h = model.trunk(x, torch.cat([valid, valid.new_ones(b, x.shape[1] - valid.shape[1])], dim=1), num_outputs=n)
    return model.frame_head(h)
