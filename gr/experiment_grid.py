"""`gr experiment-grid`: action heads x {full finetune, LoRA} x {video co-training off, on} x {augmentation off, on},
each finetuned from the same pretrained checkpoint with the same step budget, data and seeds, and evaluated closed
loop on the same seeded layouts as `gr experiment` (gr/experiment.py supplies the data, configs and evaluation).

Per cell it reports closed-loop success (per task, and the mean with a Wilson 95% interval over every episode of
every training seed and evaluation seed; `--eval-seeds 0 1` adds a second set of layouts, also to cells already in
--out, from their checkpoints), the action latency of `GRPolicy.act` on the trained checkpoint (median ms, batch 1,
this machine), training time and trainable parameters. `<out>/grid.json` is written after every run (a restart
skips finished runs); `<out>/grid.md` holds the table and `<out>/grid.png` the plot.

    gr experiment-grid --pretrained outputs/demo/pretrain/checkpoints/last.ckpt --pretrain-includes-target-tasks yes \\
        --heads cvae flow diffusion tokens --adapt full lora --cotrain off on --augment off on \\
        --cotrain-shards "data/metaworld_video_tokens/train-{000000..000003}.tar"

Cell settings: `lora` = rank --lora-rank adapters on the trunk (alpha = 2 x rank); co-training `on` = a fraction
--cotrain-weight of the steps on the pre-tokenized --cotrain-shards; augmentation `on` = a code-level shift of up to
--code-shift cells (the experiment trains on pre-tokenized shards; see gr/training/augment.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

from gr.config import HEAD_KINDS
from gr.experiment import (DESIGN_KEYS, EVAL_ONLY_TASKS, EVAL_SEED, FINETUNE_TASKS, InputError, arm_config, eval_arm,
                           newcombe, prepare, same_design, save_json, train_arm, wilson)

AXES = ("head", "adapt", "cotrain", "augment")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gr experiment-grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--pretrain-includes-target-tasks", required=True, choices=["yes", "no"])
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "configs/demo/finetune.yaml"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tasks", nargs="+", default=list(FINETUNE_TASKS))
    p.add_argument("--eval-only-tasks", nargs="*", default=list(EVAL_ONLY_TASKS))
    p.add_argument("--demos", type=int, default=5, help="training demos per task (one level)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[EVAL_SEED],
                   help=f"evaluation seeds: each one is --eval-episodes layouts per task, the same for every cell; "
                   f"{EVAL_SEED} (gr experiment's layouts) must be one. Cells already in --out are evaluated on the "
                   "seeds they lack from their checkpoints, without retraining")
    p.add_argument("--eval-max-steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--robot-data", default=None)
    p.add_argument("--heads", nargs="+", choices=HEAD_KINDS, default=list(HEAD_KINDS))
    p.add_argument("--adapt", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--cotrain", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--augment", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--cotrain-shards", default=None, help="pre-tokenized text-video shards for co-training cells")
    p.add_argument("--cotrain-weight", type=float, default=0.25)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--code-shift", type=int, default=1)
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--out", default="outputs/experiment_grid")
    args = p.parse_args(argv)
    # what gr.experiment.prepare reads
    args.demos, args.arms, args.reuse_scratch = [args.demos], ["pretrained"], None
    return args


def cells(args: argparse.Namespace) -> list[dict[str, str]]:
    return [dict(zip(AXES, c)) for c in itertools.product(args.heads, args.adapt, args.cotrain, args.augment)]


def cell_name(cell: dict[str, str]) -> str:
    return "-".join([cell["head"], cell["adapt"], f"cotrain_{cell['cotrain']}", f"aug_{cell['augment']}"])


def cell_config(args: argparse.Namespace, spec: dict, data: dict, cell: dict[str, str], seed: int, root: str) -> dict:
    """The pretrained arm's config of `gr experiment`, with the cell's head, adaptation, co-training and augmentation."""
    cfg = arm_config(args, spec, data, "pretrained", seed, root)
    init = cfg["model"]["init_args"]
    robot = init["model"].setdefault("robot", {})
    robot["head"] = {**(robot.get("head") or {}), "kind": cell["head"]}
    if cell["adapt"] == "lora":
        init["lora"] = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank}
    if cell["augment"] == "on":
        init["augment"] = {"code_shift": args.code_shift}
    if cell["cotrain"] == "on":
        cfg["data"]["init_args"]["cotrain"] = {"shards": args.cotrain_shards, "weight": args.cotrain_weight,
                                               "shard_format": "tokens"}
    return cfg


def action_latency(checkpoint: str, repeats: int) -> dict[str, Any]:
    """Median GRPolicy.act time (ms) on the trained checkpoint, batch 1, after the history is full."""
    import numpy as np

    from gr.policy import GRPolicy

    policy = GRPolicy.from_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    size = policy.clip.image_size
    obs = {"images": {v: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for v in policy.robot.view_names},
           "state": np.zeros(policy.robot.state_dim, np.float32), "instruction": "press the button"}
    for _ in range(3):
        policy.act(obs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.act(obs)
        times.append((time.perf_counter() - t0) * 1000)
    module = policy.module
    return {"act_ms": round(statistics.median(times), 2),
            "trainable_params": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
            "head_params": sum(p.numel() for p in module.model.action_head.parameters())}


def evals_of(run: dict) -> dict[int, dict]:
    """A run's closed-loop results by evaluation seed: the first evaluation (gr experiment's layouts, EVAL_SEED) is
    the run's own `success`/`episodes`, the others are in `extra_evals`."""
    return {EVAL_SEED: {"success": run["success"], "episodes": run["episodes"]},
            **{int(k): v for k, v in (run.get("extra_evals") or {}).items()}}


