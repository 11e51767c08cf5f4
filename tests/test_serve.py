"""`gr serve` + gr/client.py on loopback: a Meta-World episode through the client gets the in-process policy's actions,
concurrent sessions are batched and stay independent, and bad requests get error replies while the server serves on."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from gr.client import PolicyClient, PolicyServerError, pack, unpack
from gr.policy import GRPolicy
from gr.serve import PolicyServer, ServerThread
from gr.training.finetune import FinetuneModule
from tests.conftest import REPO, TINY_ROBOT_MODEL, module_init_args
from tests.test_eval import STATS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    module.normalization_stats(STATS)
    path = tmp_path_factory.mktemp("serve") / "robot.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


@pytest.fixture(scope="module")
def served(ckpt):
    server = PolicyServer(GRPolicy.from_checkpoint(ckpt), max_batch=8, max_request_bytes=2**20)
    with ServerThread(server) as url:
        yield url, server


def test_client_imports_no_torch():
    code = "import sys, gr.client; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_wire_format_round_trips_arrays_without_pickle():
    obs = {"images": {"head": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)}, "state": np.float32([1.5, -2.0]),
           "big": np.arange(3, dtype=">f8")}
    back = unpack(pack(obs))
    np.testing.assert_array_equal(back["images"]["head"], obs["images"]["head"])
    assert back["state"].dtype == np.float32 and back["big"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(back["big"], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="bad array on the wire: dtype '|O'"):
        unpack(pack({"x": {"__ndarray__": "|O", "shape": [1], "data": b"\x00" * 8}}))
    with pytest.raises(ValueError, match="4 bytes for dtype <f4 and shape \\[2\\]"):
        unpack(pack({"x": {"__ndarray__": "<f4", "shape": [2], "data": b"\x00" * 4}}))


def test_metaworld_episode_through_the_client_matches_the_in_process_policy(served, ckpt):
    from gr.envs import make_env

    url, server = served
    local = GRPolicy.from_checkpoint(ckpt)
    client = PolicyClient(url)
    assert client.spec["views"] == ["head", "wrist"] and client.spec["action_chunk"] == 4
    env = make_env("drawer-open-v3", 7, image_size=32)
    try:
        obs = env.reset()
        client.reset()
        local.reset()
        for _ in range(6):
            o = {"images": obs["images"], "state": obs["state"], "instruction": env.instruction}
            remote, mine = client.act(o), local.act(o)
            assert remote.shape == (4, 4) and remote.dtype == np.float32
            np.testing.assert_array_equal(remote, mine)
            assert client.last_latency_ms["total"] >= client.last_latency_ms["compute"] > 0
            obs, _, _ = env.step(np.clip(mine[0], -1, 1))
    finally:
        env.close()
        client.close()
    stats = PolicyClient(url)._call({"type": "stats"})["stats"]
    assert stats["requests"] >= 6 and stats["total_ms_p50"] > 0


def test_concurrent_sessions_are_batched_and_keep_their_own_history(served, ckpt):
    url, server = served
    n, steps = 4, 5
    rng = np.random.default_rng(0)
    episodes = [[{"images": {v: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for v in ("head", "wrist")},
                  "state": rng.normal(size=4).astype(np.float32), "instruction": f"task {i % 2}"}
                 for _ in range(steps)] for i in range(n)]
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def drive(i):
        try:
            c = PolicyClient(url, session=f"robot-{i}")
            c.reset()
            out = []
            for obs in episodes[i]:
                barrier.wait(30)  # all sessions send at once
                out.append(c.act(obs))
            results[i] = out
            c.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    before = len(server.batch_sizes)
    threads = [threading.Thread(target=drive, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    assert max(list(server.batch_sizes)[before:]) > 1  # concurrent requests ran as one batch
    for i in range(n):  # each session's history is its own: an in-process policy per session agrees
        local = GRPolicy.from_checkpoint(ckpt)
        for obs, got in zip(episodes[i], results[i]):
            # A batch tokenizes and runs its sessions together; batched float kernels may round differently.
            np.testing.assert_allclose(got, local.act(obs), rtol=0, atol=1e-5)


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(served):
    url, server = served
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    c = PolicyClient(url, session="s1")
    good = {"images": {v: np.zeros((32, 32, 3), np.uint8) for v in ("head", "wrist")},
            "state": np.zeros(4, np.float32), "instruction": "open the drawer"}
    with pytest.raises(PolicyServerError, match="unknown session 's1': send"):
        c.act(good)
    c.reset()
    cases = [({"images": {"head": good["images"]["head"]}}, "lacks view 'wrist'"),
             ({"images": {**good["images"], "wrist": np.zeros((32, 32), np.uint8)}}, r"has shape \(32, 32\)"),
             ({"images": {**good["images"], "head": np.zeros((32, 32, 3), np.float32)}}, "must be a uint8 array"),
             ({"state": np.zeros(7, np.float32)}, r"obs\['state'\] has shape \(7,\), the model expects \(4,\)"),
             ({"instruction": 3}, "must be a string")]
    for change, message in cases:
        with pytest.raises(PolicyServerError, match=message):
            c.act({**good, **change})
    for request, message in (({"type": "fly"}, "unknown request type 'fly'"),
                             ({"type": "act", "session": ""}, "'session' must be a non-empty string")):
        with pytest.raises(PolicyServerError, match=message):
            c._call(request)
    c.ws.send(b"\xc1 not msgpack")
    assert "not a valid msgpack request" in unpack(c.ws.recv())["error"]
    c.ws.send("a text frame")
    assert "binary msgpack" in unpack(c.ws.recv())["error"]
    assert c.act(good).shape == (4, 4)  # the same connection still works

    with connect(url, max_size=None) as big:
        big.send(pack({"type": "act", "session": "s1", "obs": {**good, "pad": np.zeros(2 * 2**20, np.uint8)}}))
        with pytest.raises(ConnectionClosed) as closed:
            big.recv()
    assert closed.value.rcvd.code == 1009  # message too big: that connection is closed, nothing was unpacked
    assert PolicyClient(url, session="s2").spec["views"] == ["head", "wrist"]  # and the server serves on
    assert c.act(good).shape == (4, 4)


def test_closing_a_session_mid_batch_fails_nothing_and_act_keeps_a_session_recent(ckpt):
    """A close or an eviction on the event loop while the model thread runs the batch: the batch still answers.
    Eviction drops the least recently *used* session."""
    policy = GRPolicy.from_checkpoint(ckpt)
    entered, release = threading.Event(), threading.Event()
    encode = policy.encode_observations

    def slow_encode(observations):
        entered.set()
        release.wait(30)
        return encode(observations)

    policy.encode_observations = slow_encode
    server = PolicyServer(policy, max_batch=4, max_sessions=2)
    good = {"images": {v: np.zeros((32, 32, 3), np.uint8) for v in ("head", "wrist")},
            "state": np.zeros(4, np.float32), "instruction": "open the drawer"}
    with ServerThread(server) as url:
        a, b = PolicyClient(url, session="A"), PolicyClient(url, session="B")
        a.reset(), b.reset()
        got = {}
        worker = threading.Thread(target=lambda: got.setdefault("a", a.act(good)))
        worker.start()
        assert entered.wait(30)  # A's request is inside the model thread now
        b._call({"type": "close", "session": "A"})
        release.set()
        worker.join(30)
        assert got["a"].shape == (4, 4)  # answered, not "internal error"
        policy.encode_observations = encode
        a.reset()  # sessions: B, A (A most recent)
        b.act(good)  # B is now the most recently used
        PolicyClient(url, session="C").reset()  # a third session evicts A, not B
        assert b.act(good).shape == (4, 4)
        with pytest.raises(PolicyServerError, match="unknown session 'A'"):
            a.act(good)
        nan = {**good, "state": np.array([0, np.nan, 0, 0], np.float32)}
        with pytest.raises(PolicyServerError, match="NaN or infinite"):
            b.act(nan)
        assert b.act({**good, "state": np.zeros(4, np.uint32)}).shape == (4, 4)  # widened by the client


def test_connections_beyond_the_cap_are_turned_away(ckpt):
    from websockets.exceptions import ConnectionClosed

    server = PolicyServer(GRPolicy.from_checkpoint(ckpt), max_connections=1)
    with ServerThread(server) as url:
        first = PolicyClient(url)
        with pytest.raises(ConnectionClosed) as closed:
            PolicyClient(url)
        assert closed.value.rcvd.code == 1013
        assert first.spec["views"] == ["head", "wrist"]
        first.close()
