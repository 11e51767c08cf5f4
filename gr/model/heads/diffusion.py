"""Denoising-diffusion action head (Diffusion Policy / Octo style): DDPM training, DDIM sampling.

The schedules are `diffusers`' DDPMScheduler (training: `add_noise` at a random timestep of
`model.robot.head.train_timesteps`, squared-cosine betas) and DDIMScheduler with the same betas (inference:
`model.robot.head.num_steps` deterministic steps, eta = 0). The network predicts the added noise (epsilon) from the
noisy chunk, its timestep and the readouts. Samples are not clipped: the arm dims are z-scores, not values in [-1, 1].
The initial noise comes from the given generator, so the same seed gives the same chunk.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from gr.config import FinetuneLossConfig, RobotConfig
from gr.model.heads.base import ActionHead, ChunkDenoiser


class DiffusionActionHead(ActionHead):
    kind = "diffusion"

    def __init__(self, cfg: RobotConfig, trunk_width: int):
        super().__init__(cfg, trunk_width)
        from diffusers import DDIMScheduler, DDPMScheduler  # imported here: only this head needs diffusers

        h = cfg.head
        self.num_steps, self.train_timesteps = h.num_steps, h.train_timesteps
        kw = dict(num_train_timesteps=h.train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                  prediction_type="epsilon")
        self.train_scheduler, self.sampler = DDPMScheduler(**kw), DDIMScheduler(**kw)
        self.net = ChunkDenoiser(cfg.action_dim, cfg.action_chunk, trunk_width, h.width, h.num_heads,
                                 h.num_decoder_layers, h.dropout)

    def _losses(self, readouts: torch.Tensor, batch: dict[str, Any], loss_cfg: FinetuneLossConfig,
               sample: bool = True) -> dict[str, torch.Tensor]:
        x0 = self.chunk(batch).to(readouts.dtype)
        noise = torch.randn_like(x0)
        steps = torch.randint(0, self.train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.train_scheduler.add_noise(x0, noise, steps)
        per = (self.net(noisy, steps.float() / self.train_timesteps, readouts).float() - noise.float()).pow(2)
        return self.arm_gripper_terms(per, batch["action_mask"].bool(), loss_cfg, "diffusion_mse")

    def _predict(self, readouts: torch.Tensor, generator: Optional[torch.Generator] = None):
        b, k, a = readouts.shape[0], self.cfg.action_chunk, self.cfg.action_dim
        x = torch.randn(b, k, a, generator=generator, device=readouts.device, dtype=readouts.dtype)
        self.sampler.set_timesteps(self.num_steps, device=readouts.device)
        for step in self.sampler.timesteps:
            eps = self.net(x, x.new_full((b,), float(step) / self.train_timesteps), readouts)
            x = self.sampler.step(eps, step, x, eta=0.0).prev_sample
        return self.split(x)
