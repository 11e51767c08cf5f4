"""`gr experiment`: what does video pretraining buy? Pretrained vs scratch finetuning under the same step budget.

Every setting (demos per task x seed) finetunes the same config twice with the same `--steps`: once from the
pretraining checkpoint (`init_from: CKPT`) and once from scratch (`init_from: null`). Both arms use the checkpoint's
image tokenizer, text tower and trunk sizes, so they differ only in their initial weights. The n-demo arm trains on
the FIRST n training episodes of each task (nested: 5 is inside 10 is inside 20), with normalization statistics
recomputed from those episodes, and every arm validates on the same held-out episodes. Each arm is then run closed
loop on the same seeded layouts (`gr.evaluate.evaluate(..., seed=EVAL_SEED)`, test-split seeds no demo used), on the
finetuning tasks and on `--eval-only-tasks` (instructions without any demo: zero-shot).

    gr experiment --pretrained outputs/demo/pretrain/checkpoints/last.ckpt --pretrain-includes-target-tasks no

Writes `<out>/experiment.json` after every arm (temp file + rename; a restart skips the arms it holds) and
`<out>/experiment.png` (success vs demos per task, one panel per task plus the mean). Intervals: the Wilson score
interval (95%) over all episodes pooled across seeds, with the per-seed spread beside it; the headline difference
`pretrained_minus_scratch` uses Newcombe's hybrid score interval (method 10 of Newcombe 1998) built from the two Wilson
intervals. That interval treats the arms as independent samples although they share the evaluation layouts, so it is
conservative when their outcomes are correlated; the paired counts (both / only pretrained / only scratch / neither
succeeded on the same layout) are reported too.

Wall time, measured (bench/results/experiment-cpu2.json): the defaults (4 finetuning tasks + 1 eval-only task,
demos 5 10, seeds 0 1, both arms: 8 arms of 400 steps, 10 episodes per task) take about 1.5 hours on 2 free CPU
cores: 78 s to make and tokenize 4 x 12 demos at 64 px, then per arm about 7 min of training and 4 min of closed-loop
evaluation (50 episodes, 2 workers). A busy machine is slower: arms that ran beside a test suite took up to 18 min.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from glob import glob
from typing import Any, Optional

from gr.demo import EVAL_EXECUTE_STEPS, REPO, _run_config
from gr.export import file_digest
from gr.safe_load import load_checkpoint

EVAL_SEED = 0  # every arm is evaluated on the layouts of episode_seed(EVAL_SEED, task, "test", i)
VAL_DEMOS_PER_TASK = 2  # held-out demos per task when the experiment makes its own data
Z95 = 1.959963984540054  # two-sided 95% normal quantile
ARMS = ("pretrained", "scratch")
# A pair sharing one scene and differing only by instruction, plus two other default tasks.
FINETUNE_TASKS = ("drawer-open-v3", "drawer-close-v3", "button-press-topdown-v3", "coffee-button-v3")
EVAL_ONLY_TASKS = ("window-close-v3",)
# Options that define what the runs in an experiment.json mean: a restart must not change them.
DESIGN_KEYS = ("pretrained", "config", "steps", "tasks", "eval_only_tasks", "eval_episodes", "eval_max_steps",
               "robot_data", "pretrain_includes_target_tasks")
EPISODE_KEY = re.compile(r"^(train|val)_(.+)_(\d{6})$")  # keys written by data_prep/metaworld_demos.py


class InputError(ValueError):
    """A user mistake; the message starts with the option it concerns."""


# ---- options ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gr experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="pretraining checkpoint (names the image tokenizer)")
    p.add_argument("--pretrain-includes-target-tasks", required=True, choices=["yes", "no"],
                   help="whether the pretraining videos showed the target tasks (recorded; changes the meaning)")
    p.add_argument("--config", default=os.path.join(REPO, "configs/demo/finetune.yaml"), help="base finetune YAML")
    p.add_argument("--steps", type=int, default=400, help="finetune max_steps of every arm")
    p.add_argument("--tasks", nargs="+", default=list(FINETUNE_TASKS), help="finetuning tasks")
    p.add_argument("--eval-only-tasks", nargs="*", default=list(EVAL_ONLY_TASKS),
                   help="tasks evaluated zero-shot: no demo of them is trained on")
    p.add_argument("--demos", nargs="+", type=int, default=[5, 10],
                   help="training demos per task (the target is read at <= 10)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--eval-episodes", type=int, default=10, help="seeded closed-loop episodes per task")
    p.add_argument("--eval-max-steps", type=int, default=200, help="episode length limit")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for demo generation and evaluation")
    p.add_argument("--robot-data", default=None,
                   help="folder of pre-tokenized train-*.tar + val-*.tar robot shards (default: make them)")
    p.add_argument("--reuse-scratch", default=None, metavar="OTHER_OUT",
                   help="take the scratch arms of another experiment folder instead of training them again; each "
                        "must match this run's arm config, data files and evaluation exactly (else an error)")
    p.add_argument("--out", default="outputs/experiment")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise an InputError naming the option of the first bad value."""
    from gr.envs import check_task

    for field, tasks in (("--tasks", args.tasks), ("--eval-only-tasks", args.eval_only_tasks)):
        for task in tasks:
            try:
                check_task(task)
            except ValueError as exc:
                raise InputError(f"{field}: {exc}") from None
        if len(set(tasks)) != len(tasks):
            raise InputError(f"{field}: a task is repeated: {tasks}")
    both = sorted(set(args.tasks) & set(args.eval_only_tasks))
    if both:
        raise InputError(f"--eval-only-tasks: {both} also in --tasks (eval-only tasks must have no demo)")
    positive = {"--demos": args.demos, "--steps": [args.steps], "--eval-episodes": [args.eval_episodes],
                "--eval-max-steps": [args.eval_max_steps], "--workers": [args.workers]}
    for field, values in positive.items():
        if min(values) < 1:
            raise InputError(f"{field}: must be >= 1, got {min(values)}")
    if min(args.seeds) < 0:
        raise InputError(f"--seeds: must be >= 0, got {min(args.seeds)}")
    for field, path in (("--pretrained", args.pretrained), ("--config", args.config)):
        if not os.path.isfile(path):
            raise InputError(f"{field}: file not found: {path!r}")
    if args.robot_data is not None and not os.path.isdir(args.robot_data):
        raise InputError(f"--robot-data: folder not found: {args.robot_data!r}")


