"""Training callbacks: a per-step loss log and a run summary that the demo and tests read."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

import lightning as L
import torch

log = logging.getLogger(__name__)


def readback_interval(trainer: Optional[L.Trainer], value: torch.Tensor) -> int:
    """How many steps' device values to collect before reading them back. Reading a device tensor is a host sync
    that stalls the kernel queue, so on accelerators values are read once per `trainer.log_every_n_steps`; on the
    CPU reading costs nothing, so every step."""
    if value.device.type == "cpu" or trainer is None:
        return 1
    return max(1, int(trainer.log_every_n_steps or 1))


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
        self._pending: list[tuple[int, Any]] = []  # (step, loss on the device) not yet written

    def _dir(self, trainer: L.Trainer) -> str:
        path = self.dirpath or os.path.join(trainer.default_root_dir, "summary")
        os.makedirs(path, exist_ok=True)
        return path

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or outputs is None:
            return
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        self._pending.append((trainer.global_step, loss))
        if len(self._pending) >= readback_interval(trainer, loss):
            self._write_losses(trainer)

    def _write_losses(self, trainer) -> None:
        if not self._pending:
            return
        steps, losses = zip(*self._pending)
        self._pending = []
        values = torch.stack(losses).float().cpu().tolist()  # one host sync for the interval
        self.first_loss = values[0] if self.first_loss is None else self.first_loss
        self.last_loss = values[-1]
        with open(os.path.join(self._dir(trainer), "losses.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": s, "loss": v}) + "\n" for s, v in zip(steps, values))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            self._write_losses(trainer)  # the log on disk covers every step the checkpoint has

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self._write_losses(trainer)
        ckpt = trainer.checkpoint_callback
        summary = {
            "global_step": trainer.global_step, "first_train_loss": self.first_loss, "last_train_loss": self.last_loss,
            **self.val, "train_seconds": round(time.time() - self._t0, 2),
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or getattr(ckpt, "best_model_path", None),
            "skipped_samples": float(trainer.callback_metrics.get("data/skipped_total", 0.0)),
        }
        with open(os.path.join(self._dir(trainer), "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)


class RolloutVideos(L.Callback):
    """Every `every_n_val_epochs` validations, predict the future frame of the first validation batch's samples with
    the KV cache and write ground truth | prediction videos (history frames, then the future frame) to
    `<dirpath>/step<N>/` and, with a WandbLogger, as `val/rollout` videos (offline runs keep them too).

    Args:
        every_n_val_epochs: how often (in validation runs) to write videos.
        num_samples: samples of the first validation batch to roll out.
        dirpath: output folder; default `<default_root_dir>/rollouts`.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_samples: int = 2, dirpath: Optional[str] = None):
        super().__init__()
        if every_n_val_epochs < 1 or num_samples < 1:
            raise ValueError("RolloutVideos: every_n_val_epochs and num_samples must be >= 1")
        self.every, self.num_samples, self.dirpath = every_n_val_epochs, num_samples, dirpath
        self._batch: Any = None
        self._count = 0
        self._warned = False
        self.written: list[dict[str, Any]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = batch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._count += 1  # counted alike on every rank, whatever batches each saw
        if self._count % self.every:
            return
        model = self._inference_model(pl_module)  # a collective under FSDP2: every rank takes part
        if model is None or not trainer.is_global_zero or self._batch is None:
            return
        with torch.no_grad():
            samples = self._rollout(pl_module, model, self._batch, trainer)
        self.written.append({"step": trainer.global_step, "samples": samples})
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_video("val/rollout", [s["gif"] for s in samples], step=trainer.global_step,
                                 caption=[s["caption"] for s in samples])

    def _inference_model(self, module):
        """The GR model to generate with on rank 0: the module's own, or a whole copy when it is sharded.

        Rank 0 generating alone must not touch sharded weights: FSDP2 and ZeRO-3 gather them with collectives the
        other ranks would never join. Under FSDP2 every rank gathers the full state dict and rank 0 loads it into a
        plain copy. ZeRO-3 also partitions the frozen encoders, so rollouts are skipped there (use `gr rollout` on
        the consolidated checkpoint).
        """
        from gr.distributed import full_state_dict, sharding_kind

        kind = sharding_kind(module.model)
        if kind is None:
            return module.model
        if kind == "zero3":
            if not self._warned:
                log.warning("RolloutVideos: skipped under DeepSpeed ZeRO-3 (sharded weights, encoders included); "
                            "run `gr rollout` on a consolidated checkpoint instead")
                self._warned = True
            return None
        state = full_state_dict(module.model)
        if not module.trainer.is_global_zero:
            return None
        src = module.model
        from gr.model import GRModel

        copy = GRModel(src.cfg, src.codebook_size, src.grid_size, module.text_encoder.feature_dim)
        copy.load_state_dict(state)
        return copy.to(module.device).eval()

    def _rollout(self, module, model, batch, trainer) -> list[dict[str, Any]]:
        import numpy as np

        from gr.rollout import save_rollout

        n = self.num_samples
        robot = getattr(module, "robot_spec", None) is not None
        if robot:
            hist, fut = module.codes({k: v[:n] for k, v in batch.items() if k in ("history", "future")})
            captions = batch["instruction"][:n]
        else:
            codes = batch["codes"][:n] if "codes" in batch else module.image_tokenizer.encode(batch["frames"][:n])
            hist, fut = codes[:, :-1, None], codes[:, -1:]  # one unnamed view
            captions = batch["caption"][:n]
        text, mask = module.text_encoder(list(captions))
        state = batch["state"][:n].to(model.state_proj.weight.dtype) if robot else None
        pred = model.generate_future_frame(text, mask, hist if robot else hist[:, :, 0], state=state)
        pred = pred if robot else pred[:, None]
        dec = lambda c: module.image_tokenizer.decode(c.to(module.device)).cpu().numpy()  # noqa: E731
        hist_img, true_img, pred_img = dec(hist), dec(fut), dec(pred)  # (B, Th, Nv, ...), (B, Nv, ...) x 2
        out_dir = os.path.join(self.dirpath or os.path.join(trainer.default_root_dir, "rollouts"),
                               f"step{trainer.global_step:06d}")
        samples = []
        th = hist_img.shape[1]
        for b in range(hist_img.shape[0]):
            true = np.concatenate([hist_img[b], true_img[b][None]])  # history, then the real future frame
            shown = np.concatenate([hist_img[b], pred_img[b][None]])  # history, then the predicted one
            samples.append(save_rollout(out_dir, f"sample{b:02d}", true, shown, hist_img[b, -1], str(captions[b]),
                                        list(range(th + 1)), fps=2.0))
        return samples
