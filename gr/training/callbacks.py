"""Training callbacks: a per-step loss log and a run summary that the demo and tests read."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import lightning as L


class RunSummary(L.Callback):
    """Append every training step's loss to `<dir>/losses.jsonl` and write `<dir>/summary.json` at the end.

    Args:
        dirpath: output folder; default `<trainer.log_dir or default_root_dir>/summary`.
    """

    def __init__(self, dirpath: Optional[str] = None):
        super().__init__()
        self.dirpath = dirpath
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self.val: dict[str, float] = {}
        self._t0 = 0.0

    def _dir(self, trainer: L.Trainer) -> str:
        path = self.dirpath or os.path.join(trainer.default_root_dir, "summary")
        os.makedirs(path, exist_ok=True)
        return path

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or outputs is None:
            return
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        with open(os.path.join(self._dir(trainer), "losses.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": loss}) + "\n")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        summary = {
            "global_step": trainer.global_step, "first_train_loss": self.first_loss, "last_train_loss": self.last_loss,
            **self.val, "train_seconds": round(time.time() - self._t0, 2),
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or getattr(ckpt, "best_model_path", None),
            "skipped_samples": float(trainer.callback_metrics.get("data/skipped_total", 0.0)),
        }
        with open(os.path.join(self._dir(trainer), "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
