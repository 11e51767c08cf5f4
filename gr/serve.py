"""`gr serve`: a policy server for robots whose controller runs in another process or on another machine.

    gr serve --checkpoint outputs/demo/export --port 8765              # loopback only
    gr serve --checkpoint CKPT_OR_EXPORT --host 0.0.0.0 --port 8765    # reachable from the robot's computer

Protocol: a websocket carrying binary msgpack maps (gr/client.py packs them, numpy arrays as raw bytes with dtype and
shape; nothing is pickled). Requests, each answered by one reply:
- `{"type": "hello"}` -> `{"spec": {views, image_size, state_dim, action_dim, action_chunk, num_history, ...}}`;
- `{"type": "reset", "session": id}` -> opens or restarts that session's history (one per robot / episode);
- `{"type": "act", "session": id, "obs": {"images": {view: uint8 (H, W, 3)}, "state": (S,), "instruction": str}}`
  -> `{"actions": float32 (k, A) in robot units, "server_ms": {"queue", "compute", "total", "batch"}}`;
- `{"type": "stats"}` -> latency percentiles, batch sizes, sessions; `{"type": "close", "session": id}`.
A bad request (not msgpack, unknown type, unknown session, a missing view, a wrong image shape or dtype, a wrong state
size) gets `{"error": message}` and the connection keeps working. Frames over `--max-request-mib` close that
connection (websocket code 1009); the server keeps serving everyone else.

Batching: requests from all connections go through one queue; the model thread takes every request waiting when it
becomes free (continuous batching: a lone client never waits for company) and runs them as one batch, one VQGAN call
and one prefix pass. A session's requests stay in order (at most one per batch).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import logging
import statistics
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

from gr.client import pack, unpack

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A client mistake: answered with an error reply."""


