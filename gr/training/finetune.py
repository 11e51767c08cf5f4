"""Robot finetuning: multi-view frames + robot state -> future frames of every view + an action chunk (the head
`model.robot.head.kind` names: cvae, flow, diffusion or tokens; gr/model/heads/).

It is the pretraining module with `model.robot` set: the same frozen encoders, trunk and checkpoint handling, plus
the robot losses, weight transfer from a pretraining checkpoint, freezing, and the dataset's normalization statistics
kept as buffers so that every checkpoint carries them (the policy API reads them back).

Legend: B batch, Th history steps, Nv views, n codes per frame, V codebook size, k chunk, A action dims.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import torch

from gr.config import ConfigError, FinetuneLossConfig, RobotConfig, as_config
from gr.export import FROZEN_PREFIXES, is_export, read_training_checkpoint, stats_from_buffers
from gr.model.lora import LoRAConfig, apply_lora, train_only_adapters
from gr.model.video_mode import video_frame_logits
from gr.training.augment import AugmentConfig, shift_window
from gr.training.pretrain import PretrainModule, frame_cross_entropy

log = logging.getLogger(__name__)

ROBOT_ONLY_PREFIXES = ("view_emb.", "state_proj.", "readout_emb.", "action_head.")


class FinetuneModule(PretrainModule):
    """Finetune a GR model on robot episodes.

    Args:
        model: GR model config with `robot` set (views, state/action sizes, chunk, readouts, head).
        text_encoder: frozen open_clip text tower config (instructions).
        image_tokenizer: frozen taming VQGAN config.
        optim: AdamW + warmup/cosine config.
        loss: weights of the frame, arm, gripper and KL terms.
        init_from: a pretraining checkpoint (Lightning .ckpt of PretrainModule, a DeepSpeed or distributed-checkpoint
            folder of one, or its `gr export` folder): every weight that still fits is
            loaded; which were loaded, new and dropped is logged and kept in `init_report`.
        init_strict: fail when a weight the pretraining model has (trunk, embeddings, heads) is missing or misfits.
        pretrained_from: provenance only, never read: the pretraining checkpoint the weights first came from. A resumed
            run (`--ckpt_path`) gets `init_from: null` and this, since its weights are already in the checkpoint.
        freeze: parameter-name prefixes of `model` to keep frozen (e.g. ["trunk.", "code_emb."]).
        compile: torch.compile each transformer block (see PretrainModule).
        lora: LoRA adapters {rank, alpha, targets, trainable} (gr/model/lora.py). The base weights come from
            `init_from` and stay frozen; the adapters, the new robot parts and `lora.trainable` train. Checkpoints then
            hold only what is not in the base, plus `lora_base`, the base checkpoint's path.
        lora_base: set by LoRA runs in their checkpoints (the base to rebuild from); not set by hand.
        augment: random-shift augmentation of training windows {pixel_shift, code_shift} (gr/training/augment.py).
    """

    def __init__(self, model, text_encoder, image_tokenizer, optim=None, loss: Optional[FinetuneLossConfig] = None,
                 init_from: Optional[str] = None, init_strict: bool = True, freeze: Optional[list[str]] = None,
                 compile: bool = False, pretrained_from: Optional[str] = None, lora: Optional[dict] = None,
                 lora_base: Optional[str] = None, augment: Optional[dict] = None):
        super().__init__(model, text_encoder, image_tokenizer, optim, compile=compile)
        if self.model_cfg.robot is None:
            raise ConfigError("model.robot: finetuning needs the robot parts (view_names, state_dim, action_dim, ...)")
        loss = as_config(FinetuneLossConfig, loss or {}, "loss")
        self.loss_cfg = loss
        self.lora_cfg = as_config(LoRAConfig, lora, "lora") if lora else None
        self.augment_cfg = as_config(AugmentConfig, augment or {}, "augment")
        base = init_from or lora_base
        if self.lora_cfg is not None and not base:
            raise ConfigError("lora: adapters need a base model: set init_from (the pretrained checkpoint whose "
                              "weights stay frozen under the adapters)")
        hp = dict(self.hparams)
        hp.update(_class_path=f"{type(self).__module__}.{type(self).__qualname__}", loss=dataclasses.asdict(loss),
                  init_from=init_from, init_strict=init_strict, freeze=list(freeze or []),
                  pretrained_from=pretrained_from or init_from,
                  lora=dataclasses.asdict(self.lora_cfg) if self.lora_cfg else None,
                  lora_base=base if self.lora_cfg else None, augment=dataclasses.asdict(self.augment_cfg))
        self.save_hyperparameters(hp)
        robot = self.model_cfg.robot
        # Rows: mean, std, min, max. NaN until set from the data (or restored from a checkpoint).
        self.register_buffer("stats_state", torch.full((4, robot.state_dim), float("nan")))
        self.register_buffer("stats_action", torch.full((4, robot.action_dim), float("nan")))
        self.init_report: dict[str, Any] = {}
        if init_from:
            self.init_report = self.load_pretrained(init_from, init_strict)
        elif self.lora_cfg is not None:  # rebuilt from a LoRA checkpoint: the frozen base comes from its own file
            if not os.path.exists(lora_base):
                raise ConfigError(f"lora_base: the base checkpoint {lora_base!r} is missing; a LoRA checkpoint holds "
                                  "only its adapters and robot parts, and needs that file to rebuild the model")
            self.init_report = self.load_pretrained(lora_base, init_strict)
        self.lora_base_keys: set[str] = set()  # frozen base weights: not written to checkpoints in LoRA runs
        if self.lora_cfg is not None:
            self.lora_targets = apply_lora(self.model, self.lora_cfg)
            train_only_adapters(self.model, self.lora_cfg, ROBOT_ONLY_PREFIXES)
        self._freeze(freeze or [])
        if self.lora_cfg is not None:
            loaded = set(self.init_report.get("loaded", []))
            self.lora_base_keys = {n for n, p in self.model.named_parameters() if not p.requires_grad and n in loaded}

    @property
    def robot_spec(self) -> RobotConfig:
        return self.model_cfg.robot

    # ---- normalization statistics travel in the checkpoint ----
    def normalization_stats(self, data_stats: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The statistics this model normalizes with: its own (from a checkpoint), else the data's, which it keeps."""
        if torch.isnan(self.stats_state).any():
            if data_stats is None:
                raise ValueError("this model has no normalization statistics and none were given")
            for name, buf in (("state", self.stats_state), ("action", self.stats_action)):
                rows = [data_stats[name][k] for k in ("mean", "std", "min", "max")]
                if len(rows[0]) != buf.shape[1]:
                    raise ConfigError(f"data stats: {name} has {len(rows[0])} dims, model.robot says {buf.shape[1]}")
                buf.copy_(torch.tensor(rows, dtype=buf.dtype))
            self.model.action_head.set_statistics(self.stats_action)
        return stats_from_buffers(self.stats_state, self.stats_action)

    # ---- transfer from pretraining ----
    def load_pretrained(self, path: str, strict: bool = True) -> dict[str, Any]:
        """Load every fitting `model.*` weight of a pretraining checkpoint; report loaded / new / dropped."""
        if not os.path.exists(path):
            raise ConfigError(f"init_from: file not found: {path!r}")
        if is_export(path):  # a `gr export` folder: its weights, no Lightning state
            from safetensors.torch import load_file

            ckpt = {"state_dict": load_file(os.path.join(path, "model.safetensors"))}
        else:  # a .ckpt, or a DeepSpeed / distributed-checkpoint folder consolidated on the CPU
            try:
                ckpt = read_training_checkpoint(path)
            except ValueError as exc:
                raise ConfigError(f"init_from: {exc}") from None
        found = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
        if not found:
            raise ConfigError(f"init_from: {path!r} has no `model.*` weights (not a gr pretraining checkpoint?)")
        own = self.model.state_dict()
        fits = {k: v for k, v in found.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        new = sorted(k for k in own if k not in fits)
        missing = [k for k in new if not k.startswith(ROBOT_ONLY_PREFIXES)]
        dropped = sorted(k for k in found if k not in fits)
        if missing and strict:
            k = missing[0]
            why = f"shape {tuple(found[k].shape)} vs {tuple(own[k].shape)}" if k in found else "absent"
            raise ConfigError(f"init_from: {path!r}: required weight {k!r} does not fit ({why}); {len(missing)} such "
                              "weights. Set init_strict: false to start those from scratch")
        self.model.load_state_dict(fits, strict=False)
        report = {"loaded": sorted(fits), "new": new, "dropped": dropped, "missing_required": missing}
        from lightning.pytorch.utilities import rank_zero_info  # shown by default, unlike this module's logger

        rank_zero_info(f"init_from {path}: loaded {len(fits)} tensors, {len(new)} new (robot parts: "
                       f"{sorted({k.split('.')[0] for k in new})}), {len(dropped)} dropped from the checkpoint"
                       + (f": {dropped[:5]}" if dropped else ""))
        return report

    # ---- LoRA: checkpoints without the frozen base ----
    def state_dict(self, *args, **kwargs):
        """In LoRA runs, without the frozen base weights (rebuilt from `lora_base`)."""
        sd = super().state_dict(*args, **kwargs)
        if self.lora_base_keys:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for name in self.lora_base_keys:
                sd.pop(f"{prefix}model.{name}", None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.lora_base_keys:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys
                   if not k.startswith(FROZEN_PREFIXES) and k[len("model."):] not in self.lora_base_keys]
        if strict and (missing or result.unexpected_keys):
            bad = missing[:1] or result.unexpected_keys[:1]
            raise ValueError(f"LoRA checkpoint does not fit the model: first bad key {bad[0]!r} "
                             f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
        return result

    def _freeze(self, prefixes: list[str]) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        for prefix in prefixes:
            hit = [n for n in names if n.startswith(prefix)]
            if not hit:
                raise ConfigError(f"freeze: prefix {prefix!r} matches no parameter of the model")
            for n, p in self.model.named_parameters():
                if n.startswith(prefix):
                    p.requires_grad_(False)
        if prefixes:
            log.info("frozen: %d of %d parameter tensors", sum(not p.requires_grad for p in self.model.parameters()),
                     len(names))

    # ---- steps ----
    def codes(self, batch: dict[str, Any]):
        """History (B, Th, Nv, h, w) and future (B, Nv, h, w) codes, from frames or pre-tokenized codes."""
        hist, fut = batch["history"], batch["future"]
        aug = self.augment_cfg
        if hist.dtype == torch.uint8:  # frames (..., S, S, 3)
            if self.training:
                hist, fut = shift_window(hist, fut, aug.pixel_shift, pixels=True)
            hist, fut = self.image_tokenizer.encode(hist), self.image_tokenizer.encode(fut)
        elif self.training:
            hist, fut = shift_window(hist, fut, aug.code_shift, pixels=False)
        return hist, fut

    def state_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The normalized state in the model's dtype (fp32, or bf16 under DeepSpeed's bf16 weights)."""
        return batch["state"].to(self.model.state_proj.weight.dtype)

    def robot_losses(self, batch: dict[str, Any], sample_latent: bool = True) -> dict[str, torch.Tensor]:
        hist, fut = self.codes(batch)
        text, text_mask = self.text_encoder(batch["instruction"])
        logits, readouts = self.model(text, text_mask, hist, fut, state=self.state_input(batch))
        frame_ce = frame_cross_entropy(logits, fut)
        out = self.model.action_head.losses(readouts, batch, self.loss_cfg, sample=sample_latent)
        out["frame_ce"] = frame_ce
        out["token_acc"] = (logits.argmax(-1) == fut.reshape(*logits.shape[:-1])).float().mean().detach()
        out["loss"] = self.loss_cfg.frame_weight * frame_ce + out.pop("action_loss")
        return out

    def cotrain_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """A text-video batch of video co-training (data.cotrain): the frame loss only, through the one-view layout."""
        history, future, text, text_mask = self.tokenize(batch)
        logits = video_frame_logits(self.model, text, text_mask, history, future, int(batch["view"]))
        frame_ce = frame_cross_entropy(logits, future)
        loss = self.loss_cfg.frame_weight * frame_ce
        self.check_finite(loss, batch["key"])
        self._skipped_total += int(batch["num_skipped"])
        bs = len(batch["caption"])
        acc = (logits.argmax(-1) == future.reshape(future.shape[0], -1)).float().mean()
        self.log_dict({"train/cotrain/loss": loss.detach(), "train/cotrain/frame_ce": frame_ce.detach(),
                       "train/cotrain/token_acc": acc.detach()}, batch_size=bs)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if "caption" in batch:  # a video co-training batch
            return self.cotrain_step(batch)
        out = self.robot_losses(batch)
        self.check_finite(out["loss"], batch["key"])
        self._skipped_total += int(batch["num_skipped"])
        bs = len(batch["instruction"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=bs)
        self.log("data/skipped_total", float(self._skipped_total), batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        out = self.robot_losses(batch, sample_latent=False)
        # What the policy does at test time (CVAE: the prior mean latent; flow / diffusion: a fixed seed).
        hist, _ = self.codes(batch)
        text, text_mask = self.text_encoder(batch["instruction"])
        readouts = self.model.readout_features(text, text_mask, hist, self.state_input(batch))
        arm, _ = self.model.action_head.predict(readouts, torch.Generator(readouts.device).manual_seed(batch_idx))
        m = batch["action_mask"][..., None].float()
        prior_l1 = ((arm.float() - batch["arm"]).abs() * m).sum() / (m.sum() * arm.shape[-1]).clamp(min=1)
        bs = len(batch["instruction"])
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/arm_l1_prior", prior_l1, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in out.items() if k != "loss"}, batch_size=bs, sync_dist=True)
        return out["loss"]

