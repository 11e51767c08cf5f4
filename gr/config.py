"""Dataclass configs, one per component. Defaults and validation live here; YAML only overrides them.

Each component receives its own sub-config. The model's `ClipSpec` states what data it needs, and the data
pipeline derives its clips from it, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

T = TypeVar("T")

# Trunk presets: GR-2's scaling family S/B/L/XL = 30M / 95M / 312M / 719M trainable parameters.
# Counted at the reference setting (1024 codes, 16x16 grid, 512-d text features); see tests/test_model.py.
PRESETS: dict[str, dict[str, int]] = {
    "S": dict(num_layers=12, num_heads=7, width=448),
    "B": dict(num_layers=13, num_heads=12, width=768),
    "L": dict(num_layers=24, num_heads=16, width=1024),
    "XL": dict(num_layers=36, num_heads=20, width=1280),
}
PRESET_TARGETS = {"S": 30e6, "B": 95e6, "L": 312e6, "XL": 719e6}


class ConfigError(ValueError):
    """A user mistake in a config value; the message names the field."""


def as_config(cls: type[T], value: Any, where: str) -> T:
    """Accept a dataclass instance or a plain dict (as stored in checkpoints) and return an instance of `cls`."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):  # an annotation not resolvable at run time: the dataclass checks itself
            hints = {}
        for name, val in value.items():
            if not _fits(val, hints.get(name, Any)):
                raise ConfigError(f"{where}.{name}: expected {_type_name(hints[name])}, got {type(val).__name__} "
                                  f"{_short(val)}")
        return cls(**value)
    raise ConfigError(f"{where}: expected {cls.__name__} or dict, got {type(value).__name__}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML/checkpoint value fits a dataclass field's annotation (the kinds our configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0] if args else Any) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True  # anything else is checked by the dataclass itself


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union or typing.get_origin(hint) is types.UnionType:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}" if typing.get_args(hint) else "a list"
    if hint is float:
        return "a finite number"
    return getattr(hint, "__name__", str(hint))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def check_local_file(path: Optional[str], where: str) -> None:
    """Raise a ValueError naming the config field when a configured local file does not exist."""
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found: {path!r}")


@dataclass
class ClipSpec:
    """What the model sees of a video: `num_history` context frames, then one future frame to predict."""

    num_history: int = 2  # context frames o_{t-h+1..t}
    future_frame_offset: int = 1  # the predicted frame is o_{t+offset}, in frames at `fps`
    fps: float = 4.0  # frames are sampled from the source video at this rate
    image_size: int = 64  # square frames, pixels (short side resized, then centre-cropped)

    def __post_init__(self) -> None:
        _require(self.num_history >= 1, "model.clip.num_history", f"must be >= 1, got {self.num_history}")
        _require(self.future_frame_offset >= 1, "model.clip.future_frame_offset", "must be >= 1")
        _require(self.fps > 0, "model.clip.fps", f"must be > 0, got {self.fps}")
        _require(self.image_size >= 8, "model.clip.image_size", f"must be >= 8, got {self.image_size}")

    @property
    def frame_offsets(self) -> list[int]:
        """Frame indices (at `fps`) of the history frames followed by the future frame."""
        last = self.num_history - 1
        return list(range(self.num_history)) + [last + self.future_frame_offset]

    @property
    def span(self) -> int:
        """Number of frames at `fps` that one clip covers."""
        return self.frame_offsets[-1] + 1


@dataclass
class TrunkConfig:
    """The GPT trunk. Give `preset` (S/B/L/XL) or all of num_layers/num_heads/width."""

    preset: Optional[str] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    width: Optional[int] = None
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: str = "sdpa"  # "sdpa" (torch scaled_dot_product_attention) or "xformers"
    activation_checkpointing: bool = False  # recompute each block in backward to save memory

    def __post_init__(self) -> None:
        if self.preset is not None and None not in (self.num_layers, self.num_heads, self.width):
            self.preset = None  # fully specified by hand: record it as custom, not as the preset
        if self.preset is not None:
            _require(self.preset in PRESETS, "model.trunk.preset", f"unknown preset {self.preset!r}; use {list(PRESETS)}")
            for key, val in PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, val)
        for key in ("num_layers", "num_heads", "width"):
            val = getattr(self, key)
            _require(isinstance(val, int) and val > 0, f"model.trunk.{key}", f"must be a positive int (or set preset), got {val!r}")
        _require(self.width % self.num_heads == 0, "model.trunk.width", f"{self.width} not divisible by num_heads {self.num_heads}")
        _require(self.attention in ("sdpa", "xformers"), "model.trunk.attention", f"must be 'sdpa' or 'xformers', got {self.attention!r}")
        _require(0.0 <= self.dropout < 1.0, "model.trunk.dropout", "must be in [0, 1)")


