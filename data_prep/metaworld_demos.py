"""Make the embedded robot data: scripted-expert demonstrations of Meta-World tasks as robot episode shards.

Each episode holds the head (corner4) and wrist (gripperPOV) views, the state (end-effector xyz + gripper opening) and
the expert's 4-D actions, clipped to [-1, 1]. Step t pairs the frame and state observed before action t with that
action, and the episode ends with the action that reached success. Failed attempts are counted and dropped. Every
attempt has its own seed (`gr.envs.episode_seed`), so the output does not depend on --workers, and held-out demos
("val" shards) never reuse a training layout.

    python data_prep/metaworld_demos.py --out data/metaworld --num-demos 50 --num-val 5

Default tasks, measured at 64 px over 10-20 seeds (expert success / mean steps to success / head-view object shift
across seeds in pixels / success of an expert told the mean layout instead of the real one):
    button-press-topdown-v3  100% / 67 / 8 px / 55%
    coffee-button-v3         100% / 36 / 8 px / 70%
    drawer-close-v3          100% / 77 / 5 px / 70%
    window-close-v3          100% / 81 / 6 px / 60%
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gr.envs import DEFAULT_TASKS, check_task, episode_seed, expert_episode, make_env  # noqa: E402

_ENVS: dict[tuple, Any] = {}  # one simulator + renderer per (task, image size, max steps) in each worker process


def run_attempt(job: dict) -> dict:
    """Run one expert attempt. `job` holds task, split, attempt, env_seed, image_size and max_steps; the result adds
    success, success_step and, for a success, the episode arrays."""
    key = (job["task"], job["image_size"], job["max_steps"])
    if key not in _ENVS:
        _ENVS[key] = make_env(job["task"], job["env_seed"], job["image_size"], max_steps=job["max_steps"])
    env = _ENVS[key]
    episode = expert_episode(env, seed=job["env_seed"])
    result = {**job, "success": episode["success"], "success_step": episode["success_step"],
              "instruction": env.instruction, "fps": env.fps}
    if episode["success"]:
        result.update(frames=episode["frames"], state=episode["state"], action=episode["action"])
    return result


def make_jobs(task: str, split: str, first: int, count: int, args: argparse.Namespace) -> list[dict]:
    """Attempts number first .. first + count - 1 of one task and split."""
    return [{"task": task, "split": split, "attempt": i, "env_seed": episode_seed(args.seed, task, split, i),
             "image_size": args.image_size, "max_steps": args.max_steps} for i in range(first, first + count)]


def run_rounds(args: argparse.Namespace, pool) -> Iterator[dict]:
    """Yield attempt results in a fixed order. Each round runs, per task and split, just as many new attempts as
    demos are still missing, so that the kept demos (the first successes) and the counts never depend on timing."""
    wanted = {(task, split): n for task in args.tasks for split, n in (("train", args.num_demos), ("val", args.num_val))
              if n > 0}
    kept = dict.fromkeys(wanted, 0)
    tried = dict.fromkeys(wanted, 0)
    while True:
        jobs = []
        for (task, split), n in wanted.items():
            missing = min(n - kept[(task, split)], args.max_attempts_per_demo * n - tried[(task, split)])
            jobs += make_jobs(task, split, tried[(task, split)], max(0, missing), args)
            tried[(task, split)] += max(0, missing)
        if not jobs:
            return
        results = pool.imap(run_attempt, jobs) if pool is not None else map(run_attempt, jobs)
        for result in results:
            kept[(result["task"], result["split"])] += int(result["success"])
            yield result


def to_episode(result: dict):
    """An attempt's result -> gr.data.robot.Episode with task, seed and success step in `extra`."""
    from gr.data.robot import Episode

    extra = {"task": result["task"], "seed": result["env_seed"], "attempt": result["attempt"],
             "success_step": result["success_step"], "image_size": result["image_size"]}
    return Episode(frames=result["frames"], state=result["state"], action=result["action"],
                   instruction=result["instruction"], fps=result["fps"], extra=extra)


def new_counts(tasks: list[str]) -> dict[str, dict[str, Any]]:
    return {task: {"train": 0, "val": 0, "attempts": 0, "failures": 0, "success_steps": []} for task in tasks}


