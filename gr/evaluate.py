"""`gr eval`: closed-loop success rate of a finetuned checkpoint on Meta-World tasks.

Episodes are seeded (`gr.envs.episode_seed(seed, task, "test", i)`: layouts no demonstration used) and spread over
worker processes, each loading the policy once. Output: `<out>/eval.json` with per-task success rate and mean steps to
success (plus every episode's result), and `<out>/<task>.mp4` showing the first episode of each task (head | wrist).

    gr eval --checkpoint outputs/demo/finetune/checkpoints/last.ckpt --tasks button-press-topdown-v3 --episodes 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any, Optional

import numpy as np

_POLICY: dict[str, Any] = {}  # one policy per worker process


def _policy(checkpoint: str, execute_steps: Optional[int], temporal_ensemble: Optional[float]):
    key = f"{checkpoint}|{execute_steps}|{temporal_ensemble}"
    if key not in _POLICY:
        import torch

        from gr.policy import GRPolicy

        torch.set_num_threads(1)
        _POLICY.clear()
        _POLICY[key] = GRPolicy.from_checkpoint(checkpoint, execute_steps=execute_steps,
                                                temporal_ensemble=temporal_ensemble)
    return _POLICY[key]


def run_episode(job: dict[str, Any]) -> dict[str, Any]:
    """One seeded closed-loop episode -> {"task", "index", "seed", "success", "steps", "frames" (if recorded)}."""
    from gr.envs import episode_seed, make_env

    policy = _policy(job["checkpoint"], job["execute_steps"], job["temporal_ensemble"])
    seed = episode_seed(job["seed"], job["task"], "test", job["index"])
    env = make_env(job["task"], seed, image_size=job["image_size"])
    frames = []
    try:
        obs, success, steps = env.reset(), False, 0
        policy.reset()
        for steps in range(1, job["max_steps"] + 1):
            if job["record"]:
                frames.append(np.concatenate([obs["images"][v] for v in sorted(obs["images"])], axis=1))
            action = policy.step({"images": obs["images"], "state": obs["state"], "instruction": env.instruction})
            obs, success, done = env.step(np.clip(action, -1.0, 1.0))
            if success or done:
                break
    finally:
        env.close()
    return {"task": job["task"], "index": job["index"], "seed": seed, "success": bool(success), "steps": steps,
            "frames": np.stack(frames) if frames else None}


def evaluate(checkpoint: str, tasks: list[str], episodes: int = 10, seed: int = 0, workers: int = 1,
             max_steps: int = 200, out: Optional[str] = None, execute_steps: Optional[int] = None,
             temporal_ensemble: Optional[float] = None, video: bool = True) -> dict[str, Any]:
    """Run `episodes` seeded episodes per task; return (and write to `<out>/eval.json`) the results."""
    from gr.envs import check_task
    from gr.policy import GRPolicy

    if not os.path.exists(checkpoint):
        raise ValueError(f"--checkpoint: file or folder not found: {checkpoint!r}")
    tasks = [check_task(t) for t in tasks]
    probe = GRPolicy.from_checkpoint(checkpoint)  # fail here, once, on a checkpoint without an action head
    image_size = probe.clip.image_size
    jobs = [dict(checkpoint=checkpoint, task=t, index=i, seed=seed, image_size=image_size, max_steps=max_steps,
                 execute_steps=execute_steps, temporal_ensemble=temporal_ensemble, record=video and i == 0 and out)
            for t in tasks for i in range(episodes)]
    t0 = time.time()
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_episode, jobs, chunksize=1)
    else:
        results = [run_episode(j) for j in jobs]
    report = summarize(results, tasks)
    report.update(checkpoint=checkpoint, episodes_per_task=episodes, seed=seed, max_steps=max_steps,
                  execute_steps=execute_steps or probe.execute_steps, temporal_ensemble=temporal_ensemble,
                  seconds=round(time.time() - t0, 1))
    if out:
        os.makedirs(out, exist_ok=True)
        _write_videos(results, out, report)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def summarize(results: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    per_task = {}
    for t in tasks:
        rs = sorted((r for r in results if r["task"] == t), key=lambda r: r["index"])
        wins = [r["steps"] for r in rs if r["success"]]
        per_task[t] = {"success_rate": len(wins) / len(rs), "num_episodes": len(rs),
                       "mean_steps_to_success": float(np.mean(wins)) if wins else None,
                       "episodes": [{k: r[k] for k in ("index", "seed", "success", "steps")} for r in rs]}
    rates = [v["success_rate"] for v in per_task.values()]
    return {"tasks": per_task, "mean_success_rate": float(np.mean(rates)) if rates else 0.0}


def _write_videos(results: list[dict[str, Any]], out: str, report: dict[str, Any]) -> None:
    from gr.data.video_io import encode_mp4

    for r in results:
        if r["frames"] is not None:
            path = os.path.join(out, f"{r['task']}.mp4")
            with open(path, "wb") as f:
                f.write(encode_mp4(r["frames"], fps=20.0))
            report["tasks"][r["task"]]["video"] = path


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from gr.envs import DEFAULT_TASKS

    p = argparse.ArgumentParser(prog="gr eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="finetuned checkpoint: Lightning .ckpt, sharded folder or gr export folder")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--episodes", type=int, default=10, help="seeded episodes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--execute-steps", type=int, default=None, help="actions executed per chunk (default: all)")
    p.add_argument("--temporal-ensemble", type=float, default=None, help="ACT temporal ensembling weight m")
    p.add_argument("--out", default="outputs/eval")
    p.add_argument("--no-video", action="store_true")
    args = p.parse_args(argv)
    try:
        report = evaluate(args.checkpoint, args.tasks, args.episodes, args.seed, args.workers, args.max_steps,
                          args.out, args.execute_steps, args.temporal_ensemble, not args.no_video)
    except ValueError as exc:
        p.error(str(exc))
    print(json.dumps({t: {k: v for k, v in r.items() if k != "episodes"} for t, r in report["tasks"].items()},
                     indent=2))
    return report