HEAD_KINDS = ("cvae", "flow", "diffusion", "tokens")


@dataclass
class ActionHeadConfig:
    """The action head (gr/model/heads/). `kind` picks it; the sizes are shared, each head reads what it uses.

    cvae: ACT-style conditional VAE (reference sizes: GR-MG 4+4 blocks, width 128, latent 32).
    flow: conditional flow matching (pi0-style), `num_steps` Euler steps at inference.
    diffusion: DDPM training over `train_timesteps`, DDIM sampling in `num_steps` steps (diffusers' schedulers).
    tokens: `num_bins` bins per action dim (RT-2 / OpenVLA-style), decoded autoregressively and constrained.
    """

    kind: str = "cvae"  # absent in older checkpoints, which are all CVAE
    width: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 4  # cvae: encoder over the ground-truth chunk (training only)
    num_decoder_layers: int = 4  # every head: its transformer over the chunk, cross-attending to the readouts
    latent_dim: int = 32  # cvae
    dropout: float = 0.1
    num_steps: int = 10  # flow: integration steps; diffusion: DDIM sampling steps
    train_timesteps: int = 100  # diffusion: DDPM training timesteps
    num_bins: int = 256  # tokens: bins per dimension

    def __post_init__(self) -> None:
        _require(self.kind in HEAD_KINDS, "model.robot.head.kind", f"must be one of {HEAD_KINDS}, got {self.kind!r}")
        _require(self.width >= 1 and self.num_heads >= 1, "model.robot.head.width",
                 f"width and num_heads must be >= 1, got {self.width} and {self.num_heads}")
        _require(0.0 <= self.dropout < 1.0, "model.robot.head.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.width % self.num_heads == 0, "model.robot.head.width",
                 f"{self.width} must be divisible by num_heads {self.num_heads}")
        for name in ("num_encoder_layers", "num_decoder_layers", "latent_dim", "num_steps", "train_timesteps"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"model.robot.head.{name}",
                     f"must be an int >= 1, got {getattr(self, name)!r}")
        _require(self.num_steps <= self.train_timesteps, "model.robot.head.num_steps",
                 f"{self.num_steps} sampling steps exceed train_timesteps {self.train_timesteps}")
        _require(isinstance(self.num_bins, int) and self.num_bins >= 2, "model.robot.head.num_bins",
                 f"must be an int >= 2, got {self.num_bins!r}")


@dataclass
class RobotConfig:
    """What robot finetuning adds to the GR model: views, a state token per step, readouts and the action head.

    The data pipeline cuts its windows from these fields (views, state/action sizes, chunk), so data and model agree.
    """

    view_names: list[str] = field(default_factory=lambda: ["head", "wrist"])  # kept sorted: fixed token order
    state_dim: int = 4
    action_dim: int = 4
    action_chunk: int = 10  # k: actions a_t .. a_{t+k-1} predicted per step
    num_readouts: int = 4  # ACT readout tokens placed after the prefix, before the future frames
    gripper_dims: list[int] = field(default_factory=lambda: [-1])  # binary open/close action dims (BCE); [] = none:
    # every dim is continuous and z-scored, as ALOHA / SO-100 grippers need
    history_stride: int = 1  # control steps between history frames: a 50 Hz robot's history can span more than 2 steps
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)

    def __post_init__(self) -> None:
        self.head = as_config(ActionHeadConfig, self.head, "model.robot.head")
        _require(len(self.view_names) >= 1 and len(set(self.view_names)) == len(self.view_names),
                 "model.robot.view_names", f"must be distinct and non-empty, got {self.view_names}")
        self.view_names = sorted(self.view_names)
        for name in ("state_dim", "action_dim", "action_chunk", "num_readouts", "history_stride"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"model.robot.{name}",
                     f"must be an int >= 1, got {getattr(self, name)!r}")
        dims = [d % self.action_dim for d in self.gripper_dims]
        _require(all(-self.action_dim <= d < self.action_dim for d in self.gripper_dims) and len(set(dims)) == len(dims),
                 "model.robot.gripper_dims", f"{self.gripper_dims} are not distinct dims of a {self.action_dim}-D action")
        _require(len(dims) < self.action_dim, "model.robot.gripper_dims", "at least one arm dimension must remain")

    @property
    def gripper_index(self) -> list[int]:
        return sorted(d % self.action_dim for d in self.gripper_dims)

    @property
    def arm_index(self) -> list[int]:
        return [d for d in range(self.action_dim) if d not in self.gripper_index]


