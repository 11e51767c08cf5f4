"""LightningDataModule for text-video clips, and the loader that resumes any shard stream mid-epoch exactly."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from gr.config import ClipSpec, ConfigError, as_config
from gr.data.shards import (ClipSource, ClipStream, MixedClipStream, ShardStream, StreamState, expand_urls,
                            parse_meta, tokens_spec_mismatch)

log = logging.getLogger(__name__)


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    name = "codes" if "codes" in samples[0] else "frames"
    return {
        name: torch.stack([s[name] for s in samples]),  # frames (B, Tc, S, S, 3) uint8 | codes (B, Tc, h, w) int64
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "num_skipped": sum(s["num_skipped"] for s in samples),  # a host int: no device sync to read it
        "source": torch.tensor([s["source"] for s in samples]),  # (B,) index into data.train_sources (0: one source)
        "position": torch.stack([s["position"] for s in samples]),  # (B, 3): epoch, worker, raw position
    }


class ResumableLoader(DataLoader):
    """DataLoader over a ShardStream (text-video clips or robot windows) that Lightning can checkpoint and restore
    mid-epoch: batches carry `position` rows (epoch, worker, pos), and the stream skips what was consumed.

    Progress is recorded only for batches handed to the training step (`mark_consumed`, called from the data module's
    `on_before_batch_transfer`), not for batches Lightning has merely prefetched. The loader is kept across epochs
    and sets the stream's epoch, which reseeds its shard order, shuffle buffer and random draws.

    Args:
        dataset: the stream.
        batches_per_epoch: end each epoch after this many batches (per rank). A resampled (endless) stream has
            epochs only with it; a finite one then gives every rank the same number of steps as long as every rank
            has at least that many batches.
        collate_fn: builds a batch (with a stacked `position`) from the stream's items.
    """

    def __init__(self, dataset: ShardStream, batches_per_epoch: Optional[int] = None, *, collate_fn, **kwargs):
        super().__init__(dataset, collate_fn=collate_fn, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.progress = StreamState(epoch=0, positions={})
        self.consumed_batches = 0  # in the current epoch

    def __iter__(self):
        # Batches come round-robin from the workers, starting at worker 0; after `consumed_batches` the next one is
        # worker (consumed_batches % num_workers)'s, so that logical worker is the one asked first.
        self.dataset.state = StreamState(self.progress.epoch, dict(self.progress.positions or {}),
                                         self.consumed_batches % max(1, self.num_workers))
        left = None if self.batches_per_epoch is None else self.batches_per_epoch - self.consumed_batches
        for i, batch in enumerate(super().__iter__()):
            if left is not None and i >= left:
                break
            yield batch
        # a full pass: the next epoch starts fresh
        self.progress, self.consumed_batches = StreamState(self.progress.epoch + 1, {}), 0

    def mark_consumed(self, position: torch.Tensor) -> None:
        if int(position[0, 0]) == self.progress.epoch:
            self.consumed_batches += 1
        for epoch, worker, pos in position.tolist():
            # The last batches of an epoch reach the training step after the loader has already rolled over.
            if epoch == self.progress.epoch and pos > self.progress.positions.get(worker, 0):
                self.progress.positions[worker] = pos

    def state_dict(self) -> dict[str, Any]:
        """This rank's progress at the top level, the world size, and with several ranks every rank's progress
        (`ranks`, gathered: Lightning writes rank 0's checkpoint, and each rank's stream is at its own place).

        Lightning calls this on every rank while it builds a checkpoint, so the gather is matched on all ranks."""
        local = {"epoch": self.progress.epoch, "positions": dict(self.progress.positions),
                 "consumed_batches": self.consumed_batches}
        rank, world = _rank_world()
        state = {**local, "world_size": world}
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, local)
            state["ranks"] = gathered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's progress. A checkpoint from another world size is refused: each rank's shards and
        positions would be another rank's, so samples would be repeated or lost."""
        rank, world = _rank_world()
        if "world_size" not in state and world > 1:  # written before per-rank positions: only rank 0's is there
            raise ConfigError(f"resume: the checkpoint's data position has no per-rank entries for {world} ranks "
                              "(written by an older gr); resuming would give every rank rank 0's position")
        saved = int(state.get("world_size", 1))
        if saved != world:
            raise ConfigError(f"resume: the checkpoint's data position was saved by {saved} process(es), this run "
                              f"has {world}; resume with {saved}, or start a new run from its weights (init_from)")
        if world > 1:
            state = state["ranks"][rank]
        self.progress = StreamState(int(state["epoch"]), {int(k): int(v) for k, v in state["positions"].items()})
        self.consumed_batches = int(state.get("consumed_batches", 0))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ClipStreamLoader(ResumableLoader):
    """The ResumableLoader of text-video clips (`collate_clips`)."""

    def __init__(self, dataset: ClipStream, batches_per_epoch: Optional[int] = None, **kwargs):
        super().__init__(dataset, batches_per_epoch, collate_fn=collate_clips, **kwargs)