# ---- the pretrained checkpoint and the data --------------------------------------------------------------------------
def pretrained_spec(path: str) -> dict[str, Any]:
    """The parts of a pretraining checkpoint both arms share: model sizes, text tower, image tokenizer, and the
    `tokens` spec that pre-tokenized shards must match (read through gr.safe_load, like gr.cli's `_parse_ckpt_path`)."""
    from gr.config import ImageTokenizerConfig
    from gr.encoders import FrozenVQGAN

    try:
        hp = load_checkpoint(path).get("hyper_parameters", {})
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise InputError(f"--pretrained: {path!r} is not a readable checkpoint ({exc})") from None
    if not all(k in hp for k in ("model", "text_encoder", "image_tokenizer")):
        raise InputError(f"--pretrained: {path!r} has no model/text_encoder/image_tokenizer hyper-parameters "
                         "(not a gr pretraining checkpoint?)")
    try:
        vq = FrozenVQGAN(ImageTokenizerConfig(**hp["image_tokenizer"]))
        image_size = int(hp["model"]["clip"]["image_size"])
        grid = vq.grid_size(image_size)
    except ValueError as exc:
        raise InputError(f"--pretrained: {path!r}: {exc}") from None
    tokens = {"codebook_size": vq.codebook_size, "image_size": image_size, "grid": [grid, grid],
              "fingerprint": vq.vq.codebook_fingerprint()}
    return {"checkpoint": os.path.abspath(path), "model": hp["model"], "text_encoder": hp["text_encoder"],
            "image_tokenizer": hp["image_tokenizer"], "tokens": tokens}


def episode_members(tar: tarfile.TarFile) -> dict[str, list[tarfile.TarInfo]]:
    """Tar members grouped by sample key, in file order."""
    groups: dict[str, list[tarfile.TarInfo]] = {}
    for member in tar.getmembers():
        groups.setdefault(member.name.split(".", 1)[0], []).append(member)
    return groups


def first_json(shard: str) -> tuple[str, dict[str, Any]]:
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                return member.name, json.loads(tar.extractfile(member).read())
    return shard, {}


