"""The interface every action head implements, and the chunk layout they share.

A head reads the readout features (B, R, C) of the trunk, which never see future-frame tokens, and predicts a chunk of
k actions in normalized units. The chunk layout is the one the data pipeline writes: arm dims z-scored by the dataset
statistics (`arm`, (B, k, A_arm)), gripper dims as {0, 1} targets (`gripper`, (B, k, A_grip)), both in
`RobotConfig.arm_index` / `gripper_index` order, and `action_mask` (B, k) False on padding past an episode's end.

    losses(readouts, batch, loss_cfg) -> {"action_loss": weighted total, named terms ...}   (training)
    predict(readouts, generator)      -> arm (B, k, A_arm), gripper scores (B, k, A_grip) or None   (inference)

Both go through `forward`, so that the hooks of sharding strategies (DeepSpeed ZeRO-3, FSDP2), which gather a
module's weights around its forward, wrap every use of the head's own parameters. Subclasses implement `_losses` and
`_predict`.

Gripper scores are > 0 for "closed / high end of the range": the policy maps them to the range's ends (binary
grippers). A head that can be seeded takes the generator; the same seed gives the same chunk.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gr.config import FinetuneLossConfig, RobotConfig


class ActionHead(nn.Module):
    """Base class: the chunk layout and masked reductions. Subclasses set `kind` and implement losses / predict."""

    kind = ""

    def __init__(self, cfg: RobotConfig, trunk_width: int):
        super().__init__()
        self.cfg, self.trunk_width = cfg, trunk_width
        self.arm_index, self.gripper_index = cfg.arm_index, cfg.gripper_index
        self.num_arm, self.num_gripper = len(self.arm_index), len(self.gripper_index)

    def forward(self, readouts: torch.Tensor, batch: Optional[dict[str, Any]] = None,
                loss_cfg: Optional[FinetuneLossConfig] = None, sample: bool = True,
                generator: Optional[torch.Generator] = None):
        if batch is None:
            return self._predict(readouts, generator)
        return self._losses(readouts, batch, loss_cfg, sample)

    def losses(self, readouts: torch.Tensor, batch: dict[str, Any], loss_cfg: FinetuneLossConfig,
               sample: bool = True) -> dict[str, torch.Tensor]:
        """Training terms for the true chunk in `batch` (arm, gripper, action_mask). `sample`: a stochastic training
        pass (False: the deterministic variant validation uses, where the head has one)."""
        return self(readouts, batch, loss_cfg, sample)

    def predict(self, readouts: torch.Tensor, generator: Optional[torch.Generator] = None):
        """arm (B, k, A_arm) in normalized units and gripper scores (B, k, A_grip) or None."""
        return self(readouts, generator=generator)

    def _losses(self, readouts, batch, loss_cfg, sample):
        raise NotImplementedError

    def _predict(self, readouts, generator):
        raise NotImplementedError

    def set_statistics(self, stats_action: torch.Tensor) -> None:
        """Called with the module's action statistics (rows mean, std, min, max; robot units) once they are known.
        Heads that need the action range (the `tokens` bins) keep what they need as buffers; the others ignore it."""

    # ---- shared helpers ----
    @staticmethod
    def chunk(batch: dict[str, Any]) -> torch.Tensor:
        """The normalized target chunk (B, k, A): arm dims, then gripper dims mapped from {0, 1} to {-1, +1}."""
        return torch.cat([batch["arm"], batch["gripper"] * 2 - 1], dim=-1)

    def split(self, chunk: torch.Tensor):
        """(B, k, A) in chunk layout -> arm (B, k, A_arm), gripper scores (B, k, A_grip) or None."""
        return chunk[..., : self.num_arm], (chunk[..., self.num_arm:] if self.num_gripper else None)

    @staticmethod
    def masked_mean(per: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """per (B, k, D), mask (B, k) -> mean over the valid steps and the D dims."""
        m = mask[..., None].to(per.dtype)
        return (per * m).sum() / (m.sum() * per.shape[-1]).clamp(min=1)

    def arm_gripper_terms(self, per: torch.Tensor, mask: torch.Tensor, loss_cfg: FinetuneLossConfig,
                          name: str) -> dict[str, torch.Tensor]:
        """A per-dim loss (B, k, A) in chunk layout -> {name_arm, name_gripper, action_loss} with the config weights."""
        out = {f"{name}_arm": self.masked_mean(per[..., : self.num_arm], mask)}
        total = loss_cfg.arm_weight * out[f"{name}_arm"]
        if self.num_gripper:
            out[f"{name}_gripper"] = self.masked_mean(per[..., self.num_arm:], mask)
            total = total + loss_cfg.gripper_weight * out[f"{name}_gripper"]
        out["action_loss"] = total
        return out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t (B,) in [0, 1] (scaled by 1000, as in DDPM) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, emb.new_zeros(t.shape[0], dim - 2 * half)], dim=-1)


def decoder_layer(width: int, num_heads: int, dropout: float) -> nn.TransformerDecoderLayer:
    return nn.TransformerDecoderLayer(width, num_heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                      norm_first=True)


class ChunkDenoiser(nn.Module):
    """The network of the `flow` and `diffusion` heads: a noisy chunk (B, k, A) and its time t (B,) in [0, 1] ->
    (B, k, A) (a velocity or a noise estimate). The k action tokens (+ position + time embedding) self-attend and
    cross-attend to the readouts, as the CVAE decoder's queries do."""

    def __init__(self, action_dim: int, chunk: int, trunk_width: int, width: int, num_heads: int, num_layers: int,
                 dropout: float):
        super().__init__()
        self.width = width
        self.action_in = nn.Linear(action_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, chunk, width))
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.readout_in = nn.Linear(trunk_width, width)
        self.decoder = nn.TransformerDecoder(decoder_layer(width, num_heads, dropout), num_layers)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, action_dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, readouts: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.width).to(x.dtype))
        h = self.action_in(x) + self.pos + temb[:, None]
        memory = torch.cat([self.readout_in(readouts), temb[:, None]], dim=1)
        return self.out(self.norm(self.decoder(h, memory)))
