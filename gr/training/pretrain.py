"""Video pretraining: cross-entropy on the future frame's VQGAN tokens, given a caption and history frames."""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from gr.config import ClipSpec, GRModelConfig, ImageTokenizerConfig, OptimConfig, TextEncoderConfig, as_config
from gr.encoders import FrozenTextEncoder, FrozenVQGAN
from gr.model import GRModel
from gr.training.callbacks import readback_interval
from gr.training.optim import build_optimizer

log = logging.getLogger(__name__)

FROZEN_PREFIXES = ("text_encoder.", "image_tokenizer.")


class PretrainModule(L.LightningModule):
    """Text + history frames -> future frame tokens.

    The frozen encoders are rebuilt from their configs (a local weights path, or architecture + seed for random
    weights): they are never in the optimizer and never in checkpoints.

    Args:
        model: GR model config (trunk, clip spec, text token budget).
        text_encoder: frozen open_clip text tower config.
        image_tokenizer: frozen taming-format VQGAN config.
        optim: AdamW + warmup/cosine config.
        compile: torch.compile each transformer block's training forward (gr.distributed.apply_compile) when the
            Trainer sets the model up. Generation with the KV cache stays eager.
    """

    def __init__(self, model: GRModelConfig, text_encoder: TextEncoderConfig,
                 image_tokenizer: ImageTokenizerConfig, optim: Optional[OptimConfig] = None, compile: bool = False):
        super().__init__()
        model = as_config(GRModelConfig, model, "model")
        text_encoder = as_config(TextEncoderConfig, text_encoder, "text_encoder")
        image_tokenizer = as_config(ImageTokenizerConfig, image_tokenizer, "image_tokenizer")
        optim = as_config(OptimConfig, optim or {}, "optim")
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                                   "model": dataclasses.asdict(model), "text_encoder": dataclasses.asdict(text_encoder),
                                   "image_tokenizer": dataclasses.asdict(image_tokenizer),
                                   "optim": dataclasses.asdict(optim), "compile": bool(compile)})
        self.model_cfg, self.optim_cfg = model, optim
        self.compile_blocks, self._compiled = bool(compile), False
        self.text_encoder = FrozenTextEncoder(text_encoder, max_tokens=model.max_text_tokens)
        self.image_tokenizer = FrozenVQGAN(image_tokenizer)
        grid = self.image_tokenizer.grid_size(model.clip.image_size)
        self.model = GRModel(model, self.image_tokenizer.codebook_size, grid, self.text_encoder.feature_dim)
        self._skipped_total = 0
        self._pending_losses: list[tuple[torch.Tensor, list[str], int]] = []  # see check_finite

    @property
    def clip_spec(self) -> ClipSpec:
        return self.model_cfg.clip

    @property
    def tokens_spec(self) -> dict:
        """What pre-tokenized shards must have been made with: this model's tokenizer at this clip size."""
        return self.image_tokenizer.tokens_spec(self.model_cfg.clip.image_size)

    # ---- checkpoints: frozen encoders are loaded by reference, RNG state travels with the run ----
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith(FROZEN_PREFIXES)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIXES)]
        if strict and (missing or result.unexpected_keys):
            bad = missing[:1] or result.unexpected_keys[:1]
            raise ValueError(f"checkpoint does not fit the model: first bad key {bad[0]!r} "
                             f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_pending_losses()  # never write a checkpoint past a non-finite loss not yet read back
        rng = {"torch": torch.get_rng_state(), "numpy": _np_state_to_tensors(),
               "python": torch.tensor(list(_py_state_ints()), dtype=torch.int64)}
        checkpoint["rng_states"] = rng  # this rank's (rank 0's in the written file)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Every rank draws its own random numbers (CVAE samples, dropout): keep each rank's state. Lightning
            # calls this hook on every rank while building the checkpoint, so the gather is matched.
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rng)
            checkpoint["rng_states_per_rank"] = gathered
        checkpoint["data_skipped_total"] = self._skipped_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied in on_train_start, not here: between the restore and the first step Lightning creates the training
        # DataLoader iterator, which draws its worker base seed from the global torch RNG. The uninterrupted run made
        # that draw at the epoch's start, before the state saved at step N; restoring after it keeps steps N+1...
        # on the uninterrupted run's random numbers (the CVAE's posterior samples, dropout).
        per_rank = checkpoint.get("rng_states_per_rank")
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
            else 0
        self._pending_rng_states = per_rank[rank] if per_rank and rank < len(per_rank) else checkpoint.get("rng_states")
        self._skipped_total = int(checkpoint.get("data_skipped_total", 0))

    def on_train_start(self) -> None:
        rng, self._pending_rng_states = getattr(self, "_pending_rng_states", None), None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            _np_state_from_tensors(rng["numpy"])
            _py_state_from_ints(rng["python"].tolist())

    # ---- steps ----
    def tokenize(self, batch: dict[str, Any]):
        if "codes" in batch:  # pre-tokenized shards: (B, Tc, h, w), Tc = num_history + 1
            codes = batch["codes"]
        else:  # (B, Tc, S, S, 3) uint8 -> (B, Tc, h, w)
            codes = self.image_tokenizer.encode(batch["frames"])
        text, text_mask = self.text_encoder(batch["caption"])
        return codes[:, :-1], codes[:, -1], text, text_mask

    def _loss(self, batch: dict[str, Any]):
        history, future, text, text_mask = self.tokenize(batch)
        logits = self.model(text, text_mask, history, future)  # (B, n, V)
        return frame_cross_entropy(logits, future), logits, future.reshape(future.shape[0], -1)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss, _, _ = self._loss(batch)
        self.check_finite(loss, batch["key"])
        self._skipped_total += int(batch["num_skipped"])
        bs = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("data/skipped_total", float(self._skipped_total), batch_size=bs)
        return loss

    def check_finite(self, loss: torch.Tensor, keys: list[str]) -> None:
        """Stop the run on a non-finite training loss, naming the batch's sample keys.

        On an accelerator the check is batched: losses are collected on the device and read back once every
        `trainer.log_every_n_steps` steps, because reading one per step (`.item()`, `bool()`) is a host sync that
        stalls the kernel queue. A bad step is then reported up to that many steps late, still by its keys.
        """
        self._pending_losses.append((loss.detach().float(), list(keys), self.global_step))
        if len(self._pending_losses) >= readback_interval(self._trainer, loss):
            self._check_pending_losses()

    def _check_pending_losses(self) -> None:
        """Read back the collected losses (one host sync) and raise on the first non-finite one."""
        if not self._pending_losses:
            return
        pending, self._pending_losses = self._pending_losses, []
        values = torch.stack([v for v, _, _ in pending]).cpu()  # the one host sync
        for value, (_, batch_keys, step) in zip(values.tolist(), pending):
            if not np.isfinite(value):
                raise FloatingPointError(f"non-finite training loss {value} at step {step}; batch keys: {batch_keys}")

    def on_train_end(self) -> None:
        self._check_pending_losses()

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        loss, logits, target = self._loss(batch)
        acc = (logits.argmax(-1) == target).float().mean()
        bs = len(batch["caption"])
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/token_acc", acc, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def configure_model(self) -> None:
        """Lightning calls this once the strategy is set up; strategies shard afterwards (FSDP2Strategy)."""
        if self.compile_blocks and not self._compiled:
            from gr.distributed import apply_compile

            log.info("torch.compile: %d transformer blocks", apply_compile(self.model))
            self._compiled = True

    def configure_optimizers(self):
        total = self.optim_cfg.total_steps or self.trainer.max_steps
        if total is None or total <= 0:
            est = self.trainer.estimated_stepping_batches
            if not np.isfinite(est):
                raise ValueError("optim.total_steps: set it or trainer.max_steps (streaming data has no length)")
            total = int(est)
        from gr.distributed import optimizer_class

        opt, sched = build_optimizer(self.model, self.optim_cfg, total, optimizer_class(self.trainer.strategy))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def frame_cross_entropy(logits: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of future-frame logits (B, n, V) against the codes (B, h, w), computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), future.reshape(-1))


def _np_state_to_tensors() -> dict[str, torch.Tensor]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)),
            "rest": torch.tensor([pos, has_gauss], dtype=torch.int64), "cached": torch.tensor(cached)}


def _np_state_from_tensors(s: dict[str, torch.Tensor]) -> None:
    pos, has_gauss = s["rest"].tolist()
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), pos, has_gauss, float(s["cached"])))


def _py_state_ints() -> list[int]:
    version, internal, gauss = random.getstate()
    return [version, *internal, 0 if gauss is None else 1]


def _py_state_from_ints(vals: list[int]) -> None:
    version, internal = vals[0], tuple(vals[1:-1])
    random.setstate((version, internal, None))
