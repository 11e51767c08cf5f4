"""Video decoding in a child process, so that a native decoder crash costs one video and not the run.

decord dies with SIGSEGV on about 1% of byte-mutated mp4s instead of raising (`tools/fuzz_inputs.py
--decord-crash-rate`), and in a DataLoader worker that ends training. Vetting files with PyAV first let most crashing
files through, so every decode is moved out of the training process instead: each process that reads video (the main
process, each DataLoader worker, each data_prep tool) starts one long-lived decoder child on first use, running
`python -m gr.data.decode_sandbox`. It opens videos with decord and returns frames; when it dies (a signal) or stalls
past `timeout_s`, the caller gets a `VideoDecodeError` naming the signal, which the streams count as a skipped
sample, and the next video starts a fresh child.

Wire format, both ways: a 4-byte little-endian length, a JSON header of that length, then `header["nbytes"]` raw bytes
(mp4 bytes one way, uint8 frames the other). Nothing is pickled, so a decoder exploited by a hostile file can send
back only bytes that are read as an array. The child holds up to `MAX_OPEN` open readers (LRU); a proxy whose reader
was evicted, or whose child died, reopens from the bytes or path it keeps.

`GR_DECODE_SANDBOX=0` decodes in-process instead (faster start, no isolation); `bench/loader_speed.py` measures both.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from gr.data.video_io import Frames, VideoDecodeError

MAX_OPEN = 8
_LEN = struct.Struct("<I")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def enabled() -> bool:
    return os.environ.get("GR_DECODE_SANDBOX", "1") != "0"


def _pack(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps({**header, "nbytes": len(payload)}).encode()
    return _LEN.pack(len(head)) + head + payload


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> bytearray:
    """n bytes from fd (a bytearray, so frames read from it are writable arrays without a copy); EOFError when the
    writer is gone, TimeoutError past `deadline` (time.monotonic())."""
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    while got < n:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        k = os.readv(fd, [view[got:]])
        if not k:
            raise EOFError
        got += k
    return buf


def _read_message(fd: int, deadline: Optional[float] = None) -> tuple[dict, bytes]:
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    header = json.loads(_read_exact(fd, n, deadline))
    return header, _read_exact(fd, int(header["nbytes"]), deadline)


# ---- the child ---------------------------------------------------------------------------------------------------------
def _serve(inp: int, out: int) -> None:
    from gr.data import video_io

    readers: OrderedDict[int, object] = OrderedDict()
    while True:
        try:
            header, payload = _read_message(inp)
        except EOFError:  # the parent is gone
            return
        reply, data = {}, b""
        try:
            handle = header.get("handle")
            if header["op"] == "open":
                vr = video_io.open_video(payload if header.get("path") is None else header["path"], sandbox=False)
                readers[handle] = vr
                while len(readers) > MAX_OPEN:
                    readers.popitem(last=False)
                reply = {"len": len(vr), "fps": float(vr.get_avg_fps())}
            elif header["op"] in ("frames", "frame"):
                if handle not in readers:
                    reply = {"reopen": True}
                else:
                    readers.move_to_end(handle)
                    vr = readers[handle]
                    # "frame" is decord's vr[i], which decodes some tiny videos that get_batch refuses
                    frames = (video_io.get_frames(vr, header["indices"]) if header["op"] == "frames" else
                              vr[int(header["indices"][0])].asnumpy())
                    frames = np.ascontiguousarray(frames, dtype=np.uint8)
                    reply, data = {"shape": list(frames.shape)}, frames.tobytes()
        except video_io.VideoDecodeError as exc:
            reply = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a decoder failure of any kind is this video's error, not the child's
            reply = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        os.write(out, _pack(reply, data))


def main() -> None:
    out = os.dup(1)
    os.dup2(2, 1)  # the protocol has fd `out` to itself; anything printed goes to stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; the child ends on EOF
    _serve(sys.stdin.fileno(), out)


# ---- the parent --------------------------------------------------------------------------------------------------------
class DecoderProcess:
    """One decoder child for this process (re-created after a fork, a crash or a timeout)."""

    def __init__(self, timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.owner = 0  # the pid that started `proc`: a forked DataLoader worker must start its own
        self.generation = 0  # bumped on every start, so proxies know their readers are gone
        self.crashes = 0
        self._handles = 0

    def new_handle(self) -> int:
        self._handles += 1
        return self._handles

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gr.data.decode_sandbox"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=0)
        self.owner = os.getpid()
        self.generation += 1

    def _ensure(self) -> None:
        if self.proc is not None and self.owner != os.getpid():
            self.proc = None  # the parent's child, inherited through fork: leave it to the parent
        if self.proc is None or self.proc.poll() is not None:
            self._start()

    def _stop(self) -> str:
        """Kill the child (if alive) and describe how it ended."""
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        for f in (proc.stdin, proc.stdout):
            f.close()
        if rc < 0:
            try:
                return signal.Signals(-rc).name
            except ValueError:
                return f"signal {-rc}"
        return f"exit status {rc}"

    def request(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        self._ensure()
        try:
            self.proc.stdin.write(_pack(header, payload))
            return _read_message(self.proc.stdout.fileno(), time.monotonic() + self.timeout_s)
        except TimeoutError:
            self._stop()
            self.crashes += 1
            raise_decode_error(f"the decoder process stalled for over {self.timeout_s:g} s on this video and was "
                               f"killed")
        except (EOFError, BrokenPipeError):
            how = self._stop()
            self.crashes += 1
            raise_decode_error(f"the decoder process died on this video ({how})")

    def close(self) -> None:
        if self.proc is not None and self.owner == os.getpid():
            self._stop()


def raise_decode_error(message: str):
    raise VideoDecodeError(message)


_DECODER: Optional[DecoderProcess] = None


def decoder() -> DecoderProcess:
    global _DECODER
    if _DECODER is None:
        _DECODER = DecoderProcess()
    return _DECODER


class SandboxedVideo:
    """A decord-VideoReader look-alike (len, get_avg_fps, get_batch, [i]) whose decoding runs in the decoder child."""

    def __init__(self, source: bytes | str, proc: Optional[DecoderProcess] = None):
        self.source = source if isinstance(source, bytes) else bytes(source) if isinstance(
            source, (bytearray, memoryview)) else os.fspath(source)
        self.proc = proc or decoder()
        self._open()

    def _open(self) -> None:
        self.handle = self.proc.new_handle()
        is_path = isinstance(self.source, str)
        reply, _ = self.proc.request({"op": "open", "handle": self.handle, "path": self.source if is_path else None},
                                     b"" if is_path else self.source)
        if "error" in reply:
            raise_decode_error(reply["error"])
        self.generation, self.num_frames, self.fps = self.proc.generation, int(reply["len"]), float(reply["fps"])

    def __len__(self) -> int:
        return self.num_frames

    def get_avg_fps(self) -> float:
        return self.fps

    def get_batch(self, indices: Sequence[int], op: str = "frames") -> Frames:
        indices = [int(i) for i in indices]
        for _ in range(2):
            if self.proc.generation != self.generation or self.proc.proc is None:
                self._open()  # the child was restarted since this video was opened
            reply, data = self.proc.request({"op": op, "handle": self.handle, "indices": indices})
            if not reply.get("reopen"):
                break
            self.generation = -1  # evicted from the child's LRU: open again
        if "error" in reply:
            raise_decode_error(reply["error"])
        shape = tuple(reply["shape"])
        if int(np.prod(shape)) != len(data):
            raise_decode_error(f"the decoder process returned {len(data)} bytes for frames of shape {shape}")
        return Frames(np.frombuffer(data, np.uint8).reshape(shape))

    def __getitem__(self, i: int) -> Frames:
        return self.get_batch([i], op="frame")


if __name__ == "__main__":
    main()
