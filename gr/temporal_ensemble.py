"""ACT's temporal ensembling: a chunk is predicted at every step, and the action for step t averages every prediction
made for t by the chunks still covering it, with weights exp(-m * i) where i = 0 is the OLDEST prediction (ACT's
choice: the earliest prediction weighs most, which smooths the motion)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


class TemporalEnsemble:
    """Keeps the chunks (k, A) predicted at earlier steps and blends their entries for the current step.

    Args:
        m: the decay of the weights exp(-m * i); 0 = plain average.
        postprocess: applied to the blended action (e.g. snapping binary gripper dims back to their range's ends).
    """

    def __init__(self, m: float, postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        if m < 0:
            raise ValueError(f"temporal_ensemble: the decay m must be >= 0, got {m}")
        self.m, self.postprocess = m, postprocess
        self.reset()

    def reset(self) -> None:
        self._chunks: list[tuple[int, np.ndarray]] = []  # (step the chunk was predicted at, chunk)
        self.t = 0

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """Add the chunk predicted at the current step; return this step's action (A,) and advance one step."""
        self._chunks = [(t0, c) for t0, c in self._chunks if self.t - t0 < len(c)] + [(self.t, chunk)]
        preds = np.stack([c[self.t - t0] for t0, c in self._chunks])  # oldest first
        w = np.exp(-self.m * np.arange(len(preds)))
        self.t += 1
        action = ((w[:, None] * preds).sum(0) / w.sum()).astype(np.float32)
        return self.postprocess(action) if self.postprocess is not None else action
