"""Robot episode shards: the on-disk format every importer writes and robot finetuning reads.

One webdataset sample per episode:
    {key}.{view}.mp4   one H.264 video per camera view, all with T frames
    {key}.state.npy    float32 [T, S]   robot state in robot units
    {key}.action.npy   float32 [T, A]   action taken at each step, in robot units
    {key}.json         {"instruction", "fps", "views" (sorted), "num_frames", "source", "stats", ...}

`stats` holds the dataset's normalization statistics (mean, std, min, max per dimension of state and action), computed
over every episode at conversion time; the same block is written to `<out>/<prefix>-stats.json`. Because the statistics
are known only once every episode has been seen, shards are first written under temporary names and rewritten with the
statistics when the writer closes (mp4 bytes are copied, not re-encoded).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from gr.data.video_io import encode_mp4
from gr.normalization import Normalizer


@dataclass
class Episode:
    """One demonstration in memory.

    Args:
        frames: view name -> uint8 (T, H, W, 3).
        state: float (T, S) robot state.
        action: float (T, A) actions.
        instruction: natural-language task description.
        fps: control / camera rate.
        extra: more json fields (task name, success, source episode id, ...).
    """

    frames: dict[str, np.ndarray]
    state: np.ndarray
    action: np.ndarray
    instruction: str
    fps: float
    extra: dict[str, Any] = field(default_factory=dict)


def check_episode(ep: Episode, where: str, views: Optional[list[str]] = None) -> None:
    """Raise a ValueError naming `where` and the offending key when an episode is malformed."""
    if not ep.frames:
        raise ValueError(f"{where}: no camera views")
    if views is not None and sorted(ep.frames) != sorted(views):
        raise ValueError(f"{where}: views {sorted(ep.frames)} differ from the dataset's {sorted(views)}")
    t = len(ep.state)
    if t == 0:
        raise ValueError(f"{where}: empty episode (0 steps)")
    if ep.state.ndim != 2 or ep.action.ndim != 2:
        raise ValueError(f"{where}: state and action must be [T, dim], got {ep.state.shape} and {ep.action.shape}")
    if len(ep.action) != t:
        raise ValueError(f"{where}: state has {t} steps but action has {len(ep.action)}")
    for view, frames in ep.frames.items():
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{where}: view {view!r} frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                             f"{frames.shape}")
        if len(frames) != t:
            raise ValueError(f"{where}: view {view!r} has {len(frames)} frames but state has {t} steps")
    if not isinstance(ep.instruction, str) or not ep.instruction.strip():
        raise ValueError(f"{where}: missing instruction")
    if not np.isfinite(ep.state).all() or not np.isfinite(ep.action).all():
        raise ValueError(f"{where}: state or action contains NaN/inf")


class RunningStats:
    """Per-dimension mean, std, min and max over many [T, D] arrays (float64 sums)."""

    def __init__(self):
        self.n, self.sum, self.sq, self.min, self.max = 0, None, None, None, None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if self.sum is None:
            self.sum, self.sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
            self.min, self.max = np.full(x.shape[1], np.inf), np.full(x.shape[1], -np.inf)
        if x.shape[1] != len(self.sum):
            raise ValueError(f"dimension changed from {len(self.sum)} to {x.shape[1]}")
        self.n += len(x)
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        self.min, self.max = np.minimum(self.min, x.min(0)), np.maximum(self.max, x.max(0))

    def result(self) -> dict[str, list[float]]:
        mean = self.sum / max(1, self.n)
        std = np.sqrt(np.maximum(self.sq / max(1, self.n) - mean * mean, 0.0))
        return {"mean": mean.tolist(), "std": std.tolist(), "min": self.min.tolist(), "max": self.max.tolist()}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class EpisodeShardWriter:
    """Write episodes to `{out_dir}/{prefix}-%06d.tar` and the dataset statistics into every episode's json.

    Args:
        out_dir: output folder.
        prefix: shard file prefix (e.g. "train").
        max_per_shard: episodes per tar.
        source: dataset name recorded in the json.
        crf: H.264 quality (lower is better; 18 is visually lossless at small sizes).
    """

    def __init__(self, out_dir: str, prefix: str = "train", max_per_shard: int = 32, source: str = "",
                 crf: int = 18):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.max_per_shard, self.source, self.crf = out_dir, prefix, max_per_shard, source, crf
        self.views: Optional[list[str]] = None
        self.state_stats, self.action_stats = RunningStats(), RunningStats()
        self.count, self.num_frames = 0, 0
        self.shards: list[str] = []
        self._writer = None
        self._in_shard = 0

    def write(self, key: str, ep: Episode) -> None:
        check_episode(ep, f"episode {key!r}", self.views)
        import webdataset as wds

        if self.views is None:
            self.views = sorted(ep.frames)
        if self._writer is None or self._in_shard >= self.max_per_shard:
            self._close_shard()
            self.shards.append(os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar"))
            self._writer = wds.TarWriter(self.shards[-1] + ".partial")
            self._in_shard = 0
        sample = {"__key__": key, "state.npy": _npy(ep.state.astype(np.float32)),
                  "action.npy": _npy(ep.action.astype(np.float32))}
        for view in self.views:
            sample[f"{view}.mp4"] = encode_mp4(ep.frames[view], ep.fps, crf=self.crf)
        meta = {"instruction": ep.instruction, "fps": float(ep.fps), "views": self.views, "num_frames": len(ep.state),
                "source": self.source, **ep.extra}
        sample["json"] = json.dumps(meta).encode()
        self._writer.write(sample)
        self.state_stats.update(ep.state)
        self.action_stats.update(ep.action)
        self._in_shard += 1
        self.count += 1
        self.num_frames += len(ep.state)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def stats(self) -> dict[str, Any]:
        return {"state": self.state_stats.result(), "action": self.action_stats.result(),
                "num_episodes": self.count, "num_frames": self.num_frames}

    def close(self) -> dict[str, Any]:
        """Finish: put the statistics into every json, rename shards into place, write `<prefix>-stats.json`."""
        import webdataset as wds

        self._close_shard()
        if self.count == 0:
            raise ValueError(f"{self.out_dir}: no episodes were written (empty dataset)")
        stats = self.stats()
        for final in self.shards:
            with wds.TarWriter(final + ".tmp") as out:
                for raw in wds.tarfile_to_samples()(iter([{"url": final + ".partial"}])):
                    sample = {k: v for k, v in raw.items() if not k.startswith("__")}
                    meta = json.loads(sample["json"])
                    meta["stats"] = stats
                    sample["json"] = json.dumps(meta).encode()
                    out.write({"__key__": raw["__key__"], **sample})
            os.replace(final + ".tmp", final)
            os.remove(final + ".partial")
        with open(os.path.join(self.out_dir, f"{self.prefix}-stats.json"), "w") as f:
            json.dump({**stats, "views": self.views, "shards": self.pattern}, f, indent=2)
        return stats

    @property
    def pattern(self) -> str:
        n = len(self.shards)
        if n <= 1:
            return self.shards[0] if n else ""
        return os.path.join(self.out_dir, f"{self.prefix}-{{000000..{n - 1:06d}}}.tar")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._close_shard()


# ---------------------------------------------------------------------------------------------------------------------
# Reading: training windows cut from episodes.
# ---------------------------------------------------------------------------------------------------------------------

def window_indices(num_steps: int, t: int, num_history: int, offset: int, chunk: int, stride: int = 1):
    """History steps (clamped at the episode start), the future step (clamped at the end), the chunk steps and their
    validity (False past the episode end, where the last action is repeated as padding)."""
    history = [max(0, t - (num_history - 1 - i) * stride) for i in range(num_history)]
    future = min(num_steps - 1, t + offset)
    steps = np.arange(t, t + chunk)
    return history, future, np.minimum(steps, num_steps - 1), steps < num_steps


def make_windows(frames: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray, norm: Normalizer,
                 views: list[str], steps: list[int], num_history: int, offset: int, chunk: int, stride: int = 1):
    """Cut training windows at the given steps. frames[v]: (T, ...) frames or codes. Yields dicts of arrays:
    history (Th, Nv, ...), future (Nv, ...), state (Th, S), arm (k, A_arm), gripper (k, A_grip), action_mask (k,)."""
    s, arm, grip = norm.state(state), norm.arm(action), norm.gripper(action)
    for t in steps:
        hist, fut, chunk_idx, valid = window_indices(len(state), t, num_history, offset, chunk, stride)
        yield {"history": np.stack([np.stack([frames[v][i] for v in views]) for i in hist]),
               "future": np.stack([frames[v][fut] for v in views]), "state": s[hist].astype(np.float32),
               "arm": arm[chunk_idx].astype(np.float32), "gripper": grip[chunk_idx], "action_mask": valid,
               "step": t}
