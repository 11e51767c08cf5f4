"""Client for `gr serve`: numpy + msgpack + websockets, no torch. Copy this file to the robot's computer.

    from gr.client import PolicyClient
    policy = PolicyClient("ws://gpu-box:8765")         # or: with PolicyClient(url) as policy: ...
    policy.reset()                                     # a new episode: a fresh history on the server
    chunk = policy.act({"images": {"head": head_rgb, "wrist": wrist_rgb}, "state": state, "instruction": "open it"})

Messages are msgpack maps; numpy arrays travel as {"__ndarray__": dtype, "shape": [...], "data": raw bytes}. Nothing
is pickled in either direction.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgpack
import numpy as np

# The dtypes an array may have on the wire (no object arrays: those would need pickle).
WIRE_DTYPES = ("|u1", "|i1", "<u2", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1")


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))  # little-endian on the wire
        if a.dtype.str not in WIRE_DTYPES:  # uint32/uint64 and the like: widen or convert to a wire dtype
            if a.dtype.kind not in "uif":
                raise TypeError(f"cannot send an array of dtype {obj.dtype}")
            a = a.astype("<f8" if a.dtype.kind == "f" else "<i8")
        return {"__ndarray__": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__}")


def _decode(m: dict) -> Any:
    if "__ndarray__" not in m:
        return m
    dtype, shape, data = m["__ndarray__"], m.get("shape"), m.get("data")
    if dtype not in WIRE_DTYPES or not isinstance(shape, list) or not isinstance(data, bytes):
        raise ValueError(f"bad array on the wire: dtype {dtype!r}, shape {shape!r}")
    if np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)) != len(data):
        raise ValueError(f"bad array on the wire: {len(data)} bytes for dtype {dtype} and shape {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_decode, raw=False)


class PolicyServerError(RuntimeError):
    """The server's error reply (a bad request); the connection stays usable."""


class PolicyClient:
    def __init__(self, url: str, session: str | None = None, max_size: int = 64 * 2**20):
        from websockets.sync.client import connect

        self._conn = connect(url, max_size=max_size)  # websockets >= 17 wants connect() entered as a context
        self.ws, self.session = self._conn.__enter__(), session or uuid.uuid4().hex
        self.spec = self._call({"type": "hello"})["spec"]  # views, image size, state/action dims, chunk

    def _call(self, request: dict) -> dict:
        self.ws.send(pack(request))
        reply = unpack(self.ws.recv())
        if "error" in reply:
            raise PolicyServerError(reply["error"])
        return reply

    def reset(self) -> None:
        self._call({"type": "reset", "session": self.session})

    def act(self, obs: dict) -> np.ndarray:
        reply = self._call({"type": "act", "session": self.session, "obs": obs})
        self.last_latency_ms = reply["server_ms"]
        return reply["actions"]

    def close(self) -> None:
        self._conn.__exit__(None, None, None)

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