class PolicyServer:
    """Serves one GRPolicy to many sessions.

    Args:
        policy: the loaded GRPolicy (its module, statistics and text-feature cache are shared by all sessions).
        max_batch: the most requests run as one batch.
        max_sessions: open sessions kept; beyond it the least recently used one is dropped (its next act is refused
            as an unknown session).
        max_request_bytes: the largest websocket message accepted.
        max_connections: open connections served at once.
    """

    def __init__(self, policy, max_batch: int = 16, max_sessions: int = 256, max_request_bytes: int = 16 * 2**20,
                 max_connections: int = 64):
        if max_batch < 1 or max_sessions < 1 or max_request_bytes < 1024 or max_connections < 1:
            raise ValueError("max_batch, max_sessions and max_connections must be >= 1, max_request_bytes >= 1024")
        self.policy, self.max_batch, self.max_sessions = policy, max_batch, max_sessions
        self.max_connections, self.connections = max_connections, 0
        self.max_request_bytes = max_request_bytes
        self.sessions: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.latency_ms: collections.deque = collections.deque(maxlen=4096)
        self.batch_sizes: collections.deque = collections.deque(maxlen=4096)
        self.requests = self.errors = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr-serve-model")
        self._queue: Optional[asyncio.Queue] = None

    # ---- facts the client needs ----
    def spec(self) -> dict[str, Any]:
        robot, clip = self.policy.robot, self.policy.clip
        return {"views": list(robot.view_names), "image_size": clip.image_size, "state_dim": robot.state_dim,
                "action_dim": robot.action_dim, "action_chunk": robot.action_chunk, "num_history": clip.num_history,
                "history_stride": robot.history_stride,
                "max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes,
                "max_connections": self.max_connections}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None  # noqa: E731
        return {"requests": self.requests, "errors": self.errors, "sessions": len(self.sessions),
                "total_ms_p50": pct(0.5), "total_ms_p95": pct(0.95), "total_ms_max": lat[-1] if lat else None,
                "mean_batch": round(statistics.fmean(self.batch_sizes), 3) if self.batch_sizes else None}

    # ---- requests ----
    async def handle(self, ws) -> None:
        """One websocket connection: each message gets exactly one reply. Beyond `max_connections` a new connection
        is closed at once with code 1013 (try again later)."""
        if self.connections >= self.max_connections:
            await ws.close(1013, f"server full: {self.max_connections} connections")
            return
        self.connections += 1
        try:
            async for message in ws:
                t0 = time.perf_counter()
                reply = await self._reply(message, t0)
                await ws.send(pack(reply))
        finally:
            self.connections -= 1

    async def _reply(self, message: Any, t0: float) -> dict[str, Any]:
        self.requests += 1
        try:
            if not isinstance(message, bytes):
                raise BadRequest("send binary msgpack messages, not text frames")
            try:
                req = unpack(message)
            except Exception as exc:  # msgpack's errors, or a malformed array on the wire
                raise BadRequest(f"not a valid msgpack request: {exc}") from None
            if not isinstance(req, dict):
                raise BadRequest(f"a request is a msgpack map, got {type(req).__name__}")
            kind = req.get("type")
            if kind == "hello":
                return {"spec": self.spec()}
            if kind == "stats":
                return {"stats": self.stats()}
            if kind in ("reset", "close", "act"):
                session = req.get("session")
                if not isinstance(session, str) or not session or len(session) > 256:
                    raise BadRequest("'session' must be a non-empty string of at most 256 characters")
                if kind == "reset":
                    self._open(session)
                    return {"ok": True, "session": session}
                if kind == "close":
                    self.sessions.pop(session, None)
                    return {"ok": True}
                if session not in self.sessions:
                    raise BadRequest(f"unknown session {session!r}: send {{'type': 'reset', 'session': ...}} first")
                self.sessions.move_to_end(session)  # least recently *used* is dropped first
                obs = req.get("obs")
                self._check(obs)
                future = asyncio.get_running_loop().create_future()
                await self._queue.put((session, obs, future, t0))
                actions, timing = await future
                return {"actions": actions, "server_ms": timing}
            raise BadRequest(f"unknown request type {kind!r}: expected hello, reset, act, stats or close")
        except (BadRequest, ValueError) as exc:
            self.errors += 1
            return {"error": str(exc)}
        except Exception as exc:  # the model failed: say so, keep serving
            self.errors += 1
            log.exception("request failed")
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}

    def _check(self, obs: Any) -> None:
        try:
            self.policy.check_observation(obs)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        for view in self.policy.robot.view_names:
            image = obs["images"][view]
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
                raise BadRequest(f"obs['images'][{view!r}] must be a uint8 array, got "
                                 f"{getattr(image, 'dtype', type(image).__name__)}")
        state = obs["state"]
        if not isinstance(state, (np.ndarray, list)) or not np.issubdtype(np.asarray(state).dtype, np.number):
            raise BadRequest("obs['state'] must be a numeric array")

    def _open(self, session: str) -> None:
        self.sessions[session] = self.policy.new_history()
        self.sessions.move_to_end(session)
        while len(self.sessions) > self.max_sessions:
            old, _ = self.sessions.popitem(last=False)
            log.info("session %s dropped: more than %d sessions", old, self.max_sessions)

    # ---- the model thread ----
    async def batcher(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list = []
        while True:
            if not waiting:
                waiting.append(await self._queue.get())
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            batch, seen, later = [], set(), []
            for item in waiting:  # one request per session per batch, in arrival order
                if item[0] in seen or len(batch) >= self.max_batch:
                    later.append(item)
                else:
                    seen.add(item[0])
                    batch.append(item)
            waiting = later
            # The histories are taken here, on the event loop that also serves reset and close: a session closed or
            # reset while the model runs keeps the batch valid (the old episode's history gets this step, the new
            # one starts empty).
            histories = [self.sessions.get(item[0]) for item in batch]
            start = time.perf_counter()
            try:
                chunks = await loop.run_in_executor(self._executor, self._run, batch, histories)
            except Exception as exc:
                log.exception("batch of %d failed", len(batch))
                for *_, future, _t0 in batch:
                    if not future.done():
                        future.set_exception(RuntimeError(f"{type(exc).__name__}: {exc}"))
                continue
            end = time.perf_counter()
            self.batch_sizes.append(len(batch))
            for (session, _, future, t0), chunk in zip(batch, chunks):
                if chunk is None:
                    future.set_exception(BadRequest(f"unknown session {session!r}: it was closed or dropped"))
                    continue
                total = (end - t0) * 1000
                self.latency_ms.append(total)
                future.set_result((chunk, {"queue": round((start - t0) * 1000, 3),
                                           "compute": round((end - start) * 1000, 3), "total": round(total, 3),
                                           "batch": len(batch)}))

    def _run(self, batch: list, histories: list) -> list[Optional[np.ndarray]]:
        live = [i for i, h in enumerate(histories) if h is not None]
        out: list[Optional[np.ndarray]] = [None] * len(batch)
        if live:
            entries = self.policy.encode_observations([batch[i][1] for i in live])
            for i, entry in zip(live, entries):
                self.policy.push_entry(histories[i], entry)
            chunks = self.policy.predict_chunks([histories[i] for i in live], [batch[i][1]["instruction"] for i in live])
            for i, chunk in zip(live, chunks):
                out[i] = chunk
        return out

    # ---- running ----
    async def serve(self, host: str, port: int, ready: Optional[callable] = None,
                    stop: Optional[asyncio.Event] = None) -> None:
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        worker = asyncio.create_task(self.batcher())
        try:
            # max_queue=2: a connection buffers at most two unread messages, so memory is bounded by
            # max_connections x 2 x max_request_bytes.
            async with serve(self.handle, host, port, max_size=self.max_request_bytes, max_queue=2,
                             compression=None) as server:
                bound = server.sockets[0].getsockname()[1]
                log.info("gr serve: listening on ws://%s:%d", host, bound)
                if ready is not None:
                    ready(bound)
                await (stop.wait() if stop is not None else asyncio.Future())
        finally:
            worker.cancel()


class ServerThread:
    """Run a PolicyServer on its own event loop in a background thread (tests, benchmarks, notebooks).

    `with ServerThread(server, port=0) as url: PolicyClient(url)...`
    """

    def __init__(self, server: PolicyServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host, self.port = server, host, port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="gr-serve")
        self._error: Optional[BaseException] = None

    def _main(self) -> None:
        async def run():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve(self.host, self.port, ready=self._bound, stop=self._stop)

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()

    def _bound(self, port: int) -> None:
        self.port = port
        self._ready.set()

    def __enter__(self) -> str:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return f"ws://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="gr serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="finetuned checkpoint: .ckpt, sharded folder or gr export folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--device", default="cpu", help="torch device for the model (cuda, cuda:1, cpu)")
    p.add_argument("--max-batch", type=int, default=16, help="the most concurrent requests run as one batch")
    p.add_argument("--max-sessions", type=int, default=256, help="open sessions kept (least recently used dropped)")
    p.add_argument("--max-request-mib", type=float, default=16.0, help="largest request accepted, in MiB")
    p.add_argument("--max-connections", type=int, default=64, help="open connections served at once")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from gr.policy import GRPolicy

    try:
        policy = GRPolicy.from_checkpoint(args.checkpoint, map_location=args.device)
        server = PolicyServer(policy, args.max_batch, args.max_sessions, int(args.max_request_mib * 2**20),
                              args.max_connections)
    except ValueError as exc:
        print(f"gr serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(server.serve(args.host, args.port))
    except KeyboardInterrupt:
        print(f"gr serve: stopped; {server.stats()}", file=sys.stderr)


if __name__ == "__main__":
    main()