def check_robot_data(folder: str, field: str, tokens: dict[str, Any], tasks: list[str], num_demos: int) -> dict:
    """Check the shards of `folder` against the checkpoint's tokenizer and count episodes; returns the shard lists.

    Raises an InputError naming `field` when a shard's `tokens` block does not match, or a task has fewer than
    `num_demos` training (or no held-out) episodes."""
    from gr.data.shards import tokens_spec_mismatch

    shards = {split: sorted(glob(os.path.join(folder, f"{split}-*.tar"))) for split in ("train", "val")}
    for split, found in shards.items():
        if not found:
            raise InputError(f"{field}: no {split}-*.tar shards in {folder!r}")
    for shard in shards["train"] + shards["val"]:
        name, meta = first_json(shard)
        why = tokens_spec_mismatch(meta.get("tokens"), tokens)
        if why:
            raise InputError(f"{field}: {shard}:{name}: {why}; tokenize the demos with --pretrained's tokenizer")
    counts = {split: {t: set() for t in tasks} for split in shards}
    for split, found in shards.items():
        for shard in found:
            with tarfile.open(shard) as tar:
                keys = list(episode_members(tar))
            for key in keys:
                m = EPISODE_KEY.match(key)
                if m and m.group(2) in counts[split]:
                    counts[split][m.group(2)].add(int(m.group(3)))
    for task in tasks:
        if not set(range(num_demos)) <= counts["train"][task]:
            raise InputError(f"{field}: task {task!r} has {len(counts['train'][task])} training episodes "
                             f"(train_{task}_000000 ...), --demos needs {num_demos}")
        if not counts["val"][task]:
            raise InputError(f"{field}: task {task!r} has no held-out val_{task}_* episode")
    return {**shards, "num_train": {t: len(c) for t, c in counts["train"].items()},
            "num_val": {t: len(c) for t, c in counts["val"].items()}}


def make_robot_data(out: str, tasks: list[str], num_demos: int, spec: dict[str, Any], workers: int) -> dict:
    """Meta-World demos of `tasks` (data_prep/metaworld_demos.py), tokenized with the checkpoint's tokenizer, in
    `<out>/tokens`. A finished folder (marked by `<out>/robot_data.json`) is reused."""
    from data_prep.metaworld_demos import main as make_demos
    from data_prep.tokenize_shards import run as tokenize

    marker = os.path.join(out, "robot_data.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    tok = spec["image_tokenizer"]
    if not tok.get("checkpoint"):
        raise InputError("--pretrained: its image tokenizer has random weights (image_tokenizer.checkpoint is null), "
                         "which data_prep/tokenize_shards.py cannot load; pass --robot-data")
    t0, size = time.time(), spec["tokens"]["image_size"]
    demos = make_demos(["--out", os.path.join(out, "demos"), "--tasks", *tasks, "--num-demos", str(num_demos),
                        "--num-val", str(VAL_DEMOS_PER_TASK), "--image-size", str(size), "--workers", str(workers)])
    dest = os.path.join(out, "tokens")
    for split in ("train", "val"):
        tokenize([demos[f"{split}_shards"]], dest, tok["checkpoint"], tok.get("yaml"), image_size=size)
    made = {"folder": dest, "tasks": demos["tasks"], "seconds": round(time.time() - t0, 1)}
    with open(marker, "w") as f:
        json.dump(made, f, indent=2)
    return made


def episode_stats(tar: tarfile.TarFile, members: list[tarfile.TarInfo], state, action) -> None:
    """Add one episode's state.npy / action.npy to the running statistics."""
    import numpy as np

    for member in members:
        for suffix, stats in ((".state.npy", state), (".action.npy", action)):
            if member.name.endswith(suffix):
                stats.update(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))