def extra_eval(args, run: dict, eval_seed: int) -> dict[str, Any]:
    """A finished run's checkpoint on another evaluation seed's layouts (no videos: the first evaluation has them)."""
    result = eval_arm(run["checkpoint"], args.tasks + args.eval_only_tasks, args, run["root"], seed=eval_seed,
                      folder=f"eval_seed{eval_seed}", video=False)
    return {k: result[k] for k in ("success", "episodes", "eval_seconds")}


def run_cell(args, spec, data, cell, seed) -> dict[str, Any]:
    import shutil

    root = os.path.abspath(os.path.join(args.out, "cells", f"{cell_name(cell)}_s{seed}"))
    if os.path.isdir(root):  # left by a killed run
        shutil.rmtree(root)
    train = train_arm(cell_config(args, spec, data[args.demos[0]], cell, seed, root), root)
    result = eval_arm(train["checkpoint"], args.tasks + args.eval_only_tasks, args, root)
    return {**cell, "seed": seed, "root": root, **train, **result,
            **action_latency(train["checkpoint"], args.latency_repeats)}


def run_cells(runs: dict[str, dict]) -> list[dict[str, str]]:
    """Every cell that has a finished run, in axis order (head kinds as listed, then full < lora, off < on): the
    summary covers all of them, also those an earlier invocation with other --heads/--adapt/... values wrote to the
    same --out."""
    order = {"head": list(HEAD_KINDS), "adapt": ["full", "lora"], "cotrain": ["off", "on"], "augment": ["off", "on"]}
    found = {tuple(r[a] for a in AXES) for r in runs.values()}
    return [dict(zip(AXES, c)) for c in sorted(found, key=lambda c: [order[a].index(v) for a, v in zip(AXES, c)])]


def summarize(runs: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for cell in run_cells(runs):
        done = [r for r in runs.values() if all(r[a] == cell[a] for a in AXES)]
        evals = [(es, e) for r in done for es, e in evals_of(r).items()]  # every training seed x evaluation seed
        per_task = {t: [ep["success"] for _, e in evals for ep in e["episodes"][t]] for t in args.tasks}
        k, n = sum(sum(v) for v in per_task.values()), sum(len(v) for v in per_task.values())
        lo, hi = wilson(k, n)
        by_eval = {}
        for es, e in sorted(evals, key=lambda x: x[0]):
            got = by_eval.setdefault(str(es), {"successes": 0, "episodes": 0})
            got["successes"] += sum(ep["success"] for t in args.tasks for ep in e["episodes"][t])
            got["episodes"] += sum(len(e["episodes"][t]) for t in args.tasks)
        out[cell_name(cell)] = {**cell, "seeds": sorted(r["seed"] for r in done), "successes": k, "episodes": n,
                                "success": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)],
                                "by_eval_seed": by_eval,
                                "per_task": {t: round(sum(v) / len(v), 4) for t, v in per_task.items() if v},
                                "zero_shot": {t: statistics.mean(e["success"][t] for _, e in evals)
                                              for t in args.eval_only_tasks},
                                "act_ms": statistics.median(r["act_ms"] for r in done),
                                "train_seconds": round(statistics.mean(r["train_seconds"] for r in done), 1),
                                "trainable_params": done[0]["trainable_params"]}
    add_reference(out, runs, args.tasks)
    return out


