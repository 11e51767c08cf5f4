"""A test callback: every rank appends its own training loss per step to `<default_root_dir>/rank_losses/rank<r>.jsonl`
(RunSummary keeps rank 0's only). Used by tests/test_resume_dist.py to compare every rank of a resumed DDP run."""

from __future__ import annotations

import json
import os

import lightning as L


class RankLosses(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        folder = os.path.join(trainer.default_root_dir, "rank_losses")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(loss), "keys": list(batch["key"])}) + "\n")