def write_subset(shards: list[str], tasks: list[str], prefix: str, limit: Optional[int], dest: str) -> dict:
    """Copy the tar members of the first `limit` (None: all) `<prefix>_<task>_*` episodes of every task into
    `dest/<prefix>-000000.tar`, and write their statistics to `dest/<prefix>-stats.json`. Kept when present."""
    from gr.data.robot import RunningStats

    path, stats_path = os.path.join(dest, f"{prefix}-000000.tar"), os.path.join(dest, f"{prefix}-stats.json")
    if os.path.isfile(path) and os.path.isfile(stats_path):
        return {"shards": path, "stats_file": stats_path}
    os.makedirs(dest, exist_ok=True)
    state, action, count = RunningStats(), RunningStats(), 0
    with tarfile.open(path + ".tmp", "w") as out:
        for shard in shards:
            with tarfile.open(shard) as tar:
                for key, members in episode_members(tar).items():
                    m = EPISODE_KEY.match(key)
                    if not m or m.group(1) != prefix or m.group(2) not in tasks:
                        continue
                    if limit is not None and int(m.group(3)) >= limit:
                        continue
                    for member in members:
                        out.addfile(member, tar.extractfile(member))
                    episode_stats(tar, members, state, action)
                    count += 1
    # The n-demo arm must not normalize with statistics of demos it never trains on.
    with open(stats_path, "w") as f:
        json.dump({"state": state.result(), "action": action.result(), "num_episodes": count}, f, indent=2)
    os.replace(path + ".tmp", path)
    return {"shards": path, "stats_file": stats_path}


# ---- one arm ---------------------------------------------------------------------------------------------------------
def rooted_config(path: str, root: str, max_steps: int) -> dict:
    """The YAML at `path` with every output under `root`: what demo._derived_config does for configs/demo/ files,
    for any config (and one without a logger)."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    trainer = cfg.setdefault("trainer", {})
    trainer.update(default_root_dir=root, max_steps=max_steps)
    # One validation, at the end: the val metrics are those of the model that is evaluated.
    trainer.update(val_check_interval=max_steps, check_val_every_n_epoch=None)
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = root
    for cb in trainer.get("callbacks") or []:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = os.path.join(root, "checkpoints")
    return cfg


def arm_config(args: argparse.Namespace, spec: dict, data: dict, arm: str, seed: int, root: str) -> dict:
    """The finetune config of one arm: only `init_from` differs between the arms of a setting."""
    cfg = rooted_config(args.config, root, args.steps)
    cfg["seed_everything"] = seed
    init = cfg["model"]["init_args"]
    init["init_from"] = spec["checkpoint"] if arm == "pretrained" else None
    model = init.setdefault("model", {})
    model["trunk"] = dict(spec["model"]["trunk"])
    model["max_text_tokens"] = spec["model"]["max_text_tokens"]
    model.setdefault("clip", {})["image_size"] = spec["tokens"]["image_size"]
    init["text_encoder"] = dict(spec["text_encoder"])
    init["image_tokenizer"] = dict(spec["image_tokenizer"])
    init.setdefault("optim", {})["total_steps"] = args.steps  # the cosine schedule spans the budget
    cfg["data"]["init_args"].update(train_shards=data["train"]["shards"], val_shards=data["val"]["shards"],
                                    stats_file=data["train"]["stats_file"], shard_format="tokens", seed=seed)
    return cfg


def train_arm(cfg: dict, root: str) -> dict:
    """Finetune through the LightningCLI; the run summary's numbers."""
    t0 = time.time()
    cli = _run_config(cfg, root, "finetune")
    with open(os.path.join(root, "summary", "summary.json")) as f:
        summary = json.load(f)
    report = getattr(cli.model, "init_report", {}) or {}
    return {"train_seconds": round(time.time() - t0, 1), "global_step": summary["global_step"],
            "first_train_loss": summary["first_train_loss"], "final_train_loss": summary["last_train_loss"],
            "val": {k: v for k, v in summary.items() if k.startswith("val/")},
            "checkpoint": summary["last_checkpoint"],
            "transfer": {k: len(report.get(k, [])) for k in ("loaded", "new", "dropped")}}


def eval_arm(checkpoint: str, tasks: list[str], args: argparse.Namespace, root: str, seed: int = EVAL_SEED,
             folder: str = "eval", video: bool = True) -> dict:
    """Seeded closed-loop episodes on the same layouts for every arm (another `seed`: other layouts, the same for
    every arm too)."""
    from gr.evaluate import evaluate

    t0 = time.time()
    report = evaluate(checkpoint, tasks, episodes=args.eval_episodes, seed=seed, workers=args.workers,
                      max_steps=args.eval_max_steps, out=os.path.join(root, folder), execute_steps=EVAL_EXECUTE_STEPS,
                      video=video)
    return {"eval_seconds": round(time.time() - t0, 1),
            "success": {t: r["success_rate"] for t, r in report["tasks"].items()},
            "episodes": {t: r["episodes"] for t, r in report["tasks"].items()}}


