"""ACT-style conditional VAE action head over the GPT's readout tokens.

Legend: B batch, R readout tokens, C trunk width, D head width, k chunk length, A action dims, Z latent size.

    training:   [CLS, a_0 .. a_{k-1}] -> encoder -> CLS -> (mu, logvar) -> z = mu + sigma * eps
    inference:  z = 0 (the prior mean)
    decoder:    k learned queries attend to memory = [readouts (R), z (1)] -> arm (k, A_arm), gripper logits (k, A_grip)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gr.config import FinetuneLossConfig, RobotConfig
from gr.model.heads.base import ActionHead


class CVAEActionHead(ActionHead):
    """Readout features (+ ground-truth chunk in training) -> action chunk.

    Args:
        cfg: the robot config (action sizes, chunk length, head sizes).
        trunk_width: C, the width of the readout features.
    """

    kind = "cvae"

    def __init__(self, cfg: RobotConfig, trunk_width: int):
        super().__init__(cfg, trunk_width)
        h = cfg.head
        self.latent_dim = h.latent_dim

        def layer(decoder: bool):
            cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
            return cls(h.width, h.num_heads, 4 * h.width, h.dropout, activation="gelu", batch_first=True,
                       norm_first=True)

        # CVAE encoder (training only): what in the true chunk the readouts do not already explain.
        self.action_in = nn.Linear(cfg.action_dim, h.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, h.width))
        self.enc_pos = nn.Parameter(torch.zeros(1, cfg.action_chunk + 1, h.width))
        self.encoder = nn.TransformerEncoder(layer(False), h.num_encoder_layers, enable_nested_tensor=False)
        self.to_latent = nn.Linear(h.width, 2 * h.latent_dim)
        # Decoder.
        self.readout_in = nn.Linear(trunk_width, h.width)
        self.latent_in = nn.Linear(h.latent_dim, h.width)
        self.queries = nn.Parameter(torch.zeros(1, cfg.action_chunk, h.width))
        self.decoder = nn.TransformerDecoder(layer(True), h.num_decoder_layers)
        self.norm = nn.LayerNorm(h.width)
        self.arm_out = nn.Linear(h.width, len(self.arm_index))
        self.gripper_out = nn.Linear(h.width, len(self.gripper_index)) if self.gripper_index else None
        for p in (self.cls, self.enc_pos, self.queries):
            nn.init.normal_(p, std=0.02)

    def encode(self, actions: torch.Tensor, action_mask: torch.Tensor):
        """Normalized ground-truth chunk (B, k, A) and its validity (B, k) -> mu, logvar (B, Z)."""
        x = torch.cat([self.cls.expand(actions.shape[0], -1, -1), self.action_in(actions)], dim=1) + self.enc_pos
        pad = torch.cat([action_mask.new_zeros(actions.shape[0], 1), ~action_mask], dim=1)  # True = ignore
        h = self.encoder(x, src_key_padding_mask=pad)[:, 0]
        mu, logvar = self.to_latent(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, readouts: torch.Tensor, z: torch.Tensor):
        """readouts (B, R, C), z (B, Z) -> arm (B, k, A_arm), gripper logits (B, k, A_grip) or None."""
        memory = torch.cat([self.readout_in(readouts), self.latent_in(z)[:, None]], dim=1)
        q = self.queries.expand(readouts.shape[0], -1, -1)
        h = self.norm(self.decoder(q, memory))
        return self.arm_out(h), (self.gripper_out(h) if self.gripper_out is not None else None)

    def run(self, readouts: torch.Tensor, actions: Optional[torch.Tensor] = None,
            action_mask: Optional[torch.Tensor] = None, sample: bool = True):
        """With `actions` (training): posterior latent; else the prior mean z = 0.

        Returns (arm (B, k, A_arm), gripper logits or None, mu or None, logvar or None).
        """
        if actions is None:
            z = readouts.new_zeros(readouts.shape[0], self.latent_dim)
            return (*self.decode(readouts, z), None, None)
        if action_mask is None:
            action_mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
        mu, logvar = self.encode(actions, action_mask)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return (*self.decode(readouts, z), mu, logvar)

    def _losses(self, readouts: torch.Tensor, batch: dict[str, Any], loss_cfg: FinetuneLossConfig,
               sample: bool = True) -> dict[str, torch.Tensor]:
        """arm L1 (or smooth L1) + gripper BCE + KL(posterior || N(0, I)), padding masked. `sample`: draw the latent
        from the posterior (training) or take its mean (validation)."""
        mask = batch["action_mask"].bool()
        arm, grip, mu, logvar = self.run(readouts, self.chunk(batch), mask, sample=sample)
        err = arm.float() - batch["arm"]
        per = err.abs() if loss_cfg.arm_loss == "l1" else F.smooth_l1_loss(arm.float(), batch["arm"], reduction="none")
        out = {"arm": self.masked_mean(per, mask), "arm_l1": self.masked_mean(err.abs(), mask).detach(),
               "kl": (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()}
        if grip is not None:
            bce = F.binary_cross_entropy_with_logits(grip.float(), batch["gripper"], reduction="none")
            out["gripper_bce"] = self.masked_mean(bce, mask)
            out["gripper_acc"] = self.masked_mean(((grip > 0).float() == batch["gripper"]).float(), mask).detach()
        else:
            out["gripper_bce"] = out["arm"].new_zeros(())
        out["action_loss"] = (loss_cfg.arm_weight * out["arm"] + loss_cfg.gripper_weight * out["gripper_bce"]
                              + loss_cfg.kl_weight * out["kl"])
        return out

    def _predict(self, readouts: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The prior mean latent z = 0 (deterministic; `generator` is unused)."""
        arm, grip, _, _ = self.run(readouts)
        return arm, grip
