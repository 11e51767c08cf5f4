"""Robot units <-> model units, in one place: the data pipeline (training windows), the policy (observations in,
action chunks out), rollouts and the `tokens` head's bins all use these rules.

- state and arm actions: z-scores by the dataset's mean and std, the std floored at `STD_FLOOR` so that a constant
  dimension does not blow up;
- gripper dims (`model.robot.gripper_dims`): {0, 1} targets split at the midpoint of the dim's range; model scores
  > 0 map back to the range's high end, else its low end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

STD_FLOOR = 1e-3


@dataclass(frozen=True)
class Normalizer:
    """Arrays from the dataset statistics ({"state"/"action": {"mean", "std", "min", "max"}}) and the dim split."""

    state_mean: np.ndarray
    state_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray
    action_low: np.ndarray
    action_high: np.ndarray
    arm_index: np.ndarray
    gripper_index: np.ndarray

    @classmethod
    def from_stats(cls, stats: dict[str, Any], arm_index: list[int], gripper_index: list[int]) -> "Normalizer":
        s, a = stats["state"], stats["action"]
        f = lambda x: np.asarray(x, np.float32)  # noqa: E731
        return cls(f(s["mean"]), np.maximum(f(s["std"]), STD_FLOOR), f(a["mean"]), np.maximum(f(a["std"]), STD_FLOOR),
                   f(a["min"]), f(a["max"]), np.asarray(arm_index, np.int64), np.asarray(gripper_index, np.int64))

    @property
    def gripper_mid(self) -> np.ndarray:
        return (self.action_low + self.action_high) / 2

    # ---- robot units -> model units ----
    def state(self, state: np.ndarray) -> np.ndarray:
        """(..., S) robot units -> z-scores (float32)."""
        return ((np.asarray(state, np.float32) - self.state_mean) / self.state_std).astype(np.float32)

    def arm(self, action: np.ndarray) -> np.ndarray:
        """(..., A) robot units -> the arm dims' z-scores (..., A_arm)."""
        return ((np.asarray(action, np.float32) - self.action_mean) / self.action_std)[..., self.arm_index]

    def gripper(self, action: np.ndarray) -> np.ndarray:
        """(..., A) robot units -> gripper targets in {0, 1} (..., A_grip)."""
        gi = self.gripper_index
        return (np.asarray(action)[..., gi] > self.gripper_mid[gi]).astype(np.float32)

    # ---- model units -> robot units ----
    def to_robot(self, arm: np.ndarray, gripper_scores: Optional[np.ndarray]) -> np.ndarray:
        """arm z-scores (..., A_arm) and gripper scores (..., A_grip) (> 0: high end) -> actions (..., A)."""
        ai, gi = self.arm_index, self.gripper_index
        out = np.zeros((*np.shape(arm)[:-1], len(self.action_mean)), np.float32)
        out[..., ai] = np.asarray(arm) * self.action_std[ai] + self.action_mean[ai]
        if len(gi):
            out[..., gi] = np.where(np.asarray(gripper_scores) > 0, self.action_high[gi], self.action_low[gi])
        return out

    def snap_gripper(self, action: np.ndarray) -> np.ndarray:
        """Robot-unit actions whose gripper dims were averaged -> each snapped to the nearer end of its range."""
        gi = self.gripper_index
        out = np.array(action, np.float32)
        if len(gi):
            out[..., gi] = np.where(out[..., gi] > self.gripper_mid[gi], self.action_high[gi], self.action_low[gi])
        return out
