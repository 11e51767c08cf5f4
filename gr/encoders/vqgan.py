"""Frozen VQGAN with taming-transformers module classes and state-dict layout.

Why not `taming.models.vqgan.VQModel`: it imports `pytorch_lightning.utilities.distributed`, which current Lightning
no longer has, so it cannot be imported. We keep taming's building blocks (Encoder, Decoder, VectorQuantizer2) and
its attribute names, so public taming `.ckpt` + yaml pairs load unchanged, and what we save loads in taming.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Optional

import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
import torch.nn.functional as F
from torch import nn

from gr.config import ConfigError, ImageTokenizerConfig
from gr.encoders._frozen import FrozenMixin, check_state_dict, read_state_dict, seeded

log = logging.getLogger(__name__)

TAMING_TARGET = "taming.models.vqgan.VQModel"


class VQGAN(nn.Module):
    """VQGAN (taming layout): frames in [-1, 1] <-> code grids. Trainable; see `FrozenVQGAN` for the frozen wrapper.

    Args:
        ddconfig: taming `ddconfig` (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, ...).
        n_embed: codebook size.
        embed_dim: codebook vector size.
    """

    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int):
        super().__init__()
        self.ddconfig = dict(ddconfig)
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, sane_index_shape=True)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def check_image_size(self, height: int, width: int, where: str = "frames") -> None:
        """Raise a ValueError when frames cannot be tokenized: smaller than, or not a multiple of, the downsampling."""
        f = self.downsample_factor
        if height < f or width < f or height % f or width % f:
            raise ValueError(f"{where}: {height}x{width} px frames cannot be tokenized by a VQGAN with downsampling "
                             f"factor {f}: each side must be a multiple of {f} (and at least {f})")

    def codebook_fingerprint(self) -> str:
        """A short hash of the codebook: pre-tokenized shards record it, so codes are never read by another tokenizer."""
        w = self.quantize.embedding.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]

    def forward(self, x: torch.Tensor):
        """Training pass. x: (B, 3, H, W) in [-1, 1].

        Returns (reconstruction (B, 3, H, W), codebook_loss, commitment_loss, codes (B, h, w), z (B, D, h, w)), where
        z are the pre-quantization encoder outputs (used to restart dead codes).
        """
        z = self.quant_conv(self.encoder(x))
        z_st, _, (_, _, codes) = self.quantize(z)  # straight-through z_q; taming's own (legacy-weighted) loss unused
        z_q = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        return self.decoder(self.post_quant_conv(z_st)), codebook_loss, commitment_loss, codes, z

    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64."""
        self.check_image_size(x.shape[-2], x.shape[-1])
        z = self.quant_conv(self.encoder(x))
        _, _, (_, _, idx) = self.quantize(z)
        return idx

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, h, w) -> images (B, 3, H, W), roughly in [-1, 1]."""
        b, h, w = codes.shape
        quant = self.quantize.get_codebook_entry(codes.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self.decoder(self.post_quant_conv(quant))


def ddconfig_from(cfg: ImageTokenizerConfig) -> dict[str, Any]:
    return dict(
        double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3, out_ch=3, ch=cfg.ch,
        ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions),
        dropout=0.0,
    )


def taming_yaml_dict(model: VQGAN, lossconfig: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The yaml that taming (and we) read back: model.target + model.params.{ddconfig, n_embed, embed_dim}, plus
    taming's `lossconfig` when the discriminator is saved too."""
    params: dict[str, Any] = {"embed_dim": model.embed_dim, "n_embed": model.n_embed, "ddconfig": model.ddconfig}
    if lossconfig is not None:
        params["lossconfig"] = lossconfig
    return {"model": {"target": TAMING_TARGET, "params": params}}


