"""Robot finetuning data: training windows streamed from robot episode shards (gr/data/robot.py format).

Each episode is decoded once (every frame of the model's views, resized to the model's image size, or the codes of a
pre-tokenized shard) and cut into windows: history steps t-h+1..t (clamped at the episode start), the future frame at
t + offset (clamped at the end), states for the history steps and the action chunk a_t..a_{t+k-1} (padded past the end
and masked). State and actions are normalized with the dataset statistics stored in the shards' json.

Bad episodes (a json that is not an object, missing view, state/action length mismatch, undecodable video, codes of
another tokenizer or of the wrong dtype, grid or range) are skipped, logged with shard and key, and counted.

The stream is a `ShardStream` (gr/data/shards.py), like the text-video one: the same split by rank and worker, the
same `resampled` mode, shuffle buffer and code checks, and the same resume through `ResumableLoader`. Its resume
position counts windows (after the shuffle buffer), not raw episodes, because one episode gives many windows: a
restarted worker replays its epoch's episodes and drops the windows already consumed, which costs one decode of
those episodes (cheap for pre-tokenized shards) and gives the uninterrupted run's batches exactly.
"""

from __future__ import annotations

import io
import json
import logging
import random
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from gr.config import ClipSpec, ConfigError, RobotConfig, as_config
from gr.data.cotrain import CotrainConfig, CotrainLoader
from gr.data.datamodule import ClipStreamLoader, ResumableLoader
from gr.data.robot import make_windows
from gr.data.shards import (MixedClipStream, SampleError, ShardStream, expand_urls, load_codes, raw_samples,
                            tokens_spec_mismatch)
from gr.normalization import Normalizer
from gr.data.video_io import VideoDecodeError, get_frames, open_video, resize_center_crop

log = logging.getLogger(__name__)


def _npy(raw: dict[str, Any], name: str, key: str) -> np.ndarray:
    if name not in raw:
        raise SampleError(f"{key}: missing {name} member")
    try:
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt header raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise SampleError(f"{key}.{name}: not a readable npy array ({exc})") from exc