@dataclass
class GRModelConfig:
    """The GR model: trunk plus embeddings and heads, and the clip it consumes. `robot` adds the policy parts."""

    trunk: TrunkConfig = field(default_factory=lambda: TrunkConfig(preset="B"))
    clip: ClipSpec = field(default_factory=ClipSpec)
    max_text_tokens: int = 32  # CLIP tokens kept (padding is masked out of attention)
    robot: Optional[RobotConfig] = None  # None: text-video pretraining (one view, no state, no actions)
    # Copy path: each future-frame token's input also carries the code of the last history frame at the same position
    # and view (its own embedding table). Copying the last frame is the baseline a world model must beat, and a small
    # trunk on a small budget does not learn to copy through attention alone. False keeps older checkpoints' layout.
    last_frame_input: bool = False

    def __post_init__(self) -> None:
        self.trunk = as_config(TrunkConfig, self.trunk, "model.trunk")
        self.clip = as_config(ClipSpec, self.clip, "model.clip")
        if self.robot is not None:
            self.robot = as_config(RobotConfig, self.robot, "model.robot")
        _require(1 <= self.max_text_tokens <= 77, "model.max_text_tokens", "must be in [1, 77]")


@dataclass
class TextEncoderConfig:
    """Frozen open_clip text tower."""

    model_name: str = "ViT-S-32-alt"  # any open_clip model name
    pretrained: Optional[str] = None  # local .bin/.pt/.safetensors; None = random weights (warned)
    random_init_seed: int = 0  # makes random weights reproducible, so a checkpoint can refer to them
    cache_size: int = 100_000  # per-caption feature cache: at most this many entries ...
    cache_mib: float = 256.0  # ... and at most this many MiB (LRU; 0 disables the cache)
    cache_device: str = "cpu"  # where cached features live: "cpu" (host memory) or "model" (the text tower's device)

    def __post_init__(self) -> None:
        check_local_file(self.pretrained, "text_encoder.pretrained")
        _require(self.cache_size >= 0, "text_encoder.cache_size", f"must be >= 0, got {self.cache_size}")
        _require(self.cache_mib >= 0, "text_encoder.cache_mib", f"must be >= 0, got {self.cache_mib}")
        _require(self.cache_device in ("cpu", "model"), "text_encoder.cache_device",
                 f"must be 'cpu' or 'model', got {self.cache_device!r}")
        import open_clip  # deferred: heavy import

        _require(
            self.model_name in open_clip.list_models(),
            "text_encoder.model_name",
            f"unknown open_clip model {self.model_name!r}; see open_clip.list_models()",
        )