REFERENCE = "cvae-full-cotrain_off-aug_off"  # today's recipe: every other cell changes one or more axes from it


def head_base(head: str) -> str:
    """A head's own base cell (full finetune, no co-training, no augmentation): what LoRA, co-training and augmentation
    are measured against for that head."""
    return f"{head}-full-cotrain_off-aug_off"


def add_reference(summary: dict[str, Any], runs: dict[str, dict], tasks: list[str]) -> None:
    """Each cell against the reference cell (`vs_reference`) and against its head's base cell (`vs_head_base`) on the
    same layouts (every cell is evaluated on the same seeded episodes): the difference with Newcombe's interval and
    the paired counts (episodes only this cell solved, only the other solved), over the (training seed, evaluation
    seed) pairs both have."""

    def evals(name: str) -> dict[tuple[int, int], dict]:
        cell = summary[name]
        return {(r["seed"], es): e for r in runs.values() if all(r[a] == cell[a] for a in AXES)
                for es, e in evals_of(r).items()}

    def outcomes(by_key: dict, keys: list) -> list[bool]:
        return [bool(ep["success"]) for key in keys for t in tasks for ep in by_key[key]["episodes"][t]]

    def paired(name: str, other: str) -> Optional[dict[str, Any]]:
        if other not in summary or other == name:
            return None
        own, theirs = evals(name), evals(other)
        keys = sorted(set(own) & set(theirs))
        if not keys:
            return None
        mine, ref = outcomes(own, keys), outcomes(theirs, keys)
        k1, k2, n = sum(mine), sum(ref), len(mine)
        lo, hi = newcombe(k1, n, k2, n)
        return {"reference": other, "seeds": sorted({s for s, _ in keys}),
                "eval_seeds": sorted({es for _, es in keys}), "difference": round((k1 - k2) / n, 4),
                "ci95": [round(lo, 4), round(hi, 4)], "only_this": sum(a and not b for a, b in zip(mine, ref)),
                "only_reference": sum(b and not a for a, b in zip(mine, ref))}

    for name, cell in summary.items():
        for key, other in (("vs_reference", REFERENCE), ("vs_head_base", head_base(cell["head"]))):
            got = paired(name, other)
            if got:
                cell[key] = got


def _vs(s: dict[str, Any], key: str, other: str) -> str:
    ref = s.get(key)
    if not ref:
        return "reference" if cell_name(s) == other else ""
    return (f"{100 * ref['difference']:+.0f} [{100 * ref['ci95'][0]:+.0f}, {100 * ref['ci95'][1]:+.0f}]; "
            f"{ref['only_this']} / {ref['only_reference']}")


def table(summary: dict[str, Any]) -> str:
    rows = ["| head | adapt | co-training | augment | success (95% CI) | by eval seed | vs cvae/full (95% CI; only "
            "this / only cvae) | vs same head, full (95% CI; only this / only base) | act ms | train s | trainable |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        rows.append(f"| {s['head']} | {s['adapt']} | {s['cotrain']} | {s['augment']} | "
                    f"{100 * s['success']:.0f}% [{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}] "
                    f"({s['successes']}/{s['episodes']}) | "
                    f"{', '.join('{successes}/{episodes}'.format(**e) for e in s['by_eval_seed'].values())} | "
                    f"{_vs(s, 'vs_reference', REFERENCE)} | {_vs(s, 'vs_head_base', head_base(s['head']))} | "
                    f"{s['act_ms']:.1f} | {s['train_seconds']:.0f} | {s['trainable_params']:,} |")
    return "\n".join(rows) + "\n"


