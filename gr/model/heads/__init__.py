"""Action heads behind one interface (gr.model.heads.base.ActionHead), chosen by `model.robot.head.kind`."""

from __future__ import annotations

from gr.config import RobotConfig
from gr.model.heads.base import ActionHead
from gr.model.heads.cvae import CVAEActionHead
from gr.model.heads.flow import FlowActionHead
from gr.model.heads.tokens import TokenActionHead

__all__ = ["ActionHead", "CVAEActionHead", "FlowActionHead", "TokenActionHead", "build_action_head"]


def build_action_head(cfg: RobotConfig, trunk_width: int) -> ActionHead:
    """The head `cfg.head.kind` names (the config validates the kind)."""
    kind = cfg.head.kind
    if kind == "cvae":
        return CVAEActionHead(cfg, trunk_width)
    if kind == "flow":
        return FlowActionHead(cfg, trunk_width)
    if kind == "diffusion":
        from gr.model.heads.diffusion import DiffusionActionHead  # diffusers is imported only when used

        return DiffusionActionHead(cfg, trunk_width)
    if kind == "tokens":
        return TokenActionHead(cfg, trunk_width)
    raise ValueError(f"model.robot.head.kind: unknown head {kind!r}")