def run_arm(args: argparse.Namespace, spec: dict, data: dict, arm: str, demos: int, seed: int) -> dict:
    import shutil

    root = os.path.abspath(os.path.join(args.out, "arms", arm_name(arm, demos, seed)))
    if os.path.isdir(root):  # left by a killed run: start the arm afresh
        shutil.rmtree(root)
    train = train_arm(arm_config(args, spec, data[demos], arm, seed, root), root)
    result = eval_arm(train["checkpoint"], args.tasks + args.eval_only_tasks, args, root)
    return {"arm": arm, "demos": demos, "seed": seed, "init_from": spec["checkpoint"] if arm == "pretrained" else None,
            "root": root, "config": os.path.join(root, "demo_finetune.yaml"), **train, **result}


def comparable_config(cfg: dict) -> dict:
    """An arm config without the paths that name its own folder and data files (those are compared by content)."""
    import copy

    cfg = copy.deepcopy(cfg)
    trainer = cfg.get("trainer", {})
    trainer.pop("default_root_dir", None)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"].get("init_args", {}).pop("save_dir", None)
    for cb in trainer.get("callbacks") or []:
        cb.get("init_args", {}).pop("dirpath", None)
    for key in ("train_shards", "val_shards", "stats_file"):
        cfg.get("data", {}).get("init_args", {}).pop(key, None)
    return cfg


def reused_scratch_arm(args: argparse.Namespace, spec: dict, data: dict, demos: int, seed: int) -> Optional[dict]:
    """The scratch arm `(demos, seed)` of the experiment in `--reuse-scratch`, when it is the run this experiment
    would train: the same config (all but its own paths), byte-identical training/validation files, the same
    evaluation. A scratch arm never reads the pretrained weights, so two experiments that share the tokenizer, the
    trunk sizes and the demos share their scratch arms. None when that experiment has no such arm; an InputError
    naming what differs otherwise."""
    import yaml

    other = os.path.abspath(args.reuse_scratch)
    name, field = arm_name("scratch", demos, seed), "--reuse-scratch"
    path = os.path.join(other, "experiment.json")
    if not os.path.isfile(path):
        raise InputError(f"{field}: no experiment.json in {other!r}")
    with open(path) as f:
        results = json.load(f)
    run = results["arms"].get(name)
    if run is None:
        return None
    for key in ("tasks", "eval_only_tasks", "eval_episodes", "eval_max_steps", "steps"):
        if results["options"].get(key) != getattr(args, key):
            raise InputError(f"{field}: {path}: {key} is {results['options'].get(key)!r}, "
                             f"this run's is {getattr(args, key)!r}")
    if (results["eval"]["seed"], results["eval"]["execute_steps"]) != (EVAL_SEED, EVAL_EXECUTE_STEPS):
        raise InputError(f"{field}: {path}: evaluated with seed/execute_steps "
                         f"{results['eval']['seed']}/{results['eval']['execute_steps']}")
    config = os.path.join(other, "arms", name, "demo_finetune.yaml")
    with open(config) as f:
        theirs = comparable_config(yaml.safe_load(f))
    ours = comparable_config(arm_config(args, spec, data[demos], "scratch", seed, os.path.join(other, "arms", name)))
    if theirs != ours:
        diff = sorted(k for k in set(theirs["model"]["init_args"]) | set(ours["model"]["init_args"])
                      if theirs["model"]["init_args"].get(k) != ours["model"]["init_args"].get(k))
        raise InputError(f"{field}: {config}: arm config differs from this run's (model.init_args {diff or '-'}, "
                         "or the trainer/data sections)")
    mine = {"train": data[demos]["train"]["shards"], "train stats": data[demos]["train"]["stats_file"],
            "val": data[demos]["val"]["shards"]}
    subsets = os.path.join(other, "data", "subsets")
    for what, ours_file in mine.items():
        theirs_file = os.path.join(subsets, "val" if what == "val" else f"d{demos}", os.path.basename(ours_file))
        if not os.path.isfile(theirs_file) or file_digest(theirs_file) != file_digest(ours_file):
            raise InputError(f"{field}: {theirs_file}: {what} data differ from this run's {ours_file}; pass "
                             f"--robot-data {os.path.join(other, 'data', 'tokens')} to train on the same demos")
    return {**run, "reused_from": {"experiment": path, "arm": name}}