def plot(summary: dict[str, Any], path: str) -> None:
    """One row per cell: success with its Wilson interval, the cell's act latency written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)[::-1]  # the first cell on top
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.34 * len(names)))
    for y, name in enumerate(names):
        s = summary[name]
        err = [[max(0.0, s["success"] - s["ci95"][0])], [max(0.0, s["ci95"][1] - s["success"])]]
        ax.errorbar([s["success"]], [y], xerr=err, marker="o", capsize=3,
                    color={"cvae": "C0", "flow": "C1", "diffusion": "C2", "tokens": "C3"}[s["head"]])
        ax.annotate(f"{s['successes']}/{s['episodes']}, {s['act_ms']:.0f} ms", (1.02, y), fontsize=7, va="center",
                    annotation_clip=False)
    ax.set_yticks(range(len(names)), [n.replace("-cotrain_", " cotrain:").replace("-aug_", " aug:")
                                      .replace("-", " ") for n in names], fontsize=7)
    ax.set_xlim(-0.02, 1.0)
    ax.set_xlabel("closed-loop success (95% Wilson interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from tqdm import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.time()
    try:
        if "on" in args.cotrain and not args.cotrain_shards:
            raise InputError("--cotrain-shards: co-training cells need pre-tokenized text-video shards")
        if not 0.0 <= args.cotrain_weight < 1.0:
            raise InputError(f"--cotrain-weight: must be in [0, 1), got {args.cotrain_weight}")
        for field, v in (("--lora-rank", args.lora_rank), ("--code-shift", args.code_shift),
                         ("--latency-repeats", args.latency_repeats)):
            if v < 1:
                raise InputError(f"{field}: must be >= 1, got {v}")
        if EVAL_SEED not in args.eval_seeds or len(set(args.eval_seeds)) != len(args.eval_seeds):
            raise InputError(f"--eval-seeds: must list {EVAL_SEED} (gr experiment's layouts) and no seed twice, got "
                             f"{args.eval_seeds}")
        base, spec, data = prepare(args, argv)
    except InputError as exc:
        print(f"gr experiment-grid: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    path = os.path.join(args.out, "grid.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"runs": {}, "wall_seconds": 0.0}
    if results.get("options"):  # a restart (or more cells) must keep what the runs mean
        for key in (*DESIGN_KEYS, "demos", "lora_rank", "code_shift", "cotrain_shards", "cotrain_weight"):
            if not same_design(results["options"], base["options"], key):
                print(f"gr experiment-grid: error: --out: {path} holds runs made with another {key}; use another "
                      "--out or the same options", file=sys.stderr)
                raise SystemExit(2)
    results.update({k: base[k] for k in ("command", "git", "options", "data", "pretrained", "eval",
                                         "pretrain_includes_target_tasks") if k in base})
    # every invocation that added cells to this --out, with the cells it asked for (the runs say which one made them)
    results.setdefault("sessions", []).append({**base["sessions"][-1], "cells": [cell_name(c) for c in cells(args)]})
    results["grid"] = {"axes": {a: getattr(args, {"head": "heads"}.get(a, a)) for a in AXES},
                       "lora_rank": args.lora_rank, "code_shift": args.code_shift,
                       "cotrain": {"shards": args.cotrain_shards, "weight": args.cotrain_weight},
                       "eval_seeds": args.eval_seeds}
    wall_before = results["wall_seconds"]
    plan = [(c, s, f"{cell_name(c)}_s{s}") for s in args.seeds for c in cells(args)]

    def missing(run: dict) -> list[int]:
        return [es for es in args.eval_seeds if es not in evals_of(run)]

    for name in [name for _, _, name in plan if name in results["runs"]]:
        run = results["runs"][name]
        if missing(run) and not os.path.exists(run["checkpoint"]):  # refuse before any work, not halfway
            print(f"gr experiment-grid: error: --eval-seeds: run {name} lacks evaluation seeds {missing(run)} and its "
                  f"checkpoint is missing: {run['checkpoint']}", file=sys.stderr)
            raise SystemExit(2)

    def save() -> None:
        results["summary"] = summarize(results["runs"], args)
        results["wall_seconds"] = round(wall_before + time.time() - t0, 1)
        save_json(path, results)

    with tqdm(total=len(plan), desc="cells", unit="cell") as bar:
        for cell, seed, name in plan:
            bar.set_postfix(cell=cell_name(cell), seed=seed)
            if name not in results["runs"]:
                results["runs"][name] = {**run_cell(args, spec, data, cell, seed),
                                         "session": len(results["sessions"]) - 1}
                save()
            run = results["runs"][name]
            for es in missing(run):
                run.setdefault("extra_evals", {})[str(es)] = {**extra_eval(args, run, es),
                                                              "session": len(results["sessions"]) - 1}
                save()
            bar.update(1)
    save()
    with open(os.path.join(args.out, "grid.md"), "w") as f:
        f.write(table(results["summary"]))
    plot(results["summary"], os.path.join(args.out, "grid.png"))
    return results


if __name__ == "__main__":
    main()
