"""Video I/O: decode mp4 bytes with decord (in a crash-isolated child process, gr/data/decode_sandbox.py), encode H.264 mp4 with PyAV, resize + centre-crop, fps resampling.

Frames are uint8 (T, H, W, 3) numpy arrays throughout.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np


class VideoDecodeError(ValueError):
    """A video could not be decoded (corrupt, truncated, empty or too short)."""


class Frames:
    """What decord's `get_batch` returns, as far as gr uses it; returned by the sandboxed and PyAV readers."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def asnumpy(self) -> np.ndarray:
        return self.array


def open_video(data: bytes | str, sandbox: Optional[bool] = None):
    """A decord VideoReader over video bytes or a path; raises VideoDecodeError on unreadable input.

    Streams decord cannot open (AV1, LeRobot's default codec) are read with PyAV instead (gr/data/pyav_reader.py).

    decord kills the process (SIGSEGV) on about 1% of byte-mutated mp4s instead of raising, so by default
    (`sandbox=None`: unless GR_DECODE_SANDBOX=0) the reader is a proxy whose decoding runs in a child process, and
    such a crash is this video's VideoDecodeError (gr/data/decode_sandbox.py). `sandbox=False` decodes in-process.
    """
    from gr.data import decode_sandbox

    if sandbox or (sandbox is None and decode_sandbox.enabled()):
        return decode_sandbox.SandboxedVideo(data)
    import decord

    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        vr = decord.VideoReader(src, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError / RuntimeError variants
        from gr.data.pyav_reader import PyAVVideo

        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            vr = PyAVVideo(data)
        except VideoDecodeError as fallback:
            raise VideoDecodeError(f"cannot open video: {why} (PyAV: {fallback})") from exc
    if len(vr) == 0:
        raise VideoDecodeError("video has no frames")
    return vr


def resample_indices(num_frames: int, native_fps: float, target_fps: float, start_s: float = 0.0,
                     end_s: Optional[float] = None) -> np.ndarray:
    """Indices of native frames nearest to times start_s, start_s + 1/target_fps, ... before end_s."""
    if native_fps <= 0:
        raise VideoDecodeError(f"video reports fps {native_fps}")
    duration = num_frames / native_fps
    end_s = duration if end_s is None else min(end_s, duration)
    times = np.arange(start_s, end_s - 1e-9, 1.0 / target_fps)
    idx = np.floor(times * native_fps + 1e-6).astype(np.int64)
    return idx[idx < num_frames]


def get_frames(vr, indices: Sequence[int]) -> np.ndarray:
    """Decode the given frame indices -> uint8 (T, H, W, 3); raises VideoDecodeError on a broken stream."""
    try:
        frames = vr.get_batch(list(indices)).asnumpy()
    except VideoDecodeError:  # from the decoder child, already worded
        raise
    except Exception as exc:
        raise VideoDecodeError(f"decoding frames failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoDecodeError(f"decoded frames have shape {frames.shape}, expected (T, H, W, 3)")
    return frames


def get_frames_min_size(vr, indices: Sequence[int], min_side: int) -> np.ndarray:
    """`get_frames`, refusing frames whose short side is below `min_side` (e.g. a tokenizer's downsampling factor)
    with a VideoDecodeError that says so. decord itself fails on some tiny videos, so the size is also checked then."""
    try:
        frames = get_frames(vr, indices)
    except VideoDecodeError as exc:
        try:
            h, w = vr[0].shape[:2]
        except Exception:  # the first frame does not decode either: report the original failure
            raise exc from None
        if min(h, w) >= min_side:
            raise
        frames = np.zeros((0, h, w, 3), np.uint8)
    h, w = frames.shape[1:3]
    if min(h, w) < min_side:
        raise VideoDecodeError(f"{h}x{w} px frames are smaller than the tokenizer's downsampling factor {min_side}")
    return frames


def resize_center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is `size` (antialiased), then centre-crop to size x size."""
    t, h, w, _ = frames.shape
    if h == size and w == size:
        return frames
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


_ENCODER_OPTIONS = {"libx264": {"preset": "veryfast", "tune": "zerolatency"}, "libsvtav1": {"preset": "10"},
                    "libvpx-vp9": {"b": "0", "deadline": "realtime", "cpu-used": "8"}}


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) -> H.264 mp4 bytes (yuv420p, so H and W must be even). What shards store."""
    return encode_video(frames, fps, crf=crf)


def encode_video(frames: np.ndarray, fps: float, codec: str = "libx264", container: str = "mp4",
                 crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) -> video bytes with a PyAV encoder (libx264; libsvtav1 or libvpx-vp9 for files such as
    LeRobot's AV1 videos, which tests and benchmarks need to make), yuv420p."""
    import av

    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("encode_video: no frames")
    if h % 2 or w % 2:
        raise ValueError(f"encode_video: yuv420p needs even sizes, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), **_ENCODER_OPTIONS.get(codec, {})}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
