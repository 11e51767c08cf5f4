"""LightningDataModule for text-video clips, with a loader that resumes mid-epoch exactly."""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from gr.config import ClipSpec, ConfigError
from gr.data.shards import ClipStream, StreamState, expand_urls, parse_meta, tokens_spec_mismatch

log = logging.getLogger(__name__)


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    name = "codes" if "codes" in samples[0] else "frames"
    return {
        name: torch.stack([s[name] for s in samples]),  # frames (B, Tc, S, S, 3) uint8 | codes (B, Tc, h, w) int64
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "num_skipped": sum(s["num_skipped"] for s in samples),  # a host int: no device sync to read it
        "position": torch.stack([s["position"] for s in samples]),  # (B, 3): epoch, worker, raw position
    }


class ClipStreamLoader(DataLoader):
    """DataLoader over a ClipStream that Lightning can checkpoint and restore mid-epoch.

    Progress is recorded only for batches handed to the training step (`mark_consumed`, called from the data module's
    `on_before_batch_transfer`), not for batches Lightning has merely prefetched.

    Args:
        dataset: the clip stream.
        batches_per_epoch: end each epoch after this many batches (per rank). A resampled (endless) stream has
            epochs only with it; a finite one then gives every rank the same number of steps as long as every rank
            has at least that many batches.
    """

    def __init__(self, dataset: ClipStream, batches_per_epoch: Optional[int] = None, **kwargs):
        super().__init__(dataset, collate_fn=collate_clips, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.progress = StreamState(epoch=0, positions={})
        self.consumed_batches = 0  # in the current epoch

    def __iter__(self):
        self.dataset.state = StreamState(self.progress.epoch, dict(self.progress.positions or {}))
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
        return {"epoch": self.progress.epoch, "positions": dict(self.progress.positions),
                "consumed_batches": self.consumed_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = StreamState(int(state["epoch"]), {int(k): int(v) for k, v in state["positions"].items()})
        self.consumed_batches = int(state.get("consumed_batches", 0))


class VideoDataModule(L.LightningDataModule):
    """Text-video shards -> batches of clips for pretraining.

    The clip spec (history, offset, fps, size) comes from the model (`trainer.lightning_module.clip_spec`) unless
    given here, so data and model cannot disagree.

    Args:
        train_shards: brace pattern(s) of training tars, e.g. "data/train-{000000..000099}.tar"; `pipe:` URLs work.
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
    """

    def __init__(self, train_shards: str | list[str], val_shards: Optional[str | list[str]] = None,
                 batch_size: int = 16, num_workers: int = 2, shuffle_buffer: int = 256, seed: int = 0,
                 clip: Optional[ClipSpec] = None, shard_format: str = "video", resampled: bool = False,
                 batches_per_epoch: Optional[int] = None):
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
        self.train_urls = expand_urls(train_shards, "data.train_shards")
        self.val_urls = expand_urls(val_shards, "data.val_shards") if val_shards else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.clip = clip
        self._train_loader: Optional[ClipStreamLoader] = None

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
        for field, urls in (("data.train_shards", self.train_urls), ("data.val_shards", self.val_urls)):
            if not urls:
                continue
            raw, key = ClipStream(urls, self._resolve_clip()).first_sample()
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
            ds = ClipStream(self.train_urls, self._resolve_clip(), True, self.shuffle_buffer, self.seed,
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
