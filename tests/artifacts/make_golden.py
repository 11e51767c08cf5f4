"""Regenerate tests/artifacts/golden_tiny.safetensors: a tiny robot GR model's outputs on fixed inputs.

    python tests/artifacts/make_golden.py

tests/test_golden.py recomputes the same values and compares, so a refactor that changes numbers is seen. Rerun this
script only when a change of numbers is intended, and say why in the commit.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
GOLDEN = os.path.join(HERE, "golden_tiny.safetensors")


def compute() -> dict[str, torch.Tensor]:
    """Seeded tiny model (tests.conftest.TINY_ROBOT_MODEL: 2 views, 4x4 codes, 64 codes) on seeded inputs."""
    from gr.config import GRModelConfig
    from gr.model import GRModel
    from tests.conftest import TINY_ROBOT_MODEL

    torch.manual_seed(0)
    model = GRModel(GRModelConfig(**TINY_ROBOT_MODEL), 64, 4, 16).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 16, generator=g)  # (B, L, D) text features
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    hist = torch.randint(0, 64, (2, 2, 2, 4, 4), generator=g)  # (B, Th, Nv, h, w)
    fut = torch.randint(0, 64, (2, 2, 4, 4), generator=g)  # (B, Nv, h, w)
    state = torch.randn(2, 2, 4, generator=g)  # (B, Th, S)
    with torch.no_grad():
        logits, readouts = model(text, mask, hist, fut, state)
        arm, gripper = model.action_head.predict(readouts)
    greedy = model.generate_future_frame(text, mask, hist, state=state)
    sampled = model.generate_future_frame(text, mask, hist, state=state, temperature=1.0, top_k=8,
                                          generator=torch.Generator().manual_seed(2))
    out = {"logits": logits, "readouts": readouts, "arm": arm, "greedy_codes": greedy, "sampled_codes": sampled}
    if gripper is not None:
        out["gripper_logits"] = gripper
    return {k: v.detach().contiguous() for k, v in out.items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    values = compute()
    save_file(values, GOLDEN)
    print({k: tuple(v.shape) for k, v in values.items()}, "->", GOLDEN)
