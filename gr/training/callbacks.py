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
    """Append every training step's loss to `<dir>/losses.jsonl`, every logged metric to `<dir>/metrics.jsonl` (each
    `trainer.log_every_n_steps` steps, when Lightning reads them for its loggers anyway, and after each validation),
    and write `<dir>/summary.json` at the end. `gr report` draws its curves from these files.

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
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if trainer.global_step % every == 0:
            self._write_metrics(trainer, trainer.logged_metrics, lambda k: not k.startswith("val/"))

    def _write_metrics(self, trainer, metrics: dict[str, Any], keep) -> None:
        row = {k: float(v) for k, v in metrics.items() if keep(k) and torch.as_tensor(v).numel() == 1}
        if row:
            with open(os.path.join(self._dir(trainer), "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **row}) + "\n")

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
        if trainer.is_global_zero:
            self._write_metrics(trainer, self.val, lambda k: True)

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


HEADLINE_KEYS = ("psnr", "psnr_expected", "psnr_copy_last", "token_acc", "token_acc_copy_last")


def headline_scalars(metrics: dict[str, Any], prefix: str = "val/rollout_") -> dict[str, float]:
    """`val/rollout_<key>` (the mean over horizon steps and views) and, per view, `val/rollout_<key>/<view>`, for the
    HEADLINE_KEYS that `metrics` has."""
    out = {prefix + k: float(sum(metrics[k]) / len(metrics[k])) for k in HEADLINE_KEYS if k in metrics}
    for view, per in metrics.get("per_view", {}).items():
        out.update({f"{prefix}{k}/{view}": float(sum(per[k]) / len(per[k])) for k in HEADLINE_KEYS if k in per})
    return out


class RolloutVideos(L.Callback):
    """Every `every_n_val_epochs` validations, predict the future frame of the first validation batch's samples with
    the KV cache and write ground truth | prediction videos (history frames, then the future frame) to
    `<dirpath>/step<N>/` and, with a WandbLogger, as `val/rollout` videos (offline runs keep them too).

    Each sample carries `gr.rollout.vq_world_metrics` of its future frame, and `headline_scalars` of their mean are
    logged (`val/rollout_psnr`, `val/rollout_token_acc`, ..., per view for robots). Batches of raw frames are judged
    against the raw frames (`reference: "raw"`); pre-tokenized batches have none, so there the VQGAN decodes of the
    true codes stand in for them (`reference: "vqgan_decode"`: the recon ceiling is then exact by construction).

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
        from gr.rollout import mean_metrics

        metrics = mean_metrics([s["metrics"] for s in samples])
        scalars = headline_scalars(metrics)
        # Only rank 0 gets here, so nothing may wait on the other ranks (no sync_dist).
        pl_module.log_dict(scalars, rank_zero_only=True, batch_size=len(samples))
        self.written.append({"step": trainer.global_step, "samples": samples, "metrics": metrics,
                             "scalars": scalars})
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

        from gr.expected_frame import future_code_probs
        from gr.rollout import save_rollout, vq_world_metrics

        n, robot = self.num_samples, getattr(module, "robot_spec", None) is not None
        hist, fut, raw_hist, raw_fut, captions = _rollout_inputs(module, batch, n, robot)
        text, mask = module.text_encoder(list(captions))
        state = batch["state"][:n].to(model.state_proj.weight.dtype) if robot else None
        pred = model.generate_future_frame(text, mask, hist if robot else hist[:, :, 0], state=state)
        probs = future_code_probs(model, text, mask, hist if robot else hist[:, :, 0], pred, state)
        pred, probs = (pred, probs) if robot else (pred[:, None], probs[:, None])  # (B, Nv, h, w[, V])
        raw = raw_hist is not None
        metrics, pred_img = vq_world_metrics(module.image_tokenizer, pred[:, None], fut[:, None], hist[:, -1],
                                             raw_fut[:, None] if raw else None, raw_hist[:, -1] if raw else None,
                                             module.robot_spec.view_names if robot else None, probs[:, None])
        dec = lambda c: module.image_tokenizer.decode(c.to(module.device)).cpu().numpy()  # noqa: E731
        seen = dec(hist)  # (B, Th, Nv, S, S, 3): what the model saw, shown beside its prediction
        # The true row shows what the metrics compare with: raw frames when the batch has them, else decodes.
        true_hist = raw_hist.cpu().numpy() if raw else seen
        true_fut = raw_fut.cpu().numpy() if raw else dec(fut)  # (B, Nv, S, S, 3)
        out_dir = os.path.join(self.dirpath or os.path.join(trainer.default_root_dir, "rollouts"),
                               f"step{trainer.global_step:06d}")
        samples, th = [], hist.shape[1]
        for b in range(len(pred)):
            true = np.concatenate([true_hist[b], true_fut[b][None]])  # history, then the real future frame
            shown = np.concatenate([seen[b], pred_img[b]])  # history, then the predicted one
            samples.append(save_rollout(out_dir, f"sample{b:02d}", true, shown, str(captions[b]),
                                        list(range(th + 1)), 2.0, metrics[b]))
        from gr.rollout import summarize

        summarize(samples, out_dir, {"step": trainer.global_step, "source": "validation"})  # for gr report
        return samples


def _rollout_inputs(module, batch: dict[str, Any], n: int, robot: bool):
    """The first n samples' history (B, Th, Nv, h, w) and future (B, Nv, h, w) codes, their raw frames (None for
    codes-only batches) and captions."""
    if robot:
        raw_hist, raw_fut = batch["history"][:n], batch["future"][:n]
        hist, fut = module.codes({"history": raw_hist, "future": raw_fut})
        raw = raw_hist.dtype == torch.uint8
        return hist, fut, raw_hist if raw else None, raw_fut if raw else None, batch["instruction"][:n]
    if "codes" in batch:
        codes, frames = batch["codes"][:n], None
    else:
        frames = batch["frames"][:n]  # (B, Tc, S, S, 3)
        codes = module.image_tokenizer.encode(frames)
    hist, fut = codes[:, :-1, None], codes[:, -1:]  # one unnamed view
    if frames is None:
        return hist, fut, None, None, batch["caption"][:n]
    return hist, fut, frames[:, :-1, None], frames[:, -1:], batch["caption"][:n]
