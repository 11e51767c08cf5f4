"""Make action-free robot-scene video for pretraining: scripted-expert Meta-World episodes as text-video shards.

Every successful expert episode gives one sample per camera view, `{key}.mp4` + `{key}.json`, the format of web
video (data_prep/videos_to_shards.py), so the pretraining loader and data_prep/tokenize_shards.py read it unchanged.
The json holds the caption (the task's instruction), fps (the 80 Hz control rate: one frame per step), source
"metaworld", task, view, split, episode index, attempt and the episode's env seed. Actions and states are not written:
pretraining sees video only. Failed attempts are counted and dropped.

Layouts come from `gr.envs.episode_seed` with base --seed 1, while data_prep/metaworld_demos.py defaults to 0, so the
pretraining video never shows a finetuning demo's layout; only the "train" and "val" seed streams are used, never
"test" (the closed-loop evaluation layouts). Attempts run in a fixed order (`run_rounds`), so the output does not
depend on --workers. Leave the finetuning targets out with --exclude-tasks to pretrain on other tasks only:

    python data_prep/metaworld_videos.py --out data/metaworld_video --episodes-per-task 20 --num-val 2 \\
        --exclude-tasks button-press-topdown-v3 coffee-button-v3 drawer-close-v3 window-close-v3

Speed (2-core shared CPU, software EGL, --workers 1, 64 px, both views): 3 tasks x 2 episodes in 17.9 s, i.e.
0.34 episodes/s (0.67 clips/s), about 25 ms per step for simulation, expert and two renders; MT50 expert
episodes take 40-300 steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep.metaworld_demos import new_counts, run_rounds  # noqa: E402
from gr.envs import VIEW_NAMES, check_task, task_names  # noqa: E402

VIEWS = sorted(VIEW_NAMES.values())  # the views that `run_attempt`'s env renders: head (corner4), wrist (gripperPOV)


def clip_samples(result: dict, index: int, views: list[str]) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """A successful attempt -> (key, uint8 (T, S, S, 3) frames, json meta) per view; no action or state."""
    base = f"{result['split']}_{result['task']}_{index:06d}"  # no dots: webdataset splits keys at the first dot
    samples = []
    for view in views:
        frames = result["frames"][view]
        meta = {"caption": result["instruction"], "fps": result["fps"], "source": "metaworld",
                "task": result["task"], "view": view, "split": result["split"], "episode": index,
                "attempt": result["attempt"], "seed": result["env_seed"], "num_frames": int(len(frames)),
                "image_size": result["image_size"]}
        samples.append((f"{base}_{view}", frames, meta))
    return samples


def generate(args: argparse.Namespace, writers: dict, pool) -> dict[str, dict[str, Any]]:
    """Run every attempt and write each success's views; returns per-task counts (episodes, not clips)."""
    from gr.data.video_io import encode_mp4  # not at the top: spawned workers need no torch

    counts = new_counts(args.tasks)
    total = len(args.tasks) * (args.num_demos + args.num_val)
    with tqdm(total=total, desc="metaworld videos", unit="episode") as bar:
        for result in run_rounds(args, pool):
            c = counts[result["task"]]
            c["attempts"] += 1
            if not result["success"]:
                c["failures"] += 1
                bar.set_postfix(failures=sum(x["failures"] for x in counts.values()))
                continue
            for key, frames, meta in clip_samples(result, c[result["split"]], args.views):
                writers[result["split"]].write(key, encode_mp4(frames, meta["fps"]), meta)
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
    episodes = {split: sum(c[split] for c in tasks.values()) for split in ("train", "val")}
    summary = {"tasks": tasks, "included_tasks": list(args.tasks), "excluded_tasks": list(args.exclude_tasks),
               "views": list(args.views), "num_train_episodes": episodes["train"], "num_val_episodes": episodes["val"],
               "num_train_clips": episodes["train"] * len(args.views), "num_val_clips": episodes["val"] * len(args.views),
               "attempts": sum(c["attempts"] for c in tasks.values()),
               "failures": sum(c["failures"] for c in tasks.values()), "seconds": round(seconds, 2),
               "episodes_per_s": round((episodes["train"] + episodes["val"]) / max(seconds, 1e-9), 3),
               "image_size": args.image_size, "max_steps": args.max_steps, "workers": args.workers, "seed": args.seed}
    for split in ("train", "val"):
        summary[f"{split}_shards"] = writers[split].pattern if split in writers else None
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the tar shards")
    p.add_argument("--tasks", nargs="+", default=None, help="Meta-World task names (default: all MT50 tasks)")
    p.add_argument("--exclude-tasks", nargs="+", default=[], help="tasks to leave out, e.g. the finetuning targets")
    p.add_argument("--episodes-per-task", type=int, default=20, help="successful training episodes per task")
    p.add_argument("--num-val", type=int, default=2, help="held-out episodes per task, written with prefix 'val'")
    p.add_argument("--views", nargs="+", default=VIEWS, help=f"camera views, one clip each ({' '.join(VIEWS)})")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (even, >= 16)")
    p.add_argument("--max-steps", type=int, default=500, help="attempt length limit; slower attempts count as failed")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--seed", type=int, default=1, help="base seed of the layouts (metaworld_demos uses 0)")
    p.add_argument("--per-shard", type=int, default=64, help="clips per tar shard")
    p.add_argument("--max-attempts-per-demo", type=int, default=3,
                   help="give a task up after this many attempts per wanted episode")
    args = p.parse_args(argv)
    args.tasks = args.tasks or task_names()
    check_args(p, args)
    args.tasks = [task for task in args.tasks if task not in args.exclude_tasks]
    args.views = sorted(args.views)  # a fixed view order: clip keys and summaries never depend on the command line
    args.num_demos = args.episodes_per_task  # the name run_rounds reads
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with one line naming the option on any bad value (argparse's `error`)."""
    for option, names in (("--tasks", args.tasks), ("--exclude-tasks", args.exclude_tasks)):
        for task in names:
            try:
                check_task(task)
            except ValueError as exc:
                p.error(f"{option}: {exc}")
    for view in args.views:
        if view not in VIEWS:
            p.error(f"--views: unknown view {view!r}; valid views: {', '.join(VIEWS)}")
    checks = {"--image-size must be even and >= 16": args.image_size % 2 or args.image_size < 16,
              "--episodes-per-task must be >= 1": args.episodes_per_task < 1,
              "--num-val must be >= 0": args.num_val < 0,
              "--max-steps must be in [1, 500]": not 1 <= args.max_steps <= 500, "--workers must be >= 1":
              args.workers < 1, "--seed must be >= 0": args.seed < 0, "--per-shard must be >= 1": args.per_shard < 1,
              "--max-attempts-per-demo must be >= 1": args.max_attempts_per_demo < 1,
              "--tasks repeats a task": len(set(args.tasks)) != len(args.tasks),
              "--views repeats a view": len(set(args.views)) != len(args.views),
              "--exclude-tasks leaves no task of --tasks": not set(args.tasks) - set(args.exclude_tasks)}
    for message, bad in checks.items():
        if bad:
            p.error(message)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from gr.data.writer import VideoShardWriter  # not at the top: spawned workers need no torch

    t0 = time.time()
    writers = {"train": VideoShardWriter(args.out, "train", args.per_shard)}
    if args.num_val:
        writers["val"] = VideoShardWriter(args.out, "val", args.per_shard)
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
            raise RuntimeError(f"no successful {split} episode within --max-steps {args.max_steps}: {tried}")
        writer.close()
    summary = summarize(args, counts, writers, time.time() - t0)
    for task, c in summary["tasks"].items():
        if not c["complete"]:
            print(f"warning: {task}: only {c['train']} train + {c['val']} val episodes after {c['attempts']} attempts",
                  file=sys.stderr)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}))
    return summary


if __name__ == "__main__":
    main()