def episode_meta(raw: dict[str, Any], key: str, views: list[str]) -> dict[str, Any]:
    """Parse and check an episode's json: instruction, views (must include the model's), stats."""
    try:
        meta = json.loads(raw["json"])
    except KeyError:
        raise SampleError(f"{key}: missing json member") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(f"{key}.json: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise SampleError(f"{key}.json: expected an object, got {type(meta).__name__}")
    if not isinstance(meta.get("instruction"), str):
        raise SampleError(f"{key}.json: field 'instruction' must be a string")
    missing = [v for v in views if v not in meta.get("views", [])]
    if missing:
        raise SampleError(f"{key}.json: view {missing[0]!r} of model.robot.view_names is not among the episode's "
                          f"views {meta.get('views')}")
    return meta


class RobotWindowStream(ShardStream):
    """Iterable of windows: {"history", "future", "state", "arm", "gripper", "action_mask", "instruction", "key",
    "num_skipped", "position"}; history/future hold uint8 frames (video shards) or int64 codes (pre-tokenized
    shards), position is (epoch, worker, windows this worker has produced in the epoch).

    Args:
        urls: shard URLs.
        robot: the model's robot config (views, state/action sizes, chunk).
        clip: the model's clip spec (num_history, future_frame_offset in steps, image_size).
        norm: the `Normalizer` of the dataset statistics.
        tokens: None for mp4 views; else the model's tokens spec (pre-tokenized shards).
        windows_per_episode: windows drawn per episode per pass (None: every step).
        shuffle: shuffle shards, windows (buffered) and the chosen steps; else deterministic order.
        shuffle_buffer: windows held per worker.
        seed: base seed.
        resampled: draw episodes' shards with replacement per rank and worker, endlessly (see ShardStream); the
            epoch length then comes from the loader's `batches_per_epoch`.
    """

    def __init__(self, urls: list[str], robot: RobotConfig, clip: ClipSpec, norm: dict[str, np.ndarray],
                 tokens: Optional[dict[str, Any]] = None, windows_per_episode: Optional[int] = None,
                 shuffle: bool = True, shuffle_buffer: int = 512, seed: int = 0, resampled: bool = False):
        super().__init__(urls, shuffle=shuffle, shuffle_buffer=shuffle_buffer, seed=seed, resampled=resampled)
        self.robot, self.clip, self.norm, self.tokens = robot, clip, norm, tokens
        self.windows_per_episode = windows_per_episode

    def _view_frames(self, raw: dict[str, Any], view: str, key: str, meta: dict[str, Any]) -> np.ndarray:
        if self.tokens is not None:
            why = tokens_spec_mismatch(meta.get("tokens"), self.tokens)
            if why:
                raise SampleError(f"{key}.json: {why}")
            member = f"{view}.tokens.npy"
            if member not in raw:
                raise SampleError(f"{key}: missing {member} member")
            return load_codes(raw[member], meta["tokens"], f"{key}.{member}").astype(np.int64)
        if f"{view}.mp4" not in raw:
            raise SampleError(f"{key}: missing {view}.mp4 member")
        try:
            vr = open_video(raw[f"{view}.mp4"])
            return resize_center_crop(get_frames(vr, range(len(vr))), self.clip.image_size)
        except VideoDecodeError as exc:
            raise SampleError(f"{key}.{view}.mp4: {exc}") from exc

    def episode(self, raw: dict[str, Any], key: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
        """Decode and check one episode -> (frames per view, state (T, S), action (T, A), instruction)."""
        views = self.robot.view_names
        meta = episode_meta(raw, key, views)
        state, action = _npy(raw, "state.npy", key), _npy(raw, "action.npy", key)
        if state.ndim != 2 or state.shape[1] != self.robot.state_dim:
            raise SampleError(f"{key}.state.npy: shape {state.shape}, model.robot.state_dim is {self.robot.state_dim}")
        if action.ndim != 2 or action.shape[1] != self.robot.action_dim:
            raise SampleError(f"{key}.action.npy: shape {action.shape}, model.robot.action_dim is "
                              f"{self.robot.action_dim}")
        if len(state) != len(action) or len(state) == 0:
            raise SampleError(f"{key}: state has {len(state)} steps but action has {len(action)}")
        frames = {v: self._view_frames(raw, v, key, meta) for v in views}
        for v, f in frames.items():
            if len(f) != len(state):
                raise SampleError(f"{key}.{v}: {len(f)} frames but {len(state)} state steps")
        return frames, state, action, meta["instruction"]

    def _windows(self, samples: Iterator[dict[str, Any]], rank: int, worker: int,
                 rng: random.Random) -> Iterator[dict[str, Any]]:
        num_skipped = 0
        for raw in samples:
            key = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            try:
                frames, state, action, instruction = self.episode(raw, key)
            except SampleError as exc:
                num_skipped += 1
                log.warning("skipped episode (%d so far in rank %d worker %d): %s", num_skipped, rank, worker, exc)
                continue
            steps = list(range(len(state)))
            if self.windows_per_episode is not None and self.windows_per_episode < len(steps):
                steps = sorted(rng.sample(steps, self.windows_per_episode)) if self.shuffle else \
                    steps[:: max(1, len(steps) // self.windows_per_episode)][: self.windows_per_episode]
            for w in make_windows(frames, state, action, self.norm, self.robot.view_names, steps,
                                  self.clip.num_history, self.clip.future_frame_offset, self.robot.action_chunk,
                                  self.robot.history_stride):
                yield {**{k: torch.from_numpy(np.asarray(v)) for k, v in w.items()}, "instruction": instruction,
                       "key": f"{key}@{w['step']}", "num_skipped": num_skipped}
                num_skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples, rank, worker = self._reader_samples()
        epoch, skip = self.state.epoch, self._skip(worker)
        # One rng per epoch for the window draws and the buffer, the same in every reader: readers hold different
        # episodes, and it keeps the batches of runs made before the shared base (bench/results/experiment-*.json).
        rng = random.Random(f"{self.seed}-{epoch}")
        for pos, window in enumerate(self._shuffled(self._windows(samples, rank, worker, rng), rng), start=1):
            if pos > skip:  # resume: the first `skip` windows were consumed before the checkpoint
                yield {**window, "position": torch.tensor([epoch, worker, pos])}


def collate_windows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([s[k] for s in samples]) for k in
           ("history", "future", "state", "arm", "gripper", "action_mask", "step")}
    out.update(instruction=[s["instruction"] for s in samples], key=[s["key"] for s in samples],
               num_skipped=sum(s["num_skipped"] for s in samples))  # a host int: no device sync to read it
    if all("position" in s for s in samples):
        out["position"] = torch.stack([s["position"] for s in samples])  # (B, 3): epoch, worker, windows so far
    return out


class RobotDataModule(L.LightningDataModule):
    """Robot episode shards -> batches of training windows for finetuning.

    Views, state/action sizes, chunk length, history and future offset come from the model
    (`trainer.lightning_module.robot_spec` / `clip_spec`), so data and model cannot disagree. The normalization
    statistics come from the shards' json (or `stats_file`) and are handed to the model, which keeps them in its
    checkpoint.

    Args:
        train_shards: brace pattern(s) of robot episode tars.
        val_shards: held-out episodes (iterated in order).
        batch_size: windows per batch per process.
        num_workers: DataLoader workers per process.
        shuffle_buffer: per-worker window shuffle buffer.
        windows_per_episode: windows drawn from each episode per pass (None: every step).
        shard_format: "video" (mp4 per view) or "tokens" (data_prep/tokenize_shards.py output).
        stats_file: a `<prefix>-stats.json`; default: the `stats` block of the first training episode.
        seed: shuffling seed.
        resampled: draw training shards with replacement per rank and worker, endlessly, as VideoDataModule does:
            no rank runs out before another, whatever the shard count. Set `batches_per_epoch` or stop with
            trainer.max_steps.
        batches_per_epoch: epoch length in batches per rank (with `resampled`: the nominal epoch; without: cut each
            pass there, so every rank takes the same number of steps).
        cotrain: video co-training {shards, weight, shard_format, view, fps, future_frame_offset}
            (gr/data/cotrain.py): that fraction of training steps takes a text-video batch instead.

    The training loader resumes mid-epoch exactly (`ResumableLoader`): a restarted finetune continues the epoch's
    shard order and window draws instead of replaying epoch 0.
    """

    def __init__(self, train_shards: str | list[str], val_shards: Optional[str | list[str]] = None,
                 batch_size: int = 32, num_workers: int = 2, shuffle_buffer: int = 512,
                 windows_per_episode: Optional[int] = None, shard_format: str = "video",
                 stats_file: Optional[str] = None, seed: int = 0, resampled: bool = False,
                 batches_per_epoch: Optional[int] = None, cotrain: Optional[dict] = None):
        super().__init__()
        self.cotrain = as_config(CotrainConfig, cotrain, "data.cotrain") if cotrain else None
        self._cotrain_loader: Optional[CotrainLoader] = None
        if shard_format not in ("video", "tokens"):
            raise ConfigError(f"data.shard_format must be 'video' or 'tokens', got {shard_format!r}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ConfigError(f"data.batches_per_epoch must be >= 1 or null, got {batches_per_epoch}")
        if windows_per_episode is not None and windows_per_episode < 1:
            raise ConfigError(f"data.windows_per_episode must be >= 1 or null, got {windows_per_episode}")
        self.resampled, self.batches_per_epoch = resampled, batches_per_epoch
        self._train_loader: Optional[ResumableLoader] = None
        self.train_urls = expand_urls(train_shards, "data.train_shards")
        self.val_urls = expand_urls(val_shards, "data.val_shards") if val_shards else None
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.windows_per_episode, self.shard_format, self.stats_file, self.seed = (
            windows_per_episode, shard_format, stats_file, seed)
        self.stats: Optional[dict[str, Any]] = None

    def _module(self):
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        if module is None or getattr(module, "robot_spec", None) is None:
            raise ConfigError("RobotDataModule needs a model with model.robot set (the finetuning module)")
        return module

    def load_stats(self) -> dict[str, Any]:
        if self.stats_file:
            with open(self.stats_file) as f:
                return json.load(f)
        for raw in raw_samples(self.train_urls[:1]):
            key = f"{self.train_urls[0]}:{raw.get('__key__', '?')}"
            stats = json.loads(raw.get("json", b"{}")).get("stats")
            if not isinstance(stats, dict) or "state" not in stats or "action" not in stats:
                raise ConfigError(f"data.train_shards: {key}.json has no 'stats' block (state/action mean, std, min, "
                                  "max); convert with a data_prep importer or pass data.stats_file")
            return stats
        raise ConfigError(f"data.train_shards: {self.train_urls[0]!r} holds no episodes")

    def setup(self, stage: str) -> None:
        if self.stats is None:
            self.stats = self.load_stats()
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        if module is not None and getattr(module, "robot_spec", None) is not None:
            for raw in raw_samples(self.train_urls[:1]):  # fail early on a view name the data does not have
                try:
                    episode_meta(raw, f"{self.train_urls[0]}:{raw.get('__key__', '?')}", module.robot_spec.view_names)
                except SampleError as exc:
                    raise ConfigError(f"data.train_shards: {exc}") from None
                break

    def _stream(self, urls: list[str], train: bool) -> RobotWindowStream:
        module = self._module()
        robot = module.robot_spec
        norm = Normalizer.from_stats(module.normalization_stats(self.stats), robot.arm_index, robot.gripper_index)
        tokens = module.tokens_spec if self.shard_format == "tokens" else None
        return RobotWindowStream(urls, robot, module.clip_spec, norm, tokens,
                                 self.windows_per_episode if train else None, shuffle=train,
                                 shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                                 resampled=self.resampled and train)

    def train_dataloader(self):
        if self._train_loader is None:  # one loader for the run: its progress (epoch, positions) is checkpointed
            self._train_loader = ResumableLoader(self._stream(self.train_urls, True), self.batches_per_epoch,
                                                 batch_size=self.batch_size, num_workers=self.num_workers,
                                                 collate_fn=collate_windows, drop_last=True,
                                                 pin_memory=torch.cuda.is_available())
        if self.cotrain is None:
            return self._train_loader
        if self._cotrain_loader is None:
            self._cotrain_loader = self._make_cotrain_loader()
        return self._cotrain_loader

    def _cotrain_clip(self) -> ClipSpec:
        clip, c = self._module().clip_spec, self.cotrain
        return ClipSpec(num_history=clip.num_history, future_frame_offset=c.future_frame_offset, fps=c.fps,
                        image_size=clip.image_size)

    def _cotrain_view(self) -> int:
        views = self._module().robot_spec.view_names
        name = self.cotrain.view or views[0]
        if name not in views:
            raise ConfigError(f"data.cotrain.view: {name!r} is not one of the model's views {views}")
        return views.index(name)

    def _make_cotrain_loader(self) -> CotrainLoader:
        c, module = self.cotrain, self._module()
        tokens = module.tokens_spec if c.shard_format == "tokens" else None
        urls = expand_urls(c.shards, "data.cotrain.shards")
        stream = MixedClipStream([(urls, 1.0)], self._cotrain_clip(), shuffle=True, shuffle_buffer=self.shuffle_buffer,
                                 seed=self.seed, tokens=tokens, resampled=True)
        video = ClipStreamLoader(stream, None, batch_size=self.batch_size, num_workers=self.num_workers,
                                 drop_last=True, pin_memory=torch.cuda.is_available())
        return CotrainLoader(self._train_loader, video, c.weight, self.seed, self._cotrain_view())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and "position" in batch:
            if self._cotrain_loader is not None:
                self._cotrain_loader.mark_consumed(batch)
            elif self._train_loader is not None:
                self._train_loader.mark_consumed(batch["position"])
        return batch

    def val_dataloader(self):
        if not self.val_urls:
            return []
        return DataLoader(self._stream(self.val_urls, False), batch_size=self.batch_size,
                          num_workers=min(self.num_workers, len(self.val_urls)), collate_fn=collate_windows)
