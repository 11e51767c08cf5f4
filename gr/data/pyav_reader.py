"""A decord-VideoReader look-alike over PyAV, for the streams decord cannot open.

decord 0.6's bundled FFmpeg has no AV1 decoder, and AV1 (libsvtav1) is LeRobot's default video codec since its v3.0
format: decord stops on such a file with "cannot find video stream with wanted index: -1". PyAV (already a
dependency, for encoding) decodes it with libdav1d. `gr.data.video_io.open_video` falls back to this reader whenever
decord cannot open a video, so every reader in gr (shards, tokenizer frames, robot episodes, importers,
tokenize_shards, rollout sources) takes such files; frames come out as the same uint8 (T, H, W, 3) RGB arrays.

Frame i is the frame whose presentation time is nearest i / fps after the stream's start. Reading frames seeks to the
key frame before the first one asked for and decodes forward, so a long multi-episode file (LeRobot v3 packs many
episodes into one mp4) is not decoded from its start for every episode.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from gr.data.video_io import Frames, VideoDecodeError

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PyAVVideo:
    def __init__(self, source: bytes | str):
        import av

        self._data = source if isinstance(source, (bytes, bytearray)) else None
        try:
            self._container = av.open(io.BytesIO(source) if self._data is not None else source)
        except Exception as exc:  # noqa: BLE001 - av.error.* and OSError variants; this file's error either way
            raise VideoDecodeError(_first_line(exc)) from exc
        if not self._container.streams.video:
            raise VideoDecodeError("no video stream")
        self._stream = stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else 0.0
        if self.fps <= 0:
            raise VideoDecodeError("the video stream has no frame rate")
        self._time_base = float(stream.time_base)
        self._start = stream.start_time or 0
        try:
            self.num_frames = int(stream.frames) or self._count_frames()
        except Exception as exc:  # noqa: BLE001
            raise VideoDecodeError(f"cannot read the stream: {_first_line(exc)}") from exc
        self.codec = stream.codec_context.name

    def _count_frames(self) -> int:
        """Containers such as webm/mkv do not store a frame count: count the packets (demuxing, no decoding)."""
        n = sum(1 for packet in self._container.demux(self._stream) if packet.pts is not None)
        self._container.seek(0)
        return n

    def _index(self, frame) -> int:
        return int(round((frame.pts - self._start) * self._time_base * self.fps))

    def __len__(self) -> int:
        return self.num_frames

    def get_avg_fps(self) -> float:
        return self.fps

    def _decode_from(self, first: int, wanted: set[int], last: int) -> dict[int, np.ndarray]:
        pts = self._start + int(first / self.fps / self._time_base)
        self._container.seek(max(pts, self._start), stream=self._stream, backward=True, any_frame=False)
        out: dict[int, np.ndarray] = {}
        started = None
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                continue
            i = self._index(frame)
            started = i if started is None else started
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        if started is not None and started > first and first > 0:
            return self._decode_from(0, wanted, last)  # the seek overshot: decode from the start instead
        return out

    def get_batch(self, indices: Sequence[int]) -> Frames:
        indices = [int(i) for i in indices]
        if not indices:
            raise VideoDecodeError("no frame indices asked for")
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise VideoDecodeError(f"frame index {bad[0]} out of range for a video of {self.num_frames} frames")
        wanted = set(indices)
        try:
            got = self._decode_from(min(wanted), wanted, max(wanted))
        except Exception as exc:  # noqa: BLE001
            raise VideoDecodeError(f"decoding failed: {_first_line(exc)}") from exc
        missing = sorted(wanted - set(got))
        if missing:
            raise VideoDecodeError(f"frame {missing[0]} of {self.num_frames} did not decode")
        return Frames(np.stack([got[i] for i in indices]))

    def __getitem__(self, i: int) -> Frames:
        return Frames(self.get_batch([i]).asnumpy()[0])
