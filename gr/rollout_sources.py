"""What `gr rollout --source` reads for text-video checkpoints: a video file, a folder of them, or shards.

- A video file in any container and codec `gr.data.video_io.open_video` opens (decord: mp4, avi, mpg/mpeg, mov, mkv,
  webm, ...; PyAV for what decord cannot, such as AV1). Its caption is `--caption`, else a sidecar beside it:
  `<stem>.txt` (the whole text) or `<stem>.json` (its "caption" field, as in text-video shards).
- A folder: its video files (by the extensions below) in name order, each captioned the same way.
- Text-video shards (a path or brace pattern): `{key}.mp4` + `{key}.json` samples, or pre-tokenized samples
  (`{key}.tokens.npy` + the json `tokens` block, made by data_prep/tokenize_shards.py) whose codes must come from the
  model's own VQGAN. Pre-tokenized clips have no raw frames: their ground truth is the VQGAN decode of the true codes,
  and the rollout labels it so.

Every problem is a ValueError naming the file (or shard:key) and, for undecodable video, the decoder's message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mpg", ".mpeg", ".mkv", ".webm", ".ts", ".flv", ".wmv")
SHARD_EXTENSIONS = (".tar", ".tgz", ".tar.gz")


@dataclass
class RolloutClip:
    """One clip to roll out: raw frames (T, S, S, 3) uint8 or, for pre-tokenized clips, codes (T, h, w) int64, at the
    model's clip fps."""

    key: str
    caption: str
    frames: Optional[np.ndarray] = None
    codes: Optional[np.ndarray] = None

    @property
    def pretokenized(self) -> bool:
        return self.codes is not None

    def __len__(self) -> int:
        return len(self.codes if self.pretokenized else self.frames)


def sidecar_caption(path: str) -> Optional[str]:
    """The caption stored beside a video: `<stem>.txt`, else `<stem>.json`'s "caption"; None when there is neither."""
    stem = os.path.splitext(path)[0]
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            text = f.read().strip()
        if not text:
            raise ValueError(f"--source {stem}.txt: the caption file is empty")
        return text
    if os.path.isfile(stem + ".json"):
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--source {stem}.json: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str) or not meta["caption"].strip():
            raise ValueError(f"--source {stem}.json: needs a non-empty string field 'caption'")
        return meta["caption"]
    return None


def _frames(data: bytes | str, fps: float, size: int, where: str, start: float = 0.0,
            end: Optional[float] = None) -> np.ndarray:
    from gr.data.video_io import VideoDecodeError, get_frames, open_video, resample_indices, resize_center_crop

    try:
        vr = open_video(data)
        idx = resample_indices(len(vr), vr.get_avg_fps(), fps, start, end)
        return resize_center_crop(get_frames(vr, [int(i) for i in idx]), size)
    except VideoDecodeError as exc:
        raise ValueError(f"--source {where}: {exc}") from None


def video_file(path: str, caption: Optional[str], clip) -> RolloutClip:
    caption = caption or sidecar_caption(path)
    if not caption:
        stem = os.path.splitext(os.path.basename(path))[0]
        raise ValueError(f"--source {path}: no caption; pass --caption or put {stem}.txt or {stem}.json (with a "
                         f"'caption' field) beside it")
    return RolloutClip(os.path.basename(path), caption, frames=_frames(path, clip.fps, clip.image_size, path))


def _shard_sample(raw: dict[str, Any], key: str, caption: Optional[str], clip,
                  tokens_spec: Optional[dict[str, Any]]) -> Optional[RolloutClip]:
    from gr.data.shards import SampleError, load_codes, parse_meta, tokens_spec_mismatch
    from gr.data.video_io import VideoDecodeError, resample_indices

    if "json" not in raw or ("mp4" not in raw and "tokens.npy" not in raw):
        return None
    try:
        meta = parse_meta(raw["json"], key)
        if "mp4" in raw:
            frames = _frames(raw["mp4"], clip.fps, clip.image_size, f"{key}.mp4", meta.get("start") or 0.0,
                             meta.get("end"))
            return RolloutClip(key, caption or meta["caption"], frames=frames)
        why = tokens_spec_mismatch(meta.get("tokens"), tokens_spec or {})
        if why:
            raise SampleError(f"{key}.json: {why}")
        codes = load_codes(raw["tokens.npy"], meta["tokens"], f"{key}.tokens.npy")
        try:
            idx = resample_indices(len(codes), float(meta["tokens"]["fps"]), clip.fps, meta.get("start") or 0.0,
                                   meta.get("end"))
        except (KeyError, TypeError, ValueError, VideoDecodeError) as exc:
            raise SampleError(f"{key}.json: tokens.fps: {exc}") from None
        return RolloutClip(key, caption or meta["caption"], codes=codes[idx].astype(np.int64))
    except SampleError as exc:
        raise ValueError(f"--source {exc}") from None


def clip_sources(source: str, caption: Optional[str], clip, count: int,
                 tokens_spec: Optional[dict[str, Any]] = None) -> list[RolloutClip]:
    """Up to `count` clips from `source` (see the module docstring); `tokens_spec` is the model's, for checking
    pre-tokenized codes. All clips are of one kind, raw or pre-tokenized."""
    from gr.data.shards import expand_urls, raw_samples

    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(VIDEO_EXTENSIONS))
        if not names:
            raise ValueError(f"--source {source}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in this folder")
        out = [video_file(os.path.join(source, n), caption, clip) for n in names[:count]]
    elif os.path.isfile(source) and not source.lower().endswith(SHARD_EXTENSIONS):
        out = [video_file(source, caption, clip)]
    elif source.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(f"--source {source}: video file not found")
    else:
        out = []
        for raw in raw_samples(expand_urls(source, "--source")):
            key = f"{os.path.basename(raw.get('__url__', '?'))}:{raw.get('__key__', '?')}"
            sample = _shard_sample(raw, key, caption, clip, tokens_spec)
            if sample is not None:
                out.append(sample)
            if len(out) == count:
                break
        if not out:
            raise ValueError(f"--source {source!r}: no text-video sample (mp4 or tokens.npy, with json) found")
    if len({s.pretokenized for s in out}) > 1:
        raise ValueError(f"--source {source!r}: mixes pre-tokenized and mp4 samples; roll out one kind at a time")
    return out
