"""Streaming text-video clips from webdataset shards.

Each sample is `{key}.mp4` + `{key}.json` (caption, fps, source, optional start/end seconds). mp4 bytes are decoded with
decord straight from memory; no pickle decoder ever runs on shard contents.

Determinism and resume: the shard order and the shuffle buffer are seeded by (seed, epoch, rank, worker), and each
sample carries `(worker, raw position)`. A loader can therefore resume mid-epoch by skipping, without decoding, the raw
samples each worker had already produced (see `ClipStreamLoader` in datamodule.py).

Bad samples (truncated/corrupt mp4, unreadable json, non-string caption, too short) are skipped, logged with shard
URL and key, and counted: the count travels with the next good sample as `num_skipped`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from gr.config import ClipSpec
from gr.data.video_io import VideoDecodeError, get_frames, open_video, resample_indices, resize_center_crop

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A shard sample that must be skipped; the message names the field."""


def expand_urls(spec: str | list[str], field: str) -> list[str]:
    """Brace-expand shard specs; check local files exist (remote `pipe:`/URL specs are passed through)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in braceexpand.braceexpand(s)]
    if not urls:
        raise ValueError(f"{field}: no shards given")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u):
            raise ValueError(f"{field}: shard file not found: {u!r}")
    return urls


def parse_meta(raw: bytes, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(f"{key}.json: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise SampleError(f"{key}.json: expected an object, got {type(meta).__name__}")
    if not isinstance(meta.get("caption"), str):
        raise SampleError(f"{key}.json: field 'caption' must be a string, got {type(meta.get('caption')).__name__}")
    for name in ("start", "end"):
        if meta.get(name) is not None and not isinstance(meta[name], (int, float)):
            raise SampleError(f"{key}.json: field {name!r} must be a number")
    return meta


def decode_clip(mp4: bytes, meta: dict[str, Any], clip: ClipSpec, rng: random.Random, key: str) -> np.ndarray:
    """mp4 bytes -> uint8 (num_history + 1, S, S, 3) frames at clip.frame_offsets, sampled at clip.fps."""
    try:
        vr = open_video(mp4)
        idx = resample_indices(len(vr), vr.get_avg_fps(), clip.fps, meta.get("start") or 0.0, meta.get("end"))
        if len(idx) < clip.span:
            raise SampleError(f"{key}.mp4: {len(idx)} frames at {clip.fps} fps, clip needs {clip.span}")
        first = rng.randrange(len(idx) - clip.span + 1)
        frames = get_frames(vr, [int(idx[first + o]) for o in clip.frame_offsets])
    except VideoDecodeError as exc:
        raise SampleError(f"{key}.mp4: {exc}") from exc
    return resize_center_crop(frames, clip.image_size)


@dataclass
class StreamState:
    """Where a clip stream is: epoch, and raw samples already produced per worker in that epoch."""

    epoch: int = 0
    positions: Optional[dict[int, int]] = None


class ClipStream(IterableDataset):
    """Iterable of {"frames": uint8 (Tc, S, S, 3), "caption", "key", "num_skipped", "position": (epoch, worker, pos)}.

    Args:
        urls: shard URLs (already expanded).
        clip: what the model needs (frame offsets, fps, size).
        shuffle: shuffle shards and samples (seeded per epoch); otherwise stream in order with deterministic clips.
        shuffle_buffer: samples held in the shuffle buffer per worker.
        seed: base seed.
    """

    def __init__(self, urls: list[str], clip: ClipSpec, shuffle: bool = True, shuffle_buffer: int = 256,
                 seed: int = 0):
        super().__init__()
        self.urls = list(urls)
        self.clip = clip
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.state = StreamState()

    def _split(self) -> tuple[list[str], int, int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.state.epoch}").shuffle(urls)
        urls = urls[rank::world][worker::num_workers]  # split by node/rank, then by worker
        if not urls:
            log.warning("rank %d worker %d has no shards (%d shards for %d ranks x %d workers)",
                        rank, worker, len(self.urls), world, num_workers)
        return urls, rank, worker

    def _raw_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        def on_tar_error(exc: Exception) -> bool:
            log.warning("skipping unreadable shard data: %r", exc)
            return True

        yield from wds.tarfile_to_samples(handler=on_tar_error)(iter([{"url": u} for u in urls]))

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls, rank, worker = self._split()
        epoch = self.state.epoch
        skip = (self.state.positions or {}).get(worker, 0)
        rng = random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")
        num_skipped = 0
        for pos, raw in enumerate(self._shuffled(self._raw_samples(urls), rng), start=1):
            if pos <= skip:
                continue  # resume: this sample was consumed before the checkpoint
            key = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            clip_rng = random.Random(f"{self.seed}-{epoch}-{key}")
            try:
                if "mp4" not in raw or "json" not in raw:
                    raise SampleError(f"{key}: missing {'mp4' if 'mp4' not in raw else 'json'} member")
                meta = parse_meta(raw["json"], key)
                frames = decode_clip(raw["mp4"], meta, self.clip, clip_rng, key)
            except SampleError as exc:
                num_skipped += 1
                log.warning("skipped sample (%d so far in rank %d worker %d): %s", num_skipped, rank, worker, exc)
                continue
            yield {"frames": torch.from_numpy(frames), "caption": meta["caption"], "key": key,
                   "num_skipped": num_skipped, "position": torch.tensor([epoch, worker, pos])}
            num_skipped = 0
