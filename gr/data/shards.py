"""Streaming text-video clips from webdataset shards.

Each sample is `{key}.mp4` + `{key}.json` (caption, fps, source, optional start/end seconds). mp4 bytes are decoded with
decord straight from memory; no pickle decoder ever runs on shard contents.

Determinism and resume: the shard order and the shuffle buffer are seeded by (seed, epoch, rank, worker), and each
sample carries `(worker, raw position)`. A loader can therefore resume mid-epoch by skipping, without decoding, the raw
samples each worker had already produced (see `ClipStreamLoader` in datamodule.py).

Several sources (`MixedClipStream`) are split by rank and worker each on its own, then interleaved by weight with an
rng seeded like the shuffle buffer, so the mixed stream is as deterministic as a single one and resumes the same way.

Pre-tokenized shards (`data_prep/tokenize_shards.py`) hold `{key}.tokens.npy` (uint16/int32 codes [T, h, w] of every
native frame, or of frames resampled to `tokens.fps`) instead of the mp4, and the json gains a `tokens` block naming the
tokenizer. Clips are cut from them with the same frame indices and the same random draws as from the mp4, so both forms
give identical batches for the same samples.

Bad samples (truncated/corrupt mp4 or npy, unreadable json, non-string caption, too short, codes from another
tokenizer) are skipped, logged with shard URL and key, and counted: the count travels with the next good sample as
`num_skipped`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from gr.config import ClipSpec, ConfigError
from gr.data.video_io import VideoDecodeError, get_frames, open_video, resample_indices, resize_center_crop

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A shard sample that must be skipped; the message names the field."""


