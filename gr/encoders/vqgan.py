"""Frozen VQGAN with taming-transformers module classes and state-dict layout.

Why not `taming.models.vqgan.VQModel`: it imports `pytorch_lightning.utilities.distributed`, which current Lightning
no longer has, so it cannot be imported. We keep taming's building blocks (Encoder, Decoder, VectorQuantizer2) and
its attribute names, so public taming `.ckpt` + yaml pairs load unchanged, and what we save loads in taming.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from gr.config import ImageTokenizerConfig
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

    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64."""
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


def taming_yaml_dict(model: VQGAN) -> dict[str, Any]:
    """The yaml that taming (and we) read back: model.target + model.params.{ddconfig, n_embed, embed_dim}."""
    return {"model": {"target": TAMING_TARGET, "params": {
        "embed_dim": model.embed_dim, "n_embed": model.n_embed, "ddconfig": model.ddconfig}}}


def save_taming_vqgan(model: VQGAN, ckpt_path: str, yaml_path: str, extra: Optional[dict] = None) -> None:
    """Write `{"state_dict": ...}` (.ckpt) and the taming yaml, each atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(ckpt_path)), exist_ok=True)
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {})}
    tmp = ckpt_path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, ckpt_path)
    with open(yaml_path + ".tmp", "w") as f:
        yaml.safe_dump(taming_yaml_dict(model), f, sort_keys=False)
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


def load_taming_vqgan(ckpt_path: str, yaml_path: str, allow_pickle: bool = False) -> VQGAN:
    """Load a taming-format VQGAN (.ckpt + yaml). Discriminator/perceptual `loss.*` weights are ignored."""
    ddconfig, n_embed, embed_dim = _params_from_yaml(yaml_path)
    model = VQGAN(ddconfig, n_embed, embed_dim)
    found = read_state_dict(ckpt_path, "image_tokenizer.checkpoint", allow_pickle)
    found = {k: v for k, v in found.items() if not k.startswith("loss.")}
    check_state_dict(model.state_dict(), found, ckpt_path, "image_tokenizer.checkpoint")
    model.load_state_dict(found, strict=True)
    return model


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
            self.vq = load_taming_vqgan(cfg.checkpoint, yaml_path, cfg.allow_pickle)
            if self.vq.n_embed != cfg.codebook_size:
                raise ValueError(
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
        imgs = torch.cat([self.vq.decode_codes(c) for c in flat.split(chunk)])
        imgs = ((imgs.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return imgs.reshape(*lead, *imgs.shape[-3:])
