"""Video co-training during robot finetuning: `data.cotrain: {shards, weight}` of RobotDataModule.

Each training step takes either a robot batch or a text-video batch (captioned clips, mp4 or pre-tokenized), video
with probability `weight`. The choice for the k-th consumed batch is a pure function of (seed, k), so the mix is
deterministic under the seed and a resumed run continues the same sequence: the loader restores k and both streams'
positions (each a ResumableLoader, so each resumes mid-epoch). The robot stream's epochs are the epochs; the video
stream is resampled (endless). Video batches train the frame loss only (gr/model/video_mode.py); the finetuning
module logs their terms under `train/cotrain/`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from gr.config import ConfigError


@dataclass
class CotrainConfig:
    """shards: text-video shard pattern(s); weight: the fraction of steps that are video batches, in [0, 1);
    shard_format: "tokens" (data_prep/tokenize_shards.py output, made with the model's VQGAN) or "video" (mp4);
    view: the camera the clips stand in for (default: the model's first view); fps and future_frame_offset: how clips
    are cut (the predicted frame is `future_frame_offset` frames ahead at `fps`), as in pretraining."""

    shards: Any = None
    weight: float = 0.0
    shard_format: str = "tokens"
    view: Optional[str] = None
    fps: float = 10.0
    future_frame_offset: int = 1

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("data.cotrain.shards: a text-video shard pattern is needed")
        if not (isinstance(self.weight, (int, float)) and 0.0 <= self.weight < 1.0):
            raise ConfigError(f"data.cotrain.weight: must be in [0, 1), got {self.weight!r}")
        if self.shard_format not in ("tokens", "video"):
            raise ConfigError(f"data.cotrain.shard_format: must be 'tokens' or 'video', got {self.shard_format!r}")
        if not self.fps > 0 or self.future_frame_offset < 1:
            raise ConfigError("data.cotrain.fps must be > 0 and data.cotrain.future_frame_offset >= 1")


def is_video_step(seed: int, k: int, weight: float) -> bool:
    """Whether the k-th consumed training batch is a video batch."""
    return weight > 0 and random.Random(f"{seed}-cotrain-{k}").random() < weight


class CotrainLoader:
    """Robot batches and video batches interleaved by `is_video_step`; Lightning checkpoints it like a loader.

    Args:
        robot: the robot ResumableLoader (its epochs are this loader's).
        video: a ResumableLoader of text-video clips (resampled: never exhausted).
        weight, seed: the mix.
        view: index of the camera that video batches stand in for (added to every video batch as `view`).
    """

    def __init__(self, robot, video, weight: float, seed: int, view: int):
        self.robot, self.video, self.weight, self.seed, self.view = robot, video, weight, seed, view
        self.consumed = 0  # batches handed to training steps, robot and video together
        self.counts = {"robot": 0, "video": 0}
        self._video_iter: Optional[Iterator] = None

    def _next_video(self) -> dict[str, Any]:
        if self._video_iter is None:
            self._video_iter = iter(self.video)
        try:
            return next(self._video_iter)
        except StopIteration:  # an epoch of a finite video stream: start its next one
            self._video_iter = iter(self.video)
            return next(self._video_iter)

    def __iter__(self):
        robot_iter = iter(self.robot)
        self._video_iter = None  # resumes from the video loader's consumed positions
        k = self.consumed
        while True:
            if is_video_step(self.seed, k, self.weight):
                batch = {**self._next_video(), "view": self.view}
            else:
                try:
                    batch = next(robot_iter)
                except StopIteration:
                    return
            k += 1
            yield batch

    def mark_consumed(self, batch: dict[str, Any]) -> None:
        video = "caption" in batch
        (self.video if video else self.robot).mark_consumed(batch["position"])
        self.counts["video" if video else "robot"] += 1
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "counts": dict(self.counts), "robot": self.robot.state_dict(),
                "video": self.video.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self.counts = dict(state.get("counts", self.counts))
        self.robot.load_state_dict(state["robot"])
        self.video.load_state_dict(state["video"])