def generate(args: argparse.Namespace, writers: dict, pool) -> dict[str, dict[str, Any]]:
    """Run every attempt and write the successes; returns per-task counts."""
    counts = new_counts(args.tasks)
    total = len(args.tasks) * (args.num_demos + args.num_val)
    with tqdm(total=total, desc="metaworld demos", unit="demo") as bar:
        for result in run_rounds(args, pool):
            c = counts[result["task"]]
            c["attempts"] += 1
            if not result["success"]:
                c["failures"] += 1
                bar.set_postfix(failures=sum(x["failures"] for x in counts.values()))
                continue
            key = f"{result['split']}_{result['task']}_{c[result['split']]:06d}"
            writers[result["split"]].write(key, to_episode(result))
            c[result["split"]] += 1
            c["success_steps"].append(result["success_step"])
            bar.update(1)
    return counts


def summarize(args: argparse.Namespace, counts: dict, writers: dict, seconds: float) -> dict[str, Any]:
    tasks = {}
    for task, c in counts.items():
        steps = c.pop("success_steps")
        tasks[task] = {**c, "mean_success_step": round(float(np.mean(steps)), 1) if steps else None,
                       "complete": c["train"] == args.num_demos and c["val"] == args.num_val}
    summary = {"tasks": tasks, "num_train": sum(c["train"] for c in tasks.values()),
               "num_val": sum(c["val"] for c in tasks.values()),
               "attempts": sum(c["attempts"] for c in tasks.values()),
               "failures": sum(c["failures"] for c in tasks.values()), "seconds": round(seconds, 2),
               "image_size": args.image_size, "views": ["head", "wrist"], "workers": args.workers, "seed": args.seed}
    for split, writer in writers.items():
        summary[f"{split}_shards"] = writer.pattern
        summary[f"{split}_stats"] = os.path.join(args.out, f"{split}-stats.json")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the tar shards")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="Meta-World task names (e.g. reach-v3)")
    p.add_argument("--num-demos", type=int, default=50, help="successful training demos per task")
    p.add_argument("--num-val", type=int, default=5, help="held-out demos per task, written with prefix 'val'")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (even, >= 16)")
    p.add_argument("--max-steps", type=int, default=200, help="attempt length limit; slower attempts count as failed")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--seed", type=int, default=0, help="base seed of every episode's layout")
    p.add_argument("--per-shard", type=int, default=32, help="episodes per tar shard")
    p.add_argument("--max-attempts-per-demo", type=int, default=3,
                   help="give a task up after this many attempts per wanted demo")
    args = p.parse_args(argv)
    for task in args.tasks:
        try:
            check_task(task)
        except ValueError as exc:
            p.error(f"--tasks: {exc}")
    checks = {"--image-size must be even and >= 16": args.image_size % 2 or args.image_size < 16,
              "--num-demos must be >= 1": args.num_demos < 1, "--num-val must be >= 0": args.num_val < 0,
              "--max-steps must be in [1, 500]": not 1 <= args.max_steps <= 500, "--workers must be >= 1":
              args.workers < 1, "--seed must be >= 0": args.seed < 0, "--per-shard must be >= 1": args.per_shard < 1,
              "--max-attempts-per-demo must be >= 1": args.max_attempts_per_demo < 1,
              "--tasks repeats a task": len(set(args.tasks)) != len(args.tasks)}
    for message, bad in checks.items():
        if bad:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from gr.data.robot import EpisodeShardWriter  # not at the top: spawned workers need no torch

    t0 = time.time()
    writers = {"train": EpisodeShardWriter(args.out, "train", args.per_shard, source="metaworld")}
    if args.num_val:
        writers["val"] = EpisodeShardWriter(args.out, "val", args.per_shard, source="metaworld")
    # spawn, not fork: an OpenGL context must not be shared with a forked child.
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        counts = generate(args, writers, pool)
    finally:
        if pool is not None:
            pool.terminate()
    for split, writer in writers.items():
        if writer.count == 0:
            tried = {task: f"{c['failures']}/{c['attempts']} failed" for task, c in counts.items()}
            raise RuntimeError(f"no successful {split} demo within --max-steps {args.max_steps}: {tried}")
        writer.close()
    summary = summarize(args, counts, writers, time.time() - t0)
    for task, c in summary["tasks"].items():
        if not c["complete"]:
            print(f"warning: {task}: only {c['train']} train + {c['val']} val demos after {c['attempts']} attempts",
                  file=sys.stderr)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
