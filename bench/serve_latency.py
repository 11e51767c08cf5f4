"""Round-trip latency of `gr serve` (websocket + msgpack on loopback) against in-process `GRPolicy.act`, in one run.

Prints one JSON object. The model is the demo's finetuning configuration with random weights (bench/policy_latency.py),
at batch 1 on this machine. Per call, with the history full and the instruction's text features cached:
- `in_process_ms`: `policy.act(obs)`;
- `round_trip_ms`: `PolicyClient.act(obs)` against a server on 127.0.0.1 running the same policy: pack, send, the
  server's unpack and checks, the same act path, pack, receive, unpack;
- `overhead_ms` = round_trip - in_process (medians; the two paths are interleaved so that noise hits both alike).
Target: overhead <= 5 ms per call at the demo size. `--clients N` adds concurrent sessions and reports the mean batch
size the server formed and each call's latency under that load.

    .venv/bin/python bench/serve_latency.py
    .venv/bin/python bench/serve_latency.py --clients 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TARGET_OVERHEAD_MS = 5.0


def main(argv: list[str] | None = None) -> dict:
    import torch
    from policy_latency import demo_observation, demo_policy

    from gr.client import PolicyClient
    from gr.serve import PolicyServer, ServerThread

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--preset", default=None)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--clients", type=int, default=1, help="concurrent sessions (1: the overhead measurement alone)")
    args = p.parse_args(argv)
    policy, module, init = demo_policy(args.image_size, args.preset)
    obs = demo_observation(policy)
    server = PolicyServer(policy, max_batch=max(16, args.clients))
    local_history = policy.new_history()

    def in_process():
        # The server's act path for one session (encode, push, predict), on a history of our own.
        policy.push_entry(local_history, policy.encode_observations([obs])[0])
        return policy.predict_chunks([local_history], [obs["instruction"]])[0]

    with ServerThread(server) as url:
        client = PolicyClient(url, session="bench")
        client.reset()
        for _ in range(5):  # fill both histories, cache the text, warm up
            client.act(obs)
            in_process()
        local, remote, server_total = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            in_process()
            t1 = time.perf_counter()
            client.act(obs)
            t2 = time.perf_counter()
            local.append((t1 - t0) * 1000)
            remote.append((t2 - t1) * 1000)
            server_total.append(client.last_latency_ms["total"])
        loaded = None
        if args.clients > 1:
            before = len(server.batch_sizes)
            lat: list[float] = []

            def drive(i):
                c = PolicyClient(url, session=f"load-{i}")
                c.reset()
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    c.act(obs)
                    lat.append((time.perf_counter() - t) * 1000)
                c.close()

            threads = [threading.Thread(target=drive, args=(i,)) for i in range(args.clients)]
            t0 = time.perf_counter()
            [t.start() for t in threads]
            [t.join() for t in threads]
            wall = time.perf_counter() - t0
            sizes = list(server.batch_sizes)[before:]
            loaded = {"clients": args.clients, "round_trip_ms_median": round(statistics.median(lat), 3),
                      "mean_batch": round(statistics.fmean(sizes), 3),
                      "calls_per_s": round(args.clients * args.repeats / wall, 1)}
        client.close()
    result = {
        "benchmark": "serve_latency", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"trunk": dict(init["model"]["trunk"]), "image_size": args.image_size,
                     "views": list(policy.robot.view_names), "repeats": args.repeats, "transport": "websocket+msgpack",
                     "host": "127.0.0.1"},
        "in_process_ms": round(statistics.median(local), 3), "round_trip_ms": round(statistics.median(remote), 3),
        "server_total_ms": round(statistics.median(server_total), 3),
    }
    result["overhead_ms"] = round(result["round_trip_ms"] - result["in_process_ms"], 3)
    result["target_overhead_ms"] = TARGET_OVERHEAD_MS
    result["meets_target"] = result["overhead_ms"] <= TARGET_OVERHEAD_MS
    if loaded:
        result["under_load"] = loaded
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