class VideoDataModule(L.LightningDataModule):
    """Text-video shards -> batches of clips for pretraining.

    The clip spec (history, offset, fps, size) comes from the model (`trainer.lightning_module.clip_spec`) unless
    given here, so data and model cannot disagree.

    Args:
        train_shards: brace pattern(s) of training tars, e.g. "data/train-{000000..000099}.tar"; `pipe:` URLs work.
            Give this or `train_sources`, not both.
        val_shards: the same for validation (iterated in order, clips chosen deterministically).
        batch_size: clips per batch per process.
        num_workers: DataLoader workers per process (shards are split across ranks, then workers).
        shuffle_buffer: per-worker sample shuffle buffer.
        seed: shuffling seed (shard order and buffer are reseeded each epoch).
        clip: optional explicit ClipSpec; must equal the model's when both are set.
        shard_format: "video" (`{key}.mp4`, decoded and tokenized during training) or "tokens" (`{key}.tokens.npy`
            written by data_prep/tokenize_shards.py with the model's tokenizer; no decoding, no encoder).
        resampled: draw training shards with replacement, per rank and worker (webdataset's `resampled=True`):
            the stream never ends, no rank runs out before another, and any shard count works with any number of
            nodes x GPUs x workers. The recommended mode for multi-node runs.
        batches_per_epoch: epoch length in batches per rank. With `resampled` it defines the (nominal) epoch, and
            None means one endless epoch (stop with trainer.max_steps, validate with an int val_check_interval);
            without `resampled`, None means one pass over this rank's shards.
        train_sources: instead of `train_shards`, several sets of training shards mixed by weight, as
            `[{shards, weight}, ...]` (`ClipSource`): each draw picks a source with probability weight / sum of the
            weights of the sources that still have data. Each source is split across ranks and workers on its own;
            in a finite epoch a source that runs out drops out of the mix and the epoch ends when all have, with
            `resampled` every source is drawn endlessly. Batches carry `source`, each sample's index in this list.
            A single source is the same stream as `train_shards` with those shards.
    """

    def __init__(self, train_shards: Optional[str | list[str]] = None, val_shards: Optional[str | list[str]] = None,
                 batch_size: int = 16, num_workers: int = 2, shuffle_buffer: int = 256, seed: int = 0,
                 clip: Optional[ClipSpec] = None, shard_format: str = "video", resampled: bool = False,
                 batches_per_epoch: Optional[int] = None, train_sources: Optional[list[ClipSource]] = None):
        super().__init__()
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ConfigError(f"data.batches_per_epoch must be >= 1 or null, got {batches_per_epoch}")
        self.resampled, self.batches_per_epoch = resampled, batches_per_epoch
        if shard_format not in ("video", "tokens"):
            raise ConfigError(f"data.shard_format must be 'video' or 'tokens', got {shard_format!r}")
        self.shard_format = shard_format
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.train_sources = self._expand_train_sources(train_shards, train_sources)
        self.val_urls = expand_urls(val_shards, "data.val_shards") if val_shards else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.clip = clip
        self._train_loader: Optional[ClipStreamLoader] = None

    @staticmethod
    def _expand_train_sources(train_shards: Optional[str | list[str]], train_sources: Optional[Sequence[Any]]
                              ) -> list[tuple[list[str], float, str]]:
        """(urls, weight, config path) per training source; `train_shards` is one source of weight 1."""
        if (train_shards is None) == (train_sources is None):
            raise ConfigError("data.train_shards / data.train_sources: give exactly one of them (train_shards: one "
                              f"set of shards; train_sources: [{{shards, weight}}, ...] mixed by weight), got "
                              f"{'both' if train_shards is not None else 'neither'}")
        if train_sources is None:
            return [(expand_urls(train_shards, "data.train_shards"), 1.0, "data.train_shards")]
        if not train_sources:
            raise ConfigError("data.train_sources: the list is empty; give at least one {shards, weight}")
        out = []
        for i, src in enumerate(train_sources):
            where = f"data.train_sources[{i}]"
            src = as_config(ClipSource, src, where)
            src.check(where)
            out.append((expand_urls(src.shards, f"{where}.shards"), float(src.weight), where))
        return out

    def _resolve_clip(self) -> ClipSpec:
        model_clip = getattr(getattr(self.trainer, "lightning_module", None), "clip_spec", None) if self.trainer else None
        if model_clip is not None and self.clip is not None and model_clip != self.clip:
            raise ValueError(f"data.clip {self.clip} disagrees with the model's clip {model_clip}")
        clip = model_clip or self.clip
        if clip is None:
            raise ValueError("data.clip is not set and no model provides a clip_spec")
        return clip

    def _tokens_spec(self) -> Optional[dict[str, Any]]:
        if self.shard_format != "tokens":
            return None
        spec = getattr(getattr(self.trainer, "lightning_module", None), "tokens_spec", None) if self.trainer else None
        if spec is None:
            raise ConfigError("data.shard_format 'tokens' needs a model that states its tokenizer (tokens_spec)")
        return spec

    def setup(self, stage: str) -> None:
        spec = self._tokens_spec()
        if spec is None:
            return
        # Fail before training when the shards were tokenized by another tokenizer or are not pre-tokenized at all.
        # Every source is checked: a mix may hold one source tokenized with an older VQGAN.
        checks = [(field, urls) for urls, _, field in self.train_sources] + [("data.val_shards", self.val_urls)]
        clip = self._resolve_clip()
        for field, urls in checks:
            if not urls:
                continue
            try:
                raw, key = ClipStream(urls, clip).first_sample()
            except ValueError as exc:
                raise ConfigError(f"{field}: {exc}") from None
            if "tokens.npy" not in raw:
                raise ConfigError(f"{field}: {key} has no tokens.npy member; data.shard_format 'tokens' needs "
                                  "shards written by data_prep/tokenize_shards.py")
            why = tokens_spec_mismatch(parse_meta(raw.get("json", b"{}"), key).get("tokens"), spec)
            if why:
                raise ConfigError(f"{field}: {key}: {why}")

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
                    persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> ClipStreamLoader:
        if self._train_loader is None:  # keep one loader so its progress survives across epochs
            ds = MixedClipStream([(urls, weight) for urls, weight, _ in self.train_sources], self._resolve_clip(),
                                 shuffle=True, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                                 tokens=self._tokens_spec(), resampled=self.resampled)
            self._train_loader = ClipStreamLoader(ds, self.batches_per_epoch, **self._loader_kwargs())
        return self._train_loader

    def val_dataloader(self):
        if not self.val_urls:
            return []
        ds = ClipStream(self.val_urls, self._resolve_clip(), shuffle=False, seed=self.seed, tokens=self._tokens_spec())
        kwargs = self._loader_kwargs() | {"drop_last": False}
        return DataLoader(ds, collate_fn=collate_clips, **kwargs)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed(batch["position"])
        return batch