def expand_urls(spec: str | list[str], field: str) -> list[str]:
    """Brace-expand shard specs; check local files exist (remote `pipe:`/URL specs are passed through)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in braceexpand.braceexpand(s)]
    if not urls:
        raise ConfigError(f"{field}: no shards given")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u):
            raise ConfigError(f"{field}: shard file not found: {u!r}")
    return urls


@dataclass
class ClipSource:
    """One set of text-video shards in a weighted pretraining mix (an entry of `data.train_sources`)."""

    shards: Any = None  # brace pattern or list of patterns (local tars or `pipe:` URLs); required
    weight: float = 1.0  # relative sampling weight, > 0: drawn weight / sum(weights) of the time while all have data

    def check(self, where: str) -> None:
        """Raise a ConfigError naming `where` (the source's config path, e.g. "data.train_sources[1]") and the field.

        Not in `__post_init__`: only the data module knows the source's index, and the message must name it."""
        if self.shards is None:
            raise ConfigError(f"{where}.shards is required (a brace pattern or a list of them)")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(f"{where}.weight must be a finite number > 0, got {self.weight!r}")


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


def tokens_spec_mismatch(info: Any, expected: dict[str, Any]) -> Optional[str]:
    """Why a sample's `tokens` json block does not fit the model's tokenizer, or None when it does."""
    if not isinstance(info, dict):
        return "json field 'tokens' is missing (not a pre-tokenized shard?)"
    for name in ("codebook_size", "image_size", "grid", "fingerprint"):
        if name in expected and info.get(name) != expected[name]:
            return (f"json field 'tokens.{name}' is {info.get(name)!r} but the model's tokenizer has {expected[name]!r}"
                    + (" (codes were made by a different VQGAN)" if name == "fingerprint" else ""))
    return None


def decode_token_clip(npy: bytes, meta: dict[str, Any], clip: ClipSpec, rng: random.Random, key: str,
                      expected: dict[str, Any]) -> np.ndarray:
    """tokens.npy bytes -> int64 (num_history + 1, h, w) codes at clip.frame_offsets; mirrors `decode_clip`."""
    why = tokens_spec_mismatch(meta.get("tokens"), expected)
    if why:
        raise SampleError(f"{key}.json: {why}")
    info = meta["tokens"]
    codes = load_codes(npy, info, f"{key}.tokens.npy", check_range=False)
    try:
        idx = resample_indices(len(codes), float(info["fps"]), clip.fps, meta.get("start") or 0.0, meta.get("end"))
    except VideoDecodeError as exc:
        raise SampleError(f"{key}.json: tokens.fps: {exc}") from exc
    if len(idx) < clip.span:
        raise SampleError(f"{key}.tokens.npy: {len(idx)} frames at {clip.fps} fps, clip needs {clip.span}")
    first = rng.randrange(len(idx) - clip.span + 1)
    out = codes[[int(idx[first + o]) for o in clip.frame_offsets]].astype(np.int64)
    check_code_range(out, info, f"{key}.tokens.npy")  # only the frames used: a long clip is not scanned whole
    return out


def load_codes(npy: bytes, info: dict[str, Any], where: str, check_range: bool = True) -> np.ndarray:
    """Pre-tokenized codes of one video or view (`<member>.tokens.npy`): uint16/int32 [T, h, w] with the grid of the
    json `tokens` block (already matched to the model by `tokens_spec_mismatch`), and every code in
    [0, codebook_size) unless `check_range` is False. Raises a SampleError naming `where` (shard:key.member)."""
    try:
        codes = np.load(io.BytesIO(npy), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt header raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise SampleError(f"{where}: not a readable npy array ({exc})") from exc
    grid = info.get("grid") or [None, None]
    if codes.ndim != 3 or codes.dtype not in (np.uint16, np.int32) or tuple(codes.shape[1:]) != tuple(grid):
        raise SampleError(f"{where}: expected uint16/int32 [T, {grid[0]}, {grid[1]}], got {codes.dtype} "
                          f"{list(codes.shape)}")
    if check_range:
        check_code_range(codes, info, where)
    return codes


def check_code_range(codes: np.ndarray, info: dict[str, Any], where: str) -> None:
    if codes.size and (int(codes.max()) >= int(info["codebook_size"]) or int(codes.min()) < 0):
        bad = int(codes.max()) if int(codes.max()) >= int(info["codebook_size"]) else int(codes.min())
        raise SampleError(f"{where}: code {bad} outside [0, codebook_size {info['codebook_size']})")


def reader_ids(worker_offset: int = 0) -> tuple[int, int, int, int]:
    """(rank, world size, DataLoader worker id, number of workers) of the calling reader.

    The worker id is logical: `(DataLoader worker id + worker_offset) % num_workers`. A DataLoader always asks its
    worker 0 for the first batch, so a loader resuming after `c` batches of an epoch passes `c % num_workers`: the
    worker asked first then plays the part of the one whose turn it was, and the batches keep their order."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, num_workers = ((info.id + worker_offset) % info.num_workers, info.num_workers) if info else (0, 1)
    return rank, world, worker, num_workers


def split_for_reader(all_urls: list[str], shuffle: bool, seed: int | str, epoch: int,
                     worker_offset: int = 0) -> tuple[list[str], int, int]:
    """This reader's shards: (seeded per-epoch shuffle, then) split by node/rank, then by DataLoader worker.
    Returns (urls, rank, worker)."""
    rank, world, worker, num_workers = reader_ids(worker_offset)
    urls = list(all_urls)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(urls)
    urls = urls[rank::world][worker::num_workers]
    if not urls:
        log.warning("rank %d worker %d has no shards (%d shards for %d ranks x %d workers)",
                    rank, worker, len(all_urls), world, num_workers)
    return urls, rank, worker


def reader_samples(all_urls: list[str], shuffle: bool, seed: int | str, epoch: int,
                   worker_offset: int = 0) -> tuple[Iterator[dict[str, Any]], int, int]:
    """This reader's raw samples: (samples, rank, worker).

    With at least as many shards as readers (ranks x workers), each reader streams whole shards (`split_for_reader`).
    With fewer, typically a small validation set, every reader streams all shards and keeps every k-th sample, so no
    rank or worker is left without data (a rank with none would have nothing to add when metrics are synced)."""
    rank, world, worker, num_workers = reader_ids(worker_offset)
    readers = world * num_workers
    if len(all_urls) >= readers:
        urls, rank, worker = split_for_reader(all_urls, shuffle, seed, epoch, worker_offset)
        return raw_samples(urls), rank, worker
    urls = list(all_urls)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(urls)
    me = rank * num_workers + worker
    return (raw for i, raw in enumerate(raw_samples(urls)) if i % readers == me), rank, worker


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples of these tars; unreadable tar data is logged and skipped."""
    import webdataset as wds

    def on_tar_error(exc: Exception) -> bool:
        log.warning("skipping unreadable shard data: %r", exc)
        return True

    yield from wds.tarfile_to_samples(handler=on_tar_error)({"url": u} for u in urls)  # lazy: urls may be endless


def resampled_urls(urls: list[str], rng: random.Random) -> Iterator[str]:
    """An endless draw of shards with replacement (webdataset's `resampled=True`): every reader samples from all
    shards, so ranks never run out at different times and the shard count need not divide the reader count."""
    if not urls:
        return
    while True:
        yield urls[rng.randrange(len(urls))]


def mix_by_weight(streams: list[Iterator[dict[str, Any]]], weights: list[float],
                  rng: random.Random) -> Iterator[dict[str, Any]]:
    """Interleave raw sample streams: each draw picks a stream with probability proportional to its weight and
    takes its next sample, tagged `__source__` with the stream's index. A stream that runs dry drops out (the others
    then share its draws); the mix ends when every stream has. The result depends only on the streams and `rng`,
    so replaying it from the same seed replays the same draws."""
    live = list(range(len(streams)))
    while live:
        i = rng.choices(live, weights=[weights[k] for k in live])[0]
        try:
            raw = next(streams[i])
        except StopIteration:
            live.remove(i)
            continue
        raw["__source__"] = i
        yield raw


@dataclass
class StreamState:
    """Where a stream is: epoch, items already produced per (logical) worker in that epoch, and the worker offset
    that keeps the DataLoader's round-robin order across a resume (`reader_ids`)."""

    epoch: int = 0
    positions: Optional[dict[int, int]] = None
    worker_offset: int = 0


class ShardStream(IterableDataset):
    """What every training stream over shards shares (ClipStream for text-video, RobotWindowStream for robot
    episodes): the split of shards by rank then DataLoader worker (`reader_samples`) or, with `resampled`, an endless
    per-reader draw with replacement; the seeded shuffle buffer; and the resume state (`state`: the epoch and, per
    worker, how many items it had produced), which `ResumableLoader` (datamodule.py) records from the batches the
    training step consumed and hands back after a restart.

    Subclasses produce items tagged `position` = (epoch, worker, pos) and skip the first `state.positions[worker]`.
    """

    def __init__(self, urls: list[str], shuffle: bool = True, shuffle_buffer: int = 256, seed: int = 0,
                 resampled: bool = False):
        super().__init__()
        self.urls = list(urls)
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.state = StreamState()

    def _reader_samples(self) -> tuple[Iterator[dict[str, Any]], int, int]:
        rank, _, worker, _ = reader_ids(self.state.worker_offset)
        return self._source_samples(self.urls, self.seed, rank, worker), rank, worker

    def _source_samples(self, urls: list[str], seed: int | str, rank: int, worker: int) -> Iterator[dict[str, Any]]:
        """This reader's raw samples of one set of shards: split by rank then worker, or resampled from all."""
        if not self.resampled:
            return reader_samples(urls, self.shuffle, seed, self.state.epoch, self.state.worker_offset)[0]
        rng = random.Random(f"{seed}-{self.state.epoch}-{rank}-{worker}-shards")
        return self._raw_samples(resampled_urls(urls, rng))

    def _raw_samples(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        yield from raw_samples(urls)

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from items
            return
        buf: list[Any] = []
        for s in items:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _skip(self, worker: int) -> int:
        """Items this worker had produced in this epoch before the checkpoint (0 when not resuming)."""
        return (self.state.positions or {}).get(worker, 0)


class ClipStream(ShardStream):
    """Iterable of {"frames": uint8 (Tc, S, S, 3) or "codes": int64 (Tc, h, w), "caption", "key", "num_skipped",
    "source", "position": (epoch, worker, pos)}. `source` is 0 here; `MixedClipStream` sets it per sample.

    Args:
        urls: shard URLs (already expanded).
        clip: what the model needs (frame offsets, fps, size).
        shuffle: shuffle shards and samples (seeded per epoch); otherwise stream in order with deterministic clips.
        shuffle_buffer: samples held in the shuffle buffer per worker.
        seed: base seed.
        tokens: None to decode mp4 frames; else read pre-tokenized shards whose `tokens` json block must match this
            dict (codebook_size, image_size, grid, fingerprint of the model's tokenizer).
        resampled: every (rank, worker) draws shards with replacement from all shards, seeded by (seed, epoch, rank,
            worker), and never runs dry; the epoch length is then set by the loader (`batches_per_epoch`).
    """

    def __init__(self, urls: list[str], clip: ClipSpec, shuffle: bool = True, shuffle_buffer: int = 256,
                 seed: int = 0, tokens: Optional[dict[str, Any]] = None, resampled: bool = False):
        super().__init__(urls, shuffle=shuffle, shuffle_buffer=shuffle_buffer, seed=seed, resampled=resampled)
        self.clip = clip
        self.tokens = tokens

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples, rank, worker = self._reader_samples()
        epoch = self.state.epoch
        skip = self._skip(worker)
        rng = random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")
        num_skipped = 0
        for pos, raw in enumerate(self._shuffled(samples, rng), start=1):
            if pos <= skip:
                continue  # resume: this sample was consumed before the checkpoint
            key = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            # Seeded by shard file name + key, not the full URL, so the pre-tokenized copy of a shard (another folder)
            # draws the same clips as the original.
            shard_name = os.path.basename(str(raw.get("__url__", "?")))
            draw = f"-{pos}" if self.resampled else ""  # a clip drawn twice in one epoch gets another window
            clip_rng = random.Random(f"{self.seed}-{epoch}-{shard_name}:{raw.get('__key__', '?')}{draw}")
            try:
                item = self.decode(raw, key, clip_rng)
            except SampleError as exc:
                num_skipped += 1
                log.warning("skipped sample of source %d (%d so far in rank %d worker %d): %s",
                            raw.get("__source__", 0), num_skipped, rank, worker, exc)
                continue
            yield {**item, "key": key, "num_skipped": num_skipped, "source": raw.get("__source__", 0),
                   "position": torch.tensor([epoch, worker, pos])}
            num_skipped = 0

    def decode(self, raw: dict[str, Any], key: str, rng: random.Random) -> dict[str, Any]:
        """One raw shard sample -> {"frames" or "codes", "caption"}; raises SampleError naming the member."""
        member = "tokens.npy" if self.tokens is not None else "mp4"
        if member not in raw or "json" not in raw:
            missing = member if member not in raw else "json"
            hint = " (is data.shard_format right?)" if missing != "json" else ""
            raise SampleError(f"{key}: missing {missing} member{hint}")
        meta = parse_meta(raw["json"], key)
        if self.tokens is not None:
            codes = decode_token_clip(raw[member], meta, self.clip, rng, key, self.tokens)
            return {"codes": torch.from_numpy(codes), "caption": meta["caption"]}
        return {"frames": torch.from_numpy(decode_clip(raw[member], meta, self.clip, rng, key)),
                "caption": meta["caption"]}

    def first_sample(self) -> tuple[dict[str, Any], str]:
        """The first raw sample of the first shard, for checks before training: (raw sample, key)."""
        for raw in self._raw_samples(self.urls[:1]):
            return raw, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        raise ValueError(f"shard {self.urls[0]!r} holds no samples")


class MixedClipStream(ClipStream):
    """A ClipStream over several sets of shards, mixed by weight.

    Each source is split by rank then worker on its own (`reader_samples`, with its fewer-shards-than-readers
    fallback), or resampled on its own, and `mix_by_weight` interleaves them with an rng seeded by (seed, epoch,
    rank, worker). The mixed raw stream then goes through the shuffle buffer, skipping and decoding of `ClipStream`
    unchanged, so `position` counts mixed draws and a resume that skips `pos` of them replays the mix exactly.
    In a finite epoch a source that runs out drops out of the mix and the epoch ends when all have; with
    `resampled` every source is drawn endlessly.

    Args:
        sources: (urls, weight) per source, urls already expanded; each sample's `source` is its index here.
        clip: what the model needs (frame offsets, fps, size).
        **kwargs: the other ClipStream arguments (shuffle, shuffle_buffer, seed, tokens, resampled).
    """

    def __init__(self, sources: list[tuple[list[str], float]], clip: ClipSpec, **kwargs):
        if not sources:
            raise ValueError("MixedClipStream needs at least one source")
        super().__init__([u for urls, _ in sources for u in urls], clip, **kwargs)
        self.sources = [(list(urls), float(weight)) for urls, weight in sources]

    def _source_seed(self, i: int) -> int | str:
        # Source 0 keeps the plain seed, so a one-source mix is exactly the ClipStream of its shards: a run can
        # switch from data.train_shards to data.train_sources and still resume from its checkpoint.
        return self.seed if i == 0 else f"{self.seed}-source{i}"

    def _reader_samples(self) -> tuple[Iterator[dict[str, Any]], int, int]:
        rank, _, worker, _ = reader_ids(self.state.worker_offset)
        streams = [self._source_samples(urls, self._source_seed(i), rank, worker)
                   for i, (urls, _) in enumerate(self.sources)]
        # Its own rng, not the shuffle buffer's: with one source the draws must leave the buffer's order unchanged.
        rng = random.Random(f"{self.seed}-{self.state.epoch}-{rank}-{worker}-mix")
        return mix_by_weight(streams, [w for _, w in self.sources], rng), rank, worker
