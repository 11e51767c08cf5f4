"""Single frames for tokenizer training, from any mix of text-video and robot shards.

Every `*.mp4` member of a shard sample is a frame source: `{key}.mp4` in text-video shards, `{key}.{view}.mp4` in
robot episode shards. A few random frames are decoded per video, resized + centre-cropped, and mixed across sources by
weight through a shuffle buffer.

Training streams are endless (each source restarts with a new seed when it runs out), so `trainer.max_steps` sets the
length of a run. Validation streams are one deterministic pass over a fixed number of frames.

Bad videos are skipped, logged and counted (`num_skipped` travels with the next frame). A source that yields no frame
in a whole pass is an error naming the source.

Resume: every frame carries `position` = (0, worker, frames this worker has produced), and the training loader is a
`ResumableLoader`. With `exact_resume` (the default) a restarted worker replays its stream from the start and drops
the frames already consumed: the run continues on the uninterrupted run's frames, at the cost of decoding the
consumed frames once more (the buffer holds decoded frames, so there is nothing cheaper to skip). For very long runs
`exact_resume: false` instead reseeds the stream with the number of consumed batches: instant, fresh frames, not the
same ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from gr.config import ConfigError, as_config
from gr.data.datamodule import ResumableLoader
from gr.data.shards import StreamState, expand_urls, reader_ids, split_for_reader
from gr.data.video_io import VideoDecodeError, get_frames_min_size, open_video, resize_center_crop

log = logging.getLogger(__name__)


@dataclass
class FrameSource:
    """One set of shards to take frames from."""

    shards: Any  # brace pattern or list of patterns (local tars or `pipe:` URLs)
    weight: float = 1.0  # relative sampling weight when several sources are mixed
    views: Optional[list[str]] = None  # robot shards: only these `{view}.mp4` members; None: every mp4 member

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data source {self.shards!r}: weight must be > 0, got {self.weight}")


def _video_members(raw: dict[str, Any], views: Optional[list[str]]) -> list[str]:
    names = sorted(k for k in raw if k == "mp4" or k.endswith(".mp4"))
    if views is not None:
        names = [n for n in names if n[: -len(".mp4")] in views]
    return names


class FrameStream(IterableDataset):
    """Iterable of {"frame": uint8 (S, S, 3), "key", "num_skipped", "position"}.

    Args:
        sources: frame sources (shards already expanded in `urls`), as (urls, weight, views, name) tuples.
        image_size: output side S.
        min_size: smallest native frame side accepted (the tokenizer's downsampling factor).
        frames_per_video: random frames decoded from each video per pass.
        endless: restart sources when exhausted (training) or make one pass (validation).
        shuffle_buffer: frames held in the shuffle buffer per worker (1: no shuffling).
        max_frames: stop after this many frames (validation).
        seed: base seed.
        exact_resume: skip the `state.positions` frames already consumed (replaying them); else reseed with
            `resume_tag` and skip nothing.
    """

    def __init__(self, sources: list[tuple[list[str], float, Optional[list[str]], str]], image_size: int,
                 min_size: int = 1, frames_per_video: int = 4, endless: bool = True, shuffle_buffer: int = 512,
                 max_frames: Optional[int] = None, seed: int = 0, exact_resume: bool = True):
        super().__init__()
        self.sources = sources
        self.image_size, self.min_size = image_size, min_size
        self.frames_per_video, self.endless = frames_per_video, endless
        self.shuffle_buffer, self.max_frames, self.seed = shuffle_buffer, max_frames, seed
        self.exact_resume = exact_resume
        self.resume_tag = 0  # with exact_resume off: batches consumed before a resume, reseeding the stream
        self.state = StreamState()  # set by ResumableLoader: consumed frames per worker, worker offset

    def _my_urls(self, urls: list[str], epoch: int) -> list[str]:
        offset = self.state.worker_offset
        mine, _, _ = split_for_reader(urls, self.endless, f"{self.seed}-{self.resume_tag}", epoch, offset)
        if not mine and self.endless:  # fewer shards than readers: share one rather than starve
            rank, _, worker, num_workers = reader_ids(offset)
            mine = [urls[(rank * num_workers + worker) % len(urls)]]
        return mine

    def decode(self, raw: dict[str, Any], member: str, rng: random.Random, key: str) -> np.ndarray:
        """Decode `frames_per_video` random frames of one mp4 member -> uint8 (k, S, S, 3)."""
        vr = open_video(raw[member])
        idx = sorted(rng.sample(range(len(vr)), min(self.frames_per_video, len(vr))))
        return resize_center_crop(get_frames_min_size(vr, idx, self.min_size), self.image_size)

    def _source_frames(self, i: int, epoch: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        urls, _, views, name = self.sources[i]
        num_skipped, num_frames, last_error = 0, 0, None

        def on_tar_error(exc: Exception) -> bool:
            log.warning("%s: skipping unreadable shard data: %r", name, exc)
            return True

        mine = self._my_urls(urls, epoch)
        if not mine:
            return  # a validation reader without shards of its own
        samples = wds.tarfile_to_samples(handler=on_tar_error)(iter([{"url": u} for u in mine]))
        for raw in samples:
            key = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            members = _video_members(raw, views)
            if not members:
                num_skipped, last_error = num_skipped + 1, f"{key}: no mp4 member" + (f" for views {views}" if views else "")
                log.warning("%s: skipped sample: %s", name, last_error)
                continue
            # The frames drawn depend on the shard's file name and the sample, not on the folder the shards are in:
            # the same data copied elsewhere (another run's output folder, another machine) gives the same frames.
            where = f"{os.path.basename(str(raw.get('__url__', '?')))}:{raw.get('__key__', '?')}"
            for member in members:
                rng = random.Random(f"{self.seed}-{self.resume_tag}-{epoch}-{where}-{member}")
                try:
                    frames = self.decode(raw, member, rng, key)
                except VideoDecodeError as exc:
                    num_skipped, last_error = num_skipped + 1, f"{key}.{member}: {exc}"
                    log.warning("%s: skipped video (%d so far): %s", name, num_skipped, last_error)
                    continue
                for j, frame in enumerate(frames):
                    num_frames += 1
                    yield {"frame": torch.from_numpy(frame), "key": f"{key}.{member}#{j}", "num_skipped": num_skipped}
                    num_skipped = 0
        if num_frames == 0:
            raise ValueError(f"{name}: no decodable frames in a whole pass over {len(mine)} shard(s)"
                             + (f"; last problem: {last_error}" if last_error else " (the shards hold no samples)"))

    def _one_source(self, i: int) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            yield from self._source_frames(i, epoch)
            if not self.endless:
                return
            epoch += 1

    def _mixed(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        iters = {i: self._one_source(i) for i in range(len(self.sources))}
        weights = {i: float(s[1]) for i, s in enumerate(self.sources)}
        while iters:
            i = rng.choices(list(iters), weights=[weights[k] for k in iters])[0]
            try:
                yield next(iters[i])
            except StopIteration:
                del iters[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = reader_ids(self.state.worker_offset)
        skip = (self.state.positions or {}).get(worker, 0) if self.exact_resume else 0
        for pos, item in enumerate(self._buffered(rank, worker), start=1):
            if pos > skip:  # resume: the first `skip` frames were consumed before the checkpoint
                yield {**item, "position": torch.tensor([0, worker, pos])}

    def _buffered(self, rank: int, worker: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}-{self.resume_tag}-{rank}-{worker}")
        buf: list[dict[str, Any]] = []
        count = 0
        for item in self._mixed(rng):
            buf.append(item)
            if len(buf) < max(1, self.shuffle_buffer):
                continue
            yield buf.pop(rng.randrange(len(buf)))
            count += 1
            if self.max_frames is not None and count >= self.max_frames:
                return
        rng.shuffle(buf)
        for item in buf[: None if self.max_frames is None else max(0, self.max_frames - count)]:
            yield item


def collate_frames(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"frames": torch.stack([s["frame"] for s in samples]),  # (B, S, S, 3) uint8
           "key": [s["key"] for s in samples],
           "num_skipped": sum(s["num_skipped"] for s in samples)}  # a host int: no device sync to read it
    if all("position" in s for s in samples):
        out["position"] = torch.stack([s["position"] for s in samples])  # (B, 3): 0, worker, frames so far
    return out


class FrameDataModule(L.LightningDataModule):
    """Frames for training the image tokenizer, from text-video shards, robot shards, or both mixed.

    The frame size comes from the model (`trainer.lightning_module.image_size`) so data and tokenizer agree.

    Args:
        train_sources: frame sources (shards, weight, views) to train on.
        val_sources: held-out sources; validation uses the first `num_val_frames` frames, always the same ones.
        frames_per_video: random frames decoded per video per pass (more is faster, fewer is more diverse).
        batch_size: frames per batch per process.
        num_workers: DataLoader workers per process.
        shuffle_buffer: per-worker frame shuffle buffer.
        num_val_frames: held-out frames per validation.
        seed: sampling seed.
        exact_resume: a resumed run continues on exactly the uninterrupted run's frames, by replaying (decoding)
            the frames consumed before the checkpoint once; false: reseed instead (instant, other frames).
    """

    def __init__(self, train_sources: list[FrameSource], val_sources: Optional[list[FrameSource]] = None,
                 frames_per_video: int = 4, batch_size: int = 32, num_workers: int = 2, shuffle_buffer: int = 512,
                 num_val_frames: int = 256, seed: int = 0, exact_resume: bool = True):
        super().__init__()
        self.exact_resume = exact_resume
        self._train_loader: Optional[ResumableLoader] = None
        if not train_sources:
            raise ConfigError("data.train_sources: at least one frame source is needed")
        for name, value in (("frames_per_video", frames_per_video), ("batch_size", batch_size),
                            ("num_val_frames", num_val_frames)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        self.train_sources = self._expand(train_sources, "data.train_sources")
        self.val_sources = self._expand(val_sources or [], "data.val_sources")
        self.frames_per_video, self.batch_size, self.num_workers = frames_per_video, batch_size, num_workers
        self.shuffle_buffer, self.num_val_frames, self.seed = shuffle_buffer, num_val_frames, seed
        self._consumed_batches = 0

    @staticmethod
    def _expand(sources: list, field: str) -> list[tuple[list[str], float, Optional[list[str]], str]]:
        out = []
        for i, src in enumerate(sources):
            src = as_config(FrameSource, dataclasses.asdict(src) if dataclasses.is_dataclass(src) else src,
                            f"{field}[{i}]")
            urls = expand_urls(src.shards, f"{field}[{i}].shards")
            out.append((urls, src.weight, None if src.views is None else sorted(src.views), f"{field}[{i}]"))
        return out

    def _sizes(self) -> tuple[int, int]:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        if module is None or not hasattr(module, "image_size"):
            raise ConfigError("FrameDataModule needs a model with `image_size` (the tokenizer module)")
        return module.image_size, module.downsample_factor

    def setup(self, stage: str) -> None:
        if stage == "fit":  # fail before training if a source cannot give a single frame
            size, factor = self._sizes()
            for src in self.train_sources:
                probe = FrameStream([src], size, factor, frames_per_video=1, endless=False, shuffle_buffer=1,
                                    max_frames=1, seed=self.seed)
                next(iter(probe))

    def _kwargs(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_frames,
                    pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self._train_loader is None:  # one loader for the run: its progress is checkpointed
            size, factor = self._sizes()
            ds = FrameStream(self.train_sources, size, factor, self.frames_per_video, endless=True,
                             shuffle_buffer=self.shuffle_buffer, seed=self.seed, exact_resume=self.exact_resume)
            self._train_loader = ResumableLoader(ds, drop_last=True, **self._kwargs())
        if not self.exact_resume:  # a resumed run draws fresh frames rather than replaying them
            self._train_loader.dataset.resume_tag = self._consumed_batches
        return self._train_loader

    def val_dataloader(self):
        if not self.val_sources:
            return []
        size, factor = self._sizes()
        # One reader per shard at most, each stopping at its share, so the held-out set is the same every time.
        num_workers = min(self.num_workers, min(len(s[0]) for s in self.val_sources))
        max_frames = -(-self.num_val_frames // max(1, num_workers))
        ds = FrameStream(self.val_sources, size, factor, self.frames_per_video, endless=False, shuffle_buffer=1,
                         max_frames=max_frames, seed=self.seed)
        return DataLoader(ds, drop_last=False, **(self._kwargs() | {"num_workers": num_workers}))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self._consumed_batches += 1
            if self._train_loader is not None and "position" in batch:
                self._train_loader.mark_consumed(batch["position"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self._consumed_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._consumed_batches = int(state.get("consumed_batches", 0))
