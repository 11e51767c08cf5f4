"""Conditional flow-matching action head (pi0 / GR-3 style) over the whole chunk.

Training: noise x0 ~ N(0, I) and the true chunk x1 (B, k, A) in the shared chunk layout (gripper dims as -1 / +1), a
time t ~ U(0, 1), the straight path x_t = (1 - t) x0 + t x1, and the network regresses the constant velocity
x1 - x0 (masked MSE, arm and gripper terms weighted by `loss.arm_weight` / `loss.gripper_weight`).
Inference: Euler integration of dx/dt = v(x, t | readouts) from x0 at t = 0 to t = 1 in `model.robot.head.num_steps`
equal steps. x0 is drawn from the given generator, so the same seed gives the same chunk.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from gr.config import FinetuneLossConfig, RobotConfig
from gr.model.heads.base import ActionHead, ChunkDenoiser


class FlowActionHead(ActionHead):
    kind = "flow"

    def __init__(self, cfg: RobotConfig, trunk_width: int):
        super().__init__(cfg, trunk_width)
        h = cfg.head
        self.num_steps = h.num_steps
        self.net = ChunkDenoiser(cfg.action_dim, cfg.action_chunk, trunk_width, h.width, h.num_heads,
                                 h.num_decoder_layers, h.dropout)

    def _losses(self, readouts: torch.Tensor, batch: dict[str, Any], loss_cfg: FinetuneLossConfig,
               sample: bool = True) -> dict[str, torch.Tensor]:
        x1 = self.chunk(batch).to(readouts.dtype)
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        per = (self.net(xt, t, readouts).float() - (x1 - x0).float()).pow(2)
        return self.arm_gripper_terms(per, batch["action_mask"].bool(), loss_cfg, "flow_mse")

    def _predict(self, readouts: torch.Tensor, generator: Optional[torch.Generator] = None):
        b, k, a = readouts.shape[0], self.cfg.action_chunk, self.cfg.action_dim
        x = torch.randn(b, k, a, generator=generator, device=readouts.device, dtype=readouts.dtype)
        dt = 1.0 / self.num_steps
        for i in range(self.num_steps):
            t = x.new_full((b,), i * dt)
            x = x + dt * self.net(x, t, readouts)
        return self.split(x)