@dataclass
class ImageTokenizerConfig:
    """Frozen VQGAN in the taming-transformers format.

    With `checkpoint` (+ `yaml`) the architecture comes from the taming yaml. Without it the architecture fields below
    are used with seeded random weights (tests and the demo before a tokenizer is trained).
    """

    checkpoint: Optional[str] = None  # taming .ckpt (a dict with "state_dict") or .safetensors
    yaml: Optional[str] = None  # taming model yaml (model.params.{ddconfig, n_embed, embed_dim})
    allow_pickle: bool = False  # deprecated no-op: pickled .ckpt files always load inertly (gr.safe_load)
    random_init_seed: int = 0
    codebook_size: int = 1024  # n_embed
    embed_dim: int = 64
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    z_channels: int = 64
    resolution: int = 64

    def __post_init__(self) -> None:
        if self.allow_pickle:
            warnings.warn("image_tokenizer.allow_pickle is deprecated and does nothing: pickled .ckpt files load "
                          "through gr.safe_load, which runs no code from them", DeprecationWarning, stacklevel=2)
        check_local_file(self.checkpoint, "image_tokenizer.checkpoint")
        check_local_file(self.yaml, "image_tokenizer.yaml")
        _require(self.codebook_size >= 2, "image_tokenizer.codebook_size", "must be >= 2")
        _require(len(self.ch_mult) >= 1, "image_tokenizer.ch_mult", "must not be empty")
        # taming's GroupNorm uses 32 groups, so every channel count must be a multiple of 32.
        _require(self.ch % 32 == 0 and self.z_channels % 32 == 0, "image_tokenizer.ch",
                 f"ch ({self.ch}) and z_channels ({self.z_channels}) must be multiples of 32")
        _require(self.resolution >= self.downsample_factor and self.resolution % self.downsample_factor == 0,
                 "image_tokenizer.resolution", f"{self.resolution} px must be a multiple of the downsampling factor "
                 f"{self.downsample_factor} (ch_mult {self.ch_mult})")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay. No weight decay on norms, biases and embeddings."""

    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 1000
    total_steps: Optional[int] = None  # None: trainer.max_steps / estimated stepping batches
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TokenizerLossConfig:
    """VQGAN training loss (taming's recipe, written for manual optimization under Lightning 2).

    generator = pixel_weight * pixel + perceptual_weight * LPIPS + codebook_weight * ||sg(z) - e||^2
                + commitment_weight * ||z - sg(e)||^2 + disc_factor * lambda * GAN, GAN only from `disc_start` on.
    """

    pixel_loss: str = "l1"  # "l1" or "l2" reconstruction term
    pixel_weight: float = 1.0
    codebook_weight: float = 1.0  # moves codebook vectors towards the encoder outputs
    commitment_weight: float = 0.25  # keeps encoder outputs near their codes (beta in VQ-VAE)
    perceptual_weight: float = 1.0  # used only when lpips_weights is set
    lpips_weights: Optional[str] = None  # local LPIPS file: taming's vgg.pth (lin0..4) or a full LPIPS state dict
    vgg16_weights: Optional[str] = None  # local torchvision vgg16 state dict, when lpips_weights lacks `net.*`
    disc_start: int = 2000  # optimizer step at which the patch-GAN term switches on
    disc_weight: float = 0.8  # scale of the adaptive GAN weight
    disc_factor: float = 1.0
    adaptive_disc_weight: bool = True  # balance GAN vs reconstruction gradients at the decoder's last layer
    disc_loss: str = "hinge"  # "hinge" or "vanilla"
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_lr: Optional[float] = None  # None: the generator's lr

    def __post_init__(self) -> None:
        _require(self.pixel_loss in ("l1", "l2"), "loss.pixel_loss", f"must be 'l1' or 'l2', got {self.pixel_loss!r}")
        _require(self.disc_loss in ("hinge", "vanilla"), "loss.disc_loss",
                 f"must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        for name in ("pixel_weight", "codebook_weight", "commitment_weight", "perceptual_weight", "disc_weight",
                     "disc_factor"):
            _require(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
        _require(self.disc_start >= 0, "loss.disc_start", "must be >= 0")
        _require(self.disc_num_layers >= 1, "loss.disc_num_layers", "must be >= 1")
        check_local_file(self.lpips_weights, "loss.lpips_weights")
        check_local_file(self.vgg16_weights, "loss.vgg16_weights")
        _require(self.vgg16_weights is None or self.lpips_weights is not None, "loss.vgg16_weights",
                 "needs loss.lpips_weights too (the LPIPS linear layers)")


@dataclass
class CodebookConfig:
    """Codebook-usage logging and dead-code restart."""

    log_every_n_steps: int = 50  # perplexity and dead-code count over this many steps
    dead_code_restart: bool = True  # re-seed codes unused for `restart_every_n_steps` from encoder outputs
    restart_every_n_steps: int = 100
    restart_noise: float = 0.01  # relative noise added to the encoder outputs that replace dead codes

    def __post_init__(self) -> None:
        _require(self.log_every_n_steps >= 1, "codebook.log_every_n_steps", "must be >= 1")
        _require(self.restart_every_n_steps >= 1, "codebook.restart_every_n_steps", "must be >= 1")
        _require(self.restart_noise >= 0, "codebook.restart_noise", "must be >= 0")


@dataclass
class FinetuneLossConfig:
    """Robot finetuning loss: w_frame * CE(future frames, every view) + the action head's terms, padding masked.

    cvae: w_arm * L1(arm chunk) + w_gripper * BCE(gripper chunk) + w_kl * KL(posterior || N(0, I)) (defaults follow
    GR-MG: frame 0.1, KL 1). flow / diffusion: w_arm * MSE(arm dims) + w_gripper * MSE(gripper dims) of the velocity /
    noise. tokens: w_arm * CE(arm tokens) + w_gripper * CE(gripper tokens). `arm_loss` and `kl_weight` are CVAE-only."""

    frame_weight: float = 0.1
    arm_weight: float = 1.0
    arm_loss: str = "l1"  # "l1" or "smooth_l1"
    gripper_weight: float = 0.1
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.arm_loss in ("l1", "smooth_l1"), "loss.arm_loss", f"must be 'l1' or 'smooth_l1', got {self.arm_loss!r}")
        for name in ("frame_weight", "arm_weight", "gripper_weight", "kl_weight"):
            _require(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