def arm_name(arm: str, demos: int, seed: int) -> str:
    return f"{arm}_d{demos}_s{seed}"


# ---- statistics ------------------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    # Exactly 0 (k = 0) and 1 (k = n) in closed form; the float formula gives 1e-17 and 1 - 1e-16 for some n.
    return (0.0 if k == 0 else max(0.0, lo), 1.0 if k == n else min(1.0, hi))


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of p1 - p2 from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1), wilson(k2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def proportion(outcomes_by_seed: dict[int, list[bool]]) -> dict[str, Any]:
    """Pooled success with its Wilson interval, and the spread of the per-seed rates."""
    pooled = [o for seed in sorted(outcomes_by_seed) for o in outcomes_by_seed[seed]]
    rates = {s: sum(o) / len(o) for s, o in sorted(outcomes_by_seed.items())}
    values = list(rates.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"success": sum(pooled) / len(pooled), "successes": sum(pooled), "episodes": len(pooled),
            "ci95": list(wilson(sum(pooled), len(pooled))), "per_seed": {str(s): r for s, r in rates.items()},
            "seed_std": std, "seed_min": min(values), "seed_max": max(values)}


def outcomes(arms: dict, arm: str, demos: int, seeds: list[int], tasks: list[str]) -> dict[int, list[bool]]:
    """Per seed, the episode outcomes of `tasks` in a fixed (task, episode index) order, so arms pair up."""
    runs = {r["seed"]: r for r in arms.values() if r["arm"] == arm and r["demos"] == demos and r["seed"] in seeds}
    return {s: [e["success"] for t in tasks for e in runs[s]["episodes"][t]] for s in seeds}


def difference(arms: dict, demos: int, seeds: list[int], tasks: list[str]) -> dict[str, Any]:
    a, b = outcomes(arms, "pretrained", demos, seeds, tasks), outcomes(arms, "scratch", demos, seeds, tasks)
    pa, pb = [o for s in seeds for o in a[s]], [o for s in seeds for o in b[s]]
    pairs = list(zip(pa, pb))  # the same layout under both arms
    paired = {"both": sum(x and y for x, y in pairs), "pretrained_only": sum(x and not y for x, y in pairs),
              "scratch_only": sum(y and not x for x, y in pairs), "neither": sum(not (x or y) for x, y in pairs)}
    ka, kb = sum(pa), sum(pb)
    return {"difference": ka / len(pa) - kb / len(pb), "ci95": list(newcombe(ka, len(pa), kb, len(pb))),
            "seeds": seeds, "paired": paired}


def summarize(arms: dict, tasks: list[str], eval_only: list[str]) -> dict[str, Any]:
    """Per (arm, demos): pooled success and intervals, per task and mean; per demos: pretrained - scratch."""
    groups = {"mean": tasks, **{t: [t] for t in tasks + eval_only}}
    if eval_only:
        groups["eval_only_mean"] = eval_only
    by_arm: dict[str, dict] = {}
    for arm in sorted({r["arm"] for r in arms.values()}):
        for demos in sorted({r["demos"] for r in arms.values() if r["arm"] == arm}):
            seeds = sorted(r["seed"] for r in arms.values() if r["arm"] == arm and r["demos"] == demos)
            by_arm.setdefault(arm, {})[str(demos)] = {
                "seeds": seeds, **{g: proportion(outcomes(arms, arm, demos, seeds, ts)) for g, ts in groups.items()}}
    diffs = {}
    for demos in sorted({r["demos"] for r in arms.values()}):
        seeds = [s for s in by_arm.get("pretrained", {}).get(str(demos), {}).get("seeds", [])
                 if s in by_arm.get("scratch", {}).get(str(demos), {}).get("seeds", [])]
        if seeds:  # only seeds both arms finished: like is compared with like
            diffs[str(demos)] = {g: difference(arms, demos, seeds, ts) for g, ts in groups.items()}
    return {"intervals": {"success": "Wilson score interval (95%) over all episodes pooled across seeds; "
                                     "per_seed/seed_std/seed_min/seed_max give the spread over training seeds",
                          "difference": "Newcombe's hybrid score interval (method 10, 1998) from the two Wilson "
                                        "intervals, treating the arms as independent; the arms share layouts, so it "
                                        "is conservative when outcomes correlate (see 'paired')"},
            "groups": groups, "by_arm": by_arm, "pretrained_minus_scratch": diffs}


# ---- plot ------------------------------------------------------------------------------------------------------------
def plot(summary: dict[str, Any], path: str) -> None:
    """Success vs demos per task, one panel per group (each task, the mean), pooled rate with its Wilson interval
    and the per-seed rates as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in summary["groups"] if g != "mean"] + ["mean"]
    if len(summary["groups"].get("eval_only_mean", [])) == 1:
        groups.remove("eval_only_mean")  # the one eval-only task's own panel says it all
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for i, (arm, levels) in enumerate(sorted(summary["by_arm"].items())):
            xs = sorted(int(d) for d in levels)
            ys = [levels[str(d)][group]["success"] for d in xs]
            # Clamped at 0: at 0% or 100% the Wilson bound equals the rate up to float rounding (1 - 1e-16).
            err = [[max(0.0, y - levels[str(d)][group]["ci95"][0]) for d, y in zip(xs, ys)],
                   [max(0.0, levels[str(d)][group]["ci95"][1] - y) for d, y in zip(xs, ys)]]
            shift = 1.0 + 0.04 * (i - 0.5)  # arms side by side on the log axis
            ax.errorbar([x * shift for x in xs], ys, yerr=err, marker="o", capsize=3, label=arm)
            for d in xs:
                per_seed = list(levels[str(d)][group]["per_seed"].values())
                ax.scatter([d * shift] * len(per_seed), per_seed, s=10, alpha=0.5, color=ax.lines[-1].get_color())
        ax.set_title(panel_title(group, summary["groups"].get("eval_only_mean", [])), fontsize=9)
        ax.set_xscale("log")
        levels_all = sorted({int(d) for lv in summary["by_arm"].values() for d in lv})
        ax.set_xticks(levels_all, [str(d) for d in levels_all])
        ax.set_xlim(levels_all[0] / 1.4, levels_all[-1] * 1.4)  # else one level spreads the arms far apart
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("demos per task")
        ax.set_ylabel("success rate")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("closed-loop success, 95% Wilson intervals (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def panel_title(group: str, eval_only: list[str]) -> str:
    if group == "mean":
        return "mean over finetuning tasks"
    if group == "eval_only_mean":
        return "mean over eval-only tasks (zero-shot)"
    return group + (" (zero-shot)" if group in eval_only else "")


# ---- results file ----------------------------------------------------------------------------------------------------
def save_json(path: str, results: dict) -> None:
    """Write atomically: a kill leaves the previous file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_commit() -> Optional[dict[str, Any]]:
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


PATH_OPTIONS = ("pretrained", "config", "robot_data")  # compared by content, so a moved experiment still resumes


def content_fingerprint(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a file, or of a folder's files (relative names, sizes and contents); None for no path."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return file_digest(path)
    import hashlib

    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}:{os.path.getsize(full)}:{file_digest(full)}\n".encode())
    return h.hexdigest()


def options(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(vars(args))
    for key in ("pretrained", "config", "robot_data", "out"):
        opts[key] = os.path.abspath(opts[key]) if opts[key] else None
    opts["pretrain_includes_target_tasks"] = args.pretrain_includes_target_tasks == "yes"
    opts["fingerprints"] = {key: content_fingerprint(opts[key]) for key in PATH_OPTIONS}
    return opts


def same_design(old: dict[str, Any], new: dict[str, Any], key: str) -> bool:
    """Whether a restart keeps design option `key`: file options by content where both runs recorded it (an older
    results file has no fingerprints: then by path), the others by value."""
    if key in PATH_OPTIONS:
        theirs, ours = (old.get("fingerprints") or {}).get(key), new["fingerprints"].get(key)
        if theirs is not None and ours is not None:
            return theirs == ours
        if old.get(key) is None and new.get(key) is None:
            return True
    return old.get(key) == new.get(key)


def load_results(path: str, opts: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The results so far (a restart keeps them), or a new file; a restart must keep the design options."""
    session = {"command": list(sys.argv), "arguments": argv, "git": git_commit(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
        for key in DESIGN_KEYS:
            if not same_design(results["options"], opts, key):
                raise InputError(f"--out: {path} holds runs made with another {key} ({results['options'].get(key)!r}, "
                                 f"now {opts[key]!r}); use another --out or the same options")
    else:
        results = {"arms": {}, "wall_seconds": 0.0, "sessions": [], "date": session["date"]}
    results["sessions"].append(session)
    results.update(command=session["command"], git=session["git"], options=opts,
                   pretrain_includes_target_tasks=opts["pretrain_includes_target_tasks"])
    return results


# ---- main ------------------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, argv: list[str]) -> tuple[dict, dict, dict]:
    """Check every input before anything trains: (results so far, checkpoint spec, data per demos level)."""
    check_args(args)
    spec = pretrained_spec(args.pretrained)
    os.makedirs(args.out, exist_ok=True)
    results = load_results(os.path.join(args.out, "experiment.json"), options(args), argv)
    field, folder = "--robot-data", args.robot_data
    if folder is None:
        made = make_robot_data(os.path.join(args.out, "data"), args.tasks, max(args.demos), spec, args.workers)
        field, folder = f"the demos made in {made['folder']}", made["folder"]
        results["data_generation"] = made
    shards = check_robot_data(folder, field, spec["tokens"], args.tasks, max(args.demos))
    subsets = os.path.join(args.out, "data", "subsets")
    val = write_subset(shards["val"], args.tasks, "val", None, os.path.join(subsets, "val"))
    data = {n: {"train": write_subset(shards["train"], args.tasks, "train", n, os.path.join(subsets, f"d{n}")),
                "val": val} for n in sorted(set(args.demos))}
    results["data"] = {"folder": os.path.abspath(folder), "num_train": shards["num_train"],
                       "num_val": shards["num_val"], "subsets": {str(n): d["train"] for n, d in data.items()},
                       "val": val}
    results["pretrained"] = {k: spec[k] for k in ("checkpoint", "model", "image_tokenizer", "tokens")}
    results["eval"] = {"seed": EVAL_SEED, "split": "test", "episodes_per_task": args.eval_episodes,
                       "max_steps": args.eval_max_steps, "execute_steps": EVAL_EXECUTE_STEPS,
                       "tasks": args.tasks, "eval_only_tasks": args.eval_only_tasks}
    return results, spec, data


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from tqdm import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.time()
    try:
        results, spec, data = prepare(args, argv)
    except InputError as exc:
        print(f"gr experiment: error: {exc}", file=sys.stderr)  # a user mistake: one line, no traceback
        raise SystemExit(2) from None
    path, png = os.path.join(args.out, "experiment.json"), os.path.join(args.out, "experiment.png")
    wall_before = results["wall_seconds"]
    # Both arms of a setting run back to back, so a killed experiment leaves complete pairs.
    plan = [(a, d, s) for d in sorted(set(args.demos)) for s in args.seeds for a in args.arms]
    if args.reuse_scratch:
        for arm, demos, seed in plan:
            if arm == "scratch" and arm_name(arm, demos, seed) not in results["arms"]:
                try:
                    run = reused_scratch_arm(args, spec, data, demos, seed)
                except InputError as exc:
                    print(f"gr experiment: error: {exc}", file=sys.stderr)
                    raise SystemExit(2) from None
                if run is not None:
                    results["arms"][arm_name(arm, demos, seed)] = run
    todo = [p for p in plan if arm_name(*p) not in results["arms"]]
    with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="arms", unit="arm") as bar:
        for arm, demos, seed in todo:
            bar.set_postfix(arm=arm_name(arm, demos, seed))
            results["arms"][arm_name(arm, demos, seed)] = run_arm(args, spec, data, arm, demos, seed)
            finish(results, args, path, png, wall_before + time.time() - t0)
            bar.update(1)
    finish(results, args, path, png, wall_before + time.time() - t0)
    return results


def finish(results: dict, args: argparse.Namespace, path: str, png: str, wall_seconds: float) -> None:
    results["summary"] = summarize(results["arms"], args.tasks, args.eval_only_tasks)
    results["wall_seconds"] = round(wall_seconds, 1)
    save_json(path, results)  # before the plot: a plotting failure must not lose a finished arm
    if results["arms"]:
        plot(results["summary"], png)
        results["plot"] = os.path.abspath(png)
        save_json(path, results)


if __name__ == "__main__":
    main()
