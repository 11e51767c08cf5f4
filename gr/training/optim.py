"""AdamW parameter groups (no decay on norms, biases, embeddings) and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from gr.config import OptimConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: decay only Linear/Conv weights; skip norms, biases and embeddings."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix_weight = name == "weight" and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
            (decay if is_matrix_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, cfg: OptimConfig, total_steps: int, optimizer_cls: type = torch.optim.AdamW):
    """AdamW over `param_groups` and the warmup + cosine LambdaLR. `optimizer_cls` swaps in another AdamW
    implementation (DeepSpeed's CPU Adam under ZeRO-Offload, see gr.distributed.optimizer_class)."""
    extra = {"fused": torch.cuda.is_available() or None} if optimizer_cls is torch.optim.AdamW else {}
    opt = optimizer_cls(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    return opt, sched
