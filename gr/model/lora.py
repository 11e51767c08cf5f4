"""LoRA adapters on the trunk's linear layers (finetuning's `lora: {rank, alpha, targets}`).

    y = x W^T + b + (alpha / rank) * (x A^T) B^T        A: (rank, in), B: (out, rank), B = 0 at the start

`LoRALinear` is an `nn.Linear` that keeps the SAME `weight` and `bias` tensors under the same names and adds
`lora_A` / `lora_B`, so a pretrained state dict loads into an adapted model unchanged and the adapters are the only
new keys. `merge_lora` folds the adapters into the weights and turns every LoRALinear back into a plain nn.Linear:
the merged model has exactly the un-adapted model's keys (what `gr export --merge-lora` writes).

Why not `peft`: it installs without another torch, but it brings transformers, accelerate and kernels, renames the
wrapped layers' tensors (`base_layer.weight`, `lora_A.default.weight`), which would break `init_from`, exports and the
golden checkpoints, and its layers are invisible to the trunk's CPU decode fast path (gr/model/decode.py), which
reads `weight` directly; that path reads `effective_weight` here instead.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gr.config import ConfigError

DEFAULT_TARGETS = ["trunk.blocks.*.attn.qkv", "trunk.blocks.*.attn.proj", "trunk.blocks.*.mlp.fc",
                   "trunk.blocks.*.mlp.proj"]


@dataclass
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha / r), and fnmatch patterns of GRModel module names to adapt
    (default: every trunk block's attention and MLP projections). `trainable`: parameter-name prefixes of GRModel
    that train besides the adapters and the new robot parts (default none: every pretrained weight stays frozen)."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ConfigError(f"lora.rank: must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha!r}")
        if not self.targets:
            raise ConfigError("lora.targets: at least one module pattern is needed")


class LoRALinear(nn.Linear):
    """nn.Linear + a low-rank update. Built from an existing layer with `LoRALinear.wrap` (shares its tensors)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init; B = 0: no change at first

    @classmethod
    def wrap(cls, lin: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, rank, alpha, bias=lin.bias is not None, device=w.device,
                  dtype=w.dtype)
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters: the base weights are not copied
        return new

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def effective_weight(lin: nn.Linear) -> torch.Tensor:
    """The weight a layer applies: W, or W + (alpha / r) B A for a LoRALinear (for paths that read weights directly)."""
    return lin.weight + lin.delta() if isinstance(lin, LoRALinear) else lin.weight


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every nn.Linear of `model` whose name matches a pattern of `cfg.targets` with a LoRALinear; returns the
    adapted names. A pattern that matches no linear layer is a config error naming it."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)}
    chosen: list[str] = []
    for pattern in cfg.targets:
        hit = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ConfigError(f"lora.targets: {pattern!r} matches no linear layer of the model "
                              f"(e.g. {sorted(linears)[:3]})")
        chosen += [n for n in hit if n not in chosen]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.wrap(linears[name], cfg.rank, cfg.alpha))
    return chosen


def train_only_adapters(model: nn.Module, cfg: LoRAConfig, always: tuple[str, ...] = ()) -> None:
    """Freeze every parameter but the adapters, the `always` name prefixes (new parts) and `cfg.trainable`."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in cfg.trainable:
        if not any(n.startswith(prefix) for n in names):
            raise ConfigError(f"lora.trainable: prefix {prefix!r} matches no parameter of the model")
    keep = (*always, *cfg.trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n.rpartition(".")[2] in ("lora_A", "lora_B") or n.startswith(keep))


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight and restore plain nn.Linear layers; returns how many were merged."""
    merged = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                        dtype=m.weight.dtype)
        lin.weight = nn.Parameter(m.weight + m.delta(), requires_grad=m.weight.requires_grad)
        lin.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
        merged += 1
    return merged
