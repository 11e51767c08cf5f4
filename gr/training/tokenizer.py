"""VQGAN tokenizer training on Lightning 2: taming's modules and checkpoint layout, manual optimization.

Why not taming's own `VQModel`: it cannot be imported with current Lightning, and it relies on two optimizers with
`optimizer_idx`, which Lightning 2 removed. This module keeps taming's Encoder/Decoder/VectorQuantizer2, its
NLayerDiscriminator and hinge loss, and writes taming-format `.ckpt` + yaml (`ExportTamingVQGAN`), so the result loads
in taming and in `gr.encoders.FrozenVQGAN` unchanged.

One training step (one optimizer step, so `trainer.max_steps` counts batches):
  x -> VQGAN -> x_rec, codes
  generator loss = pixel + perceptual + codebook + commitment + [step >= disc_start] lambda * (-D(x_rec))
  discriminator loss = [step >= disc_start] hinge(D(x), D(sg(x_rec)))
The generator loss is back-propagated with the discriminator's parameters frozen, so each loss reaches only its own
parameters, and a single AdamW with two parameter groups (generator lr, discriminator lr) steps both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from taming.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss

from gr.config import CodebookConfig, ConfigError, ImageTokenizerConfig, OptimConfig, TokenizerLossConfig, as_config
from gr.encoders._frozen import seeded
from gr.encoders.vqgan import VQGAN, ddconfig_from, load_taming_vqgan, save_taming_vqgan
from gr.metrics import psnr
from gr.training.optim import warmup_cosine

log = logging.getLogger(__name__)

TOKENIZER_OPTIM_DEFAULTS = dict(lr=1e-4, weight_decay=0.0, betas=(0.5, 0.9), warmup_steps=0, min_lr_ratio=1.0)


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def output_to_frames(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) roughly in [-1, 1] -> uint8 (B, H, W, 3), exactly as FrozenVQGAN.decode rounds."""
    return ((x.detach().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class TokenizerModule(L.LightningModule):
    """Train or finetune a taming-format VQGAN.

    Args:
        tokenizer: architecture and, for finetuning, `checkpoint` + `yaml` of a taming VQGAN to start from (its
            discriminator is restored too when the checkpoint has `loss.discriminator.*`).
        loss: loss weights, GAN start step, optional local LPIPS weights.
        codebook: usage logging and dead-code restart.
        optim: AdamW for generator and discriminator (default lr 1e-4, betas (0.5, 0.9), no weight decay).
        image_size: training frame side; default `tokenizer.resolution`.
    """

    def __init__(self, tokenizer: ImageTokenizerConfig, loss: Optional[TokenizerLossConfig] = None,
                 codebook: Optional[CodebookConfig] = None, optim: Optional[OptimConfig] = None,
                 image_size: Optional[int] = None):
        super().__init__()
        tokenizer = as_config(ImageTokenizerConfig, tokenizer, "tokenizer")
        loss = as_config(TokenizerLossConfig, loss or {}, "loss")
        codebook = as_config(CodebookConfig, codebook or {}, "codebook")
        optim = as_config(OptimConfig, optim if optim is not None else TOKENIZER_OPTIM_DEFAULTS, "optim")
        self.save_hyperparameters({"_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                                   "tokenizer": dataclasses.asdict(tokenizer), "loss": dataclasses.asdict(loss),
                                   "codebook": dataclasses.asdict(codebook), "optim": dataclasses.asdict(optim),
                                   "image_size": image_size})
        self.automatic_optimization = False
        self.tokenizer_cfg, self.loss_cfg, self.codebook_cfg, self.optim_cfg = tokenizer, loss, codebook, optim
        self.vqgan, loss_state = self._build_vqgan(tokenizer)
        self.image_size = image_size or self.vqgan.ddconfig["resolution"]
        try:
            self.vqgan.check_image_size(self.image_size, self.image_size, "image_size")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        with seeded(tokenizer.random_init_seed + 1):  # reproducible whatever the global seed
            self.discriminator = NLayerDiscriminator(input_nc=3, ndf=loss.disc_ndf, n_layers=loss.disc_num_layers,
                                                     use_actnorm=False).apply(weights_init)
        self._restore_discriminator(loss_state)
        self.perceptual = None
        if loss.lpips_weights:
            from gr.training.perceptual import LocalLPIPS

            self.perceptual = LocalLPIPS(loss.lpips_weights, loss.vgg16_weights)
        n = self.vqgan.n_embed
        self.register_buffer("usage_since_restart", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("usage_since_log", torch.zeros(n, dtype=torch.float64))
        self._skipped_total = 0

    # ---- construction ----
    def _build_vqgan(self, cfg: ImageTokenizerConfig) -> tuple[VQGAN, dict[str, torch.Tensor]]:
        if cfg.checkpoint:  # finetuning: the "web + in-domain" recipe
            yaml_path = cfg.yaml or os.path.splitext(cfg.checkpoint)[0] + ".yaml"
            vq, loss_state = load_taming_vqgan(cfg.checkpoint, yaml_path, return_loss_state=True)
            if vq.n_embed != cfg.codebook_size:
                raise ConfigError(f"tokenizer.codebook_size: config says {cfg.codebook_size} but {cfg.checkpoint!r} "
                                  f"has {vq.n_embed} codes (quantize.embedding.weight)")
            log.info("tokenizer: finetuning from %s (%d codes, downsampling %d)", cfg.checkpoint, vq.n_embed,
                     vq.downsample_factor)
            return vq, loss_state
        with seeded(cfg.random_init_seed):
            return VQGAN(ddconfig_from(cfg), cfg.codebook_size, cfg.embed_dim), {}

    def _restore_discriminator(self, loss_state: dict[str, torch.Tensor]) -> None:
        disc = {k[len("discriminator."):]: v for k, v in loss_state.items() if k.startswith("discriminator.")}
        if not disc:
            if self.tokenizer_cfg.checkpoint:
                log.info("tokenizer: checkpoint has no discriminator weights; the discriminator starts fresh")
            return
        own = self.discriminator.state_dict()
        if set(disc) == set(own) and all(disc[k].shape == own[k].shape for k in own):
            self.discriminator.load_state_dict(disc)
            log.info("tokenizer: restored the discriminator from the checkpoint (%d tensors)", len(disc))
        else:
            log.warning("tokenizer: the checkpoint's discriminator does not fit loss.disc_num_layers/disc_ndf; "
                        "starting it fresh")

    @property
    def downsample_factor(self) -> int:
        return self.vqgan.downsample_factor

    def lossconfig(self) -> dict[str, Any]:
        """taming's `lossconfig` block for the exported yaml."""
        c = self.loss_cfg
        return {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "params": {"disc_start": c.disc_start, "codebook_weight": c.codebook_weight,
                           "pixelloss_weight": c.pixel_weight, "disc_num_layers": c.disc_num_layers,
                           "disc_in_channels": 3, "disc_factor": c.disc_factor, "disc_weight": c.disc_weight,
                           "perceptual_weight": c.perceptual_weight if self.perceptual is not None else 0.0,
                           "disc_ndf": c.disc_ndf, "disc_loss": c.disc_loss}}

    def export(self, ckpt_path: str, yaml_path: str) -> None:
        """Write the taming-format `.ckpt` + yaml (VQGAN weights and `loss.discriminator.*`)."""
        disc = {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
        save_taming_vqgan(self.vqgan, ckpt_path, yaml_path, extra={"global_step": self.global_step},
                          loss_state=disc, lossconfig=self.lossconfig())

    # ---- checkpoints: the perceptual network is loaded from its files, never saved ----
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith("perceptual.")]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("perceptual.")]
        if strict and (missing or result.unexpected_keys):
            bad = (missing or result.unexpected_keys)[0]
            raise ValueError(f"checkpoint does not fit the tokenizer: first bad key {bad!r}")
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["data_skipped_total"] = self._skipped_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._skipped_total = int(checkpoint.get("data_skipped_total", 0))

    # ---- losses ----
    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        if not self.loss_cfg.adaptive_disc_weight:
            return torch.tensor(self.loss_cfg.disc_weight, device=nll.device)
        last = self.vqgan.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.loss_cfg.disc_weight

    def reconstruction_loss(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.loss_cfg
        pixel = (x - rec).abs().mean() if c.pixel_loss == "l1" else F.mse_loss(rec, x)
        nll = c.pixel_weight * pixel
        logs = {"pixel_loss": pixel.detach()}
        if self.perceptual is not None and c.perceptual_weight > 0:
            p = self.perceptual(x.contiguous(), rec.contiguous()).mean()
            nll = nll + c.perceptual_weight * p
            logs["perceptual_loss"] = p.detach()
        return nll, logs

    def gan_active(self) -> bool:
        return self.loss_cfg.disc_factor > 0 and self.global_step >= self.loss_cfg.disc_start

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        opt, sched = self.optimizers(), self.lr_schedulers()
        x = frames_to_input(batch["frames"])
        rec, cb_loss, commit_loss, codes, z = self.vqgan(x)
        nll, logs = self.reconstruction_loss(x, rec)
        c = self.loss_cfg
        g_total = nll + c.codebook_weight * cb_loss + c.commitment_weight * commit_loss
        gan = self.gan_active()
        if gan:
            self.discriminator.requires_grad_(False)  # the generator loss must not train the discriminator
            g_loss = -self.discriminator(rec.contiguous()).mean()
            d_weight = self._adaptive_weight(nll, g_loss)
            g_total = g_total + d_weight * c.disc_factor * g_loss
            self.discriminator.requires_grad_(True)
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        self._check_finite(g_total, batch)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(g_total)
        if gan:
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(rec.detach())
            d_fn = hinge_d_loss if c.disc_loss == "hinge" else vanilla_d_loss
            d_loss = c.disc_factor * d_fn(logits_real, logits_fake)
            self.manual_backward(d_loss)
            logs.update(disc_loss=d_loss.detach(), logits_real=logits_real.detach().mean(),
                        logits_fake=logits_fake.detach().mean())
        opt.step()
        sched.step()
        self._track_codes(codes, z)
        self._skipped_total += int(batch["num_skipped"])
        bs = x.shape[0]
        self.log("train/loss", g_total.detach(), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=bs)
        self.log_dict({"train/codebook_loss": cb_loss.detach(), "train/commitment_loss": commit_loss.detach(),
                       "data/skipped_total": float(self._skipped_total)}, batch_size=bs)
        return g_total.detach()

    def _check_finite(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite tokenizer loss {loss.item()} at step {self.global_step}; "
                                     f"batch keys: {batch['key']}")

    # ---- codebook usage and dead-code restart ----
    @torch.no_grad()
    def _track_codes(self, codes: torch.Tensor, z: torch.Tensor) -> None:
        counts = torch.bincount(codes.reshape(-1), minlength=self.vqgan.n_embed).to(self.usage_since_log.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.usage_since_log += counts
        self.usage_since_restart += counts
        step = self.global_step  # already advanced by this step's optimizer step
        if step % self.codebook_cfg.log_every_n_steps == 0:
            p = self.usage_since_log / self.usage_since_log.sum().clamp(min=1)
            perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
            self.log_dict({"codebook/perplexity": perplexity.float(),
                           "codebook/dead_codes": (self.usage_since_log == 0).sum().float(),
                           "codebook/used_fraction": (self.usage_since_log > 0).float().mean()})
            self.usage_since_log.zero_()
        if step % self.codebook_cfg.restart_every_n_steps == 0:
            restarted = self.restart_dead_codes(z) if self.codebook_cfg.dead_code_restart else 0
            self.log("codebook/restarted", float(restarted))
            self.usage_since_restart.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Replace codes unused since the last restart with (noisy) encoder outputs of this batch. Returns the count."""
        dead = torch.nonzero(self.usage_since_restart == 0).flatten()
        if dead.numel() == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
        gen = torch.Generator(device="cpu").manual_seed(self.global_step)
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)
        noise = torch.randn(dead.numel(), flat.shape[1], generator=gen).to(flat)
        new = flat[pick] + self.codebook_cfg.restart_noise * flat.std() * noise
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(new, src=0)  # every rank restarts with rank 0's vectors
        weight = self.vqgan.quantize.embedding.weight
        weight[dead.to(weight.device)] = new.to(weight.dtype)
        return int(dead.numel())

    # ---- validation: reconstruction quality on held-out frames ----
    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        x = frames_to_input(batch["frames"])
        rec, cb_loss, commit_loss, codes, _ = self.vqgan(x)
        nll, _ = self.reconstruction_loss(x, rec)
        bs = x.shape[0]
        self.log("val/psnr", psnr(output_to_frames(rec), batch["frames"]).mean(), prog_bar=True, batch_size=bs,
                 sync_dist=True)
        self.log("val/rec_loss", nll, batch_size=bs, sync_dist=True)
        self.log("val/codebook_loss", cb_loss, batch_size=bs, sync_dist=True)
        return nll

    def configure_optimizers(self):
        total = self.optim_cfg.total_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise ConfigError("optim.total_steps: set it or trainer.max_steps (frame streams are endless)")
        c = self.optim_cfg
        groups = [{"params": list(self.vqgan.parameters()), "lr": c.lr},
                  {"params": list(self.discriminator.parameters()), "lr": self.loss_cfg.disc_lr or c.lr}]
        opt = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, c.warmup_steps, total, c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportTamingVQGAN(L.Callback):
    """Write the tokenizer as taming `.ckpt` + yaml: at the end of training, and every N steps if asked.

    Args:
        dirpath: output folder; default `<default_root_dir>/tokenizer`.
        filename: base name of `<filename>.ckpt` and `<filename>.yaml`.
        every_n_train_steps: also export during training (0: only at the end).
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "vqgan", every_n_train_steps: int = 0):
        super().__init__()
        self.dirpath, self.filename, self.every_n_train_steps = dirpath, filename, every_n_train_steps
        self.last_paths: Optional[tuple[str, str]] = None

    def export(self, trainer: L.Trainer, module: TokenizerModule) -> None:
        if not trainer.is_global_zero:
            return
        d = self.dirpath or os.path.join(trainer.default_root_dir, "tokenizer")
        ckpt, yml = os.path.join(d, self.filename + ".ckpt"), os.path.join(d, self.filename + ".yaml")
        module.export(ckpt, yml)
        self.last_paths = (ckpt, yml)
        log.info("exported taming-format tokenizer to %s (+ %s) at step %d", ckpt, yml, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)

