"""An exponential moving average of the trained weights, used for validation, evaluation and export.

    trainer.callbacks: [{class_path: gr.training.ema.EMA, init_args: {decay: 0.999}}]

After every optimizer step: ema <- d * ema + (1 - d) * w for every trainable parameter, with the warmup
d = min(decay, (1 + step) / (10 + step)) so that early averages do not drag in the random init. Validation runs on
the EMA weights (swapped in and back). Checkpoints carry the EMA weights in `state_dict`, so `gr eval`,
`gr rollout`, `GRPolicy`, `init_from` and `gr export` all read the averaged model with no option of their own; the
raw training weights travel in `checkpoint["ema"]["raw"]`, and a resumed run puts them back and continues the same
average (bit-identical to an uninterrupted run).

Parameters sharded by DeepSpeed or FSDP2 are not averaged here: the callback refuses those strategies.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from gr.config import ConfigError


class EMA(Callback):
    """Args:
        decay: the EMA decay (0 < decay < 1); the warmup above caps it early in training.
        validate_with_ema: run validation (metrics, rollout videos) on the EMA weights.
    """

    def __init__(self, decay: float = 0.999, validate_with_ema: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA.decay: must be in (0, 1), got {decay!r}")
        self.decay, self.validate_with_ema = decay, validate_with_ema
        self.shadow: Optional[dict[str, torch.Tensor]] = None
        self.swapped = False  # True while the module holds the EMA weights and `shadow` the raw ones

    @staticmethod
    def _params(pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if "DeepSpeed" in name or "FSDP" in name or "ModelParallel" in name:
            raise ConfigError(f"EMA: the {name} strategy shards the parameters; the EMA callback averages whole "
                              "tensors (single device or DDP)")

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.shadow is None:
            self.shadow = {n: p.detach().clone() for n, p in self._params(pl_module).items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = self.decay_at(trainer.global_step)
        for n, p in self._params(pl_module).items():
            self.shadow[n].lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def swap(self, pl_module) -> None:
        for n, p in self._params(pl_module).items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)
        self.swapped = not self.swapped

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and self.shadow is not None and not self.swapped:
            self.swap(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.swapped:
            self.swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        params = self._params(pl_module)
        ema = {n: p.detach() for n, p in params.items()} if self.swapped else self.shadow
        raw = self.shadow if self.swapped else {n: p.detach() for n, p in params.items()}
        state = checkpoint["state_dict"]
        for n, t in ema.items():
            if n in state:
                state[n] = t.clone()
        checkpoint["ema"] = {"decay": self.decay, "raw": {n: t.clone() for n, t in raw.items()}}

    @torch.no_grad()
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("ema")
        if saved is None:  # a checkpoint from a run without EMA: start the average here
            return
        params = self._params(pl_module)
        missing = sorted(set(params) - set(saved["raw"]))
        if missing:
            raise ValueError(f"EMA: the checkpoint's raw weights lack {missing[0]!r} ({len(missing)} missing)")
        # The module was restored from state_dict, i.e. with the EMA weights: keep those as the average and put
        # the raw training weights back.
        self.shadow = {n: p.detach().clone() for n, p in params.items()}
        self.swapped = False
        for n, p in params.items():
            p.copy_(saved["raw"][n])