def save_taming_vqgan(model: VQGAN, ckpt_path: str, yaml_path: str, extra: Optional[dict] = None,
                      loss_state: Optional[dict[str, torch.Tensor]] = None,
                      lossconfig: Optional[dict[str, Any]] = None) -> None:
    """Write `{"state_dict": ...}` (.ckpt) and the taming yaml, each atomically.

    Args:
        loss_state: weights of taming's loss module (e.g. `discriminator.*`), stored as `loss.*` like VQModel does.
        lossconfig: taming `lossconfig` for the yaml (target + params).
    """
    os.makedirs(os.path.dirname(os.path.abspath(ckpt_path)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({f"loss.{k}": v.detach().cpu() for k, v in (loss_state or {}).items()})
    payload = {"state_dict": state, **(extra or {})}
    tmp = ckpt_path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, ckpt_path)
    with open(yaml_path + ".tmp", "w") as f:
        yaml.safe_dump(taming_yaml_dict(model, lossconfig), f, sort_keys=False)
    os.replace(yaml_path + ".tmp", yaml_path)


def _params_from_yaml(path: str) -> tuple[dict[str, Any], int, int]:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        params = doc["model"]["params"]
        return dict(params["ddconfig"]), int(params["n_embed"]), int(params["embed_dim"])
    except FileNotFoundError:
        raise ValueError(f"image_tokenizer.yaml: file not found: {path!r}") from None
    except (KeyError, TypeError, yaml.YAMLError) as exc:
        raise ValueError(f"image_tokenizer.yaml: {path!r} lacks model.params.{{ddconfig,n_embed,embed_dim}}: {exc!r}") from exc


def load_taming_vqgan(ckpt_path: str, yaml_path: str, return_loss_state: bool = False):
    """Load a taming-format VQGAN (.ckpt + yaml). Discriminator/perceptual `loss.*` weights are ignored, or returned
    (without the `loss.` prefix) as a second value with `return_loss_state=True`. Public .ckpt files with pickled
    Lightning objects load too, with no code from them run (gr.safe_load)."""
    ddconfig, n_embed, embed_dim = _params_from_yaml(yaml_path)
    model = VQGAN(ddconfig, n_embed, embed_dim)
    found = read_state_dict(ckpt_path, "image_tokenizer.checkpoint")
    loss_state = {k[len("loss."):]: v for k, v in found.items() if k.startswith("loss.")}
    found = {k: v for k, v in found.items() if not k.startswith("loss.")}
    check_state_dict(model.state_dict(), found, ckpt_path, "image_tokenizer.checkpoint")
    model.load_state_dict(found, strict=True)
    return (model, loss_state) if return_loss_state else model


class FrozenVQGAN(FrozenMixin):
    """Frozen image tokenizer: `encode(frames uint8 (..., H, W, 3)) -> codes (..., h, w)` and `decode` back.

    Args:
        cfg: ImageTokenizerConfig; loads `checkpoint` + `yaml` when given, else seeded random weights.
    """

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.checkpoint:
            yaml_path = cfg.yaml or os.path.splitext(cfg.checkpoint)[0] + ".yaml"
            self.vq = load_taming_vqgan(cfg.checkpoint, yaml_path)
            if self.vq.n_embed != cfg.codebook_size:
                raise ConfigError(
                    f"image_tokenizer.codebook_size: config says {cfg.codebook_size} but {cfg.checkpoint!r} has "
                    f"{self.vq.n_embed} codes (quantize.embedding.weight)"
                )
        else:
            log.warning("image_tokenizer.checkpoint is not set: using a random (seeded) VQGAN")
            with seeded(cfg.random_init_seed):
                self.vq = VQGAN(ddconfig_from(cfg), cfg.codebook_size, cfg.embed_dim)
        self.codebook_size = self.vq.n_embed
        self.downsample_factor = self.vq.downsample_factor
        self.freeze()

    @classmethod
    def from_taming(cls, checkpoint: str, yaml_path: Optional[str] = None) -> "FrozenVQGAN":
        """Load a taming `.ckpt` + yaml whatever its codebook size (data_prep tools; models use the config)."""
        if not os.path.isfile(checkpoint):
            raise ConfigError(f"image_tokenizer.checkpoint: file not found: {checkpoint!r}")
        yaml_path = yaml_path or os.path.splitext(checkpoint)[0] + ".yaml"
        _, n_embed, _ = _params_from_yaml(yaml_path)
        return cls(ImageTokenizerConfig(checkpoint=checkpoint, yaml=yaml_path, codebook_size=n_embed))

    def tokens_spec(self, image_size: int) -> dict:
        """What pre-tokenized shards must have been made with: this tokenizer at this clip size."""
        grid = self.grid_size(image_size)
        return {"codebook_size": self.vq.n_embed, "image_size": image_size, "grid": [grid, grid],
                "fingerprint": self.vq.codebook_fingerprint()}

    def grid_size(self, image_size: int) -> int:
        if image_size % self.downsample_factor:
            raise ValueError(
                f"clip.image_size {image_size} is not a multiple of the tokenizer's downsampling {self.downsample_factor}"
            )
        return image_size // self.downsample_factor

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """frames: uint8 (..., H, W, 3) -> codes int64 (..., h, w). Chunked to bound activation memory."""
        lead = frames.shape[:-3]
        self.vq.check_image_size(frames.shape[-3], frames.shape[-2])
        x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2)
        dtype = next(self.vq.parameters()).dtype
        codes = [self.vq.encode_to_codes(c.to(dtype) / 127.5 - 1.0) for c in x.split(chunk)]
        codes = torch.cat(codes)
        return codes.reshape(*lead, *codes.shape[-2:])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """codes: (..., h, w) -> uint8 frames (..., H, W, 3)."""
        lead = codes.shape[:-2]
        flat = codes.reshape(-1, *codes.shape[-2:]).long()
        return _to_frames(torch.cat([self.vq.decode_codes(c) for c in flat.split(chunk)]), lead)

    @torch.no_grad()
    def decode_expected(self, probs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Code probabilities (..., h, w, V) -> uint8 frames (..., H, W, 3): the decode of the probability-weighted mean
        codebook vector at every position (one-hot probabilities give exactly `decode` of those codes)."""
        if probs.shape[-1] != self.vq.n_embed:
            raise ValueError(f"decode_expected: {probs.shape[-1]} probabilities per position for {self.vq.n_embed} codes")
        lead, weight = probs.shape[:-3], self.vq.quantize.embedding.weight  # (V, D)
        flat = probs.reshape(-1, *probs.shape[-3:]).to(weight)
        imgs = [self.vq.decoder(self.vq.post_quant_conv((p @ weight).permute(0, 3, 1, 2).contiguous()))
                for p in flat.split(chunk)]
        return _to_frames(torch.cat(imgs), lead)


def _to_frames(imgs: torch.Tensor, lead: tuple) -> torch.Tensor:
    """Decoder output (B, 3, H, W) roughly in [-1, 1] -> uint8 (*lead, H, W, 3)."""
    imgs = ((imgs.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return imgs.reshape(*lead, *imgs.shape[-3:])
