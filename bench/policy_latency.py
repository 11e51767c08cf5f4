"""Action-chunk latency of `GRPolicy.act` vs a bare prefix forward pass of the same model, in one run.

Prints one JSON object. The model is the demo's finetuning configuration (configs/demo/finetune.yaml) with random
weights, or any preset (`--preset S`), at batch 1 on the CPU.

What is compared, per call, with the history buffer full and the instruction's text features cached:
- `act_ms`: `GRPolicy.act(obs)` on a raw observation (uint8 images per view, state in robot units): resize, tokenize
  the new frames, normalize, prefix pass to the readouts, CVAE decoder, un-normalize;
- `bare_ms`: the compute that any policy of this model needs for one chunk, called directly on tensors: the frozen
  VQGAN on the new frames, `model.readout_features` on the prefix and `model.action_head`;
- `prefix_only_ms`: `model.readout_features` alone.
The target is act_ms / bare_ms <= 1.1: the API adds no more than 10% (no frame is generated, nothing is re-encoded).

`per_head` then times every action head (`model.robot.head.kind`, gr/model/heads/) on the same trunk: `act_ms` of
`GRPolicy.act` and `head_ms` of the head's `predict` alone on fixed readouts, for the CVAE and the tokens head once and
for flow and diffusion at each `--steps` count (integration / DDIM steps). Ratios to the CVAE row are in the same run.
`ratio_act_vs_prefix_only` also counts the VQGAN on the new frames as overhead: it is close to 1 at real model sizes
(`--preset B`) and larger for the demo's tiny trunk, whose prefix pass costs less than tokenizing two 64 px frames.

    .venv/bin/python bench/policy_latency.py
    .venv/bin/python bench/policy_latency.py --preset S --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def demo_policy(image_size: int = 64, preset: str | None = None, head: dict | None = None):
    """(policy, module, init args): the demo's finetuning configuration with random weights, or any trunk preset;
    `head` overrides fields of `model.robot.head` (e.g. {"kind": "flow", "num_steps": 5})."""
    from gr.policy import GRPolicy
    from gr.training.finetune import FinetuneModule

    with open(os.path.join(REPO, "configs/demo/finetune.yaml")) as f:
        init = yaml.safe_load(f)["model"]["init_args"]
    init.update(init_from=None)
    init["image_tokenizer"] = {"codebook_size": 256, "embed_dim": 32, "ch": 32, "ch_mult": [1, 2, 2, 4],
                               "z_channels": 64, "resolution": image_size}  # demo tokenizer, random weights
    init["model"]["clip"]["image_size"] = image_size
    if preset:
        init["model"]["trunk"] = {"preset": preset}
    if head:
        init["model"]["robot"]["head"] = {**init["model"]["robot"]["head"], **head}
    torch.manual_seed(0)
    module = FinetuneModule(**init)
    robot = module.robot_spec
    module.normalization_stats({"state": {k: [0.0 if k != "std" else 1.0] * robot.state_dim
                                          for k in ("mean", "std", "min", "max")},
                                "action": {k: [0.0 if k not in ("std", "max") else 1.0] * robot.action_dim
                                           for k in ("mean", "std", "min", "max")}})
    return GRPolicy(module.eval()), module, init


def demo_observation(policy, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size = policy.clip.image_size
    return {"images": {v: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for v in policy.robot.view_names},
            "state": rng.normal(size=policy.robot.state_dim).astype(np.float32), "instruction": "press the button"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="trunk preset S/B/L/XL (default: the demo's 4x128 trunk)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--heads", nargs="*", default=["cvae", "flow", "diffusion", "tokens"],
                   help="action heads timed in per_head (none: skip)")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 20],
                   help="integration / sampling step counts of the flow and diffusion heads")
    args = p.parse_args(argv)
    policy, module, init = demo_policy(args.image_size, args.preset)
    robot = module.robot_spec
    obs = demo_observation(policy)
    for _ in range(3):  # fill the history, cache the text, warm up
        policy.act(obs)
    frames = torch.from_numpy(np.stack([obs["images"][v] for v in robot.view_names]))
    text, mask = module.text_encoder([obs["instruction"]])
    codes = torch.stack([module.image_tokenizer.encode(frames)] * module.clip_spec.num_history)[None]
    state = torch.zeros(1, module.clip_spec.num_history, robot.state_dim)

    @torch.no_grad()
    def bare():
        module.image_tokenizer.encode(frames)
        module.model.action_head.predict(module.model.readout_features(text, mask, codes, state), policy.generator)

    with torch.no_grad():
        prefix_only = _timed(lambda: module.model.readout_features(text, mask, codes, state), args.repeats)
    # Interleave the two measured paths so that machine noise hits both alike.
    act, bare_ms = [], []
    for _ in range(args.repeats):
        act.append(_timed(lambda: policy.act(obs), 1))
        bare_ms.append(_timed(bare, 1))
    result = {
        "benchmark": "policy_latency", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"trunk": dict(init["model"]["trunk"]), "image_size": args.image_size,
                     "views": robot.view_names, "num_history": module.clip_spec.num_history,
                     "action_chunk": robot.action_chunk, "prefix_tokens": int(module.model.embed_prefix(
                         text, mask, codes, state)[0].shape[1]), "repeats": args.repeats},
        "act_ms": round(statistics.median(act), 3), "bare_ms": round(statistics.median(bare_ms), 3),
        "prefix_only_ms": round(prefix_only, 3),
    }
    result["ratio_act_vs_bare"] = round(result["act_ms"] / result["bare_ms"], 3)
    result["ratio_act_vs_prefix_only"] = round(result["act_ms"] / result["prefix_only_ms"], 3)
    result["target_ratio"] = 1.1
    result["meets_target"] = result["ratio_act_vs_bare"] <= 1.1
    result["per_head"] = per_head(args, obs)
    print(json.dumps(result, indent=2))
    return result


def per_head(args, obs: dict) -> list[dict]:
    """act_ms and head_ms of every head kind (and step count) on the same trunk and observation."""
    settings = []
    for kind in args.heads:
        steps = args.steps if kind in ("flow", "diffusion") else [None]
        settings += [{"kind": kind} | ({"num_steps": n, "train_timesteps": max(100, n)} if n else {}) for n in steps]
    rows = []
    for head in settings:
        policy, module, _ = demo_policy(args.image_size, args.preset, head)
        for _ in range(3):
            policy.act(obs)
        readouts = torch.randn(1, module.robot_spec.num_readouts, module.model_cfg.trunk.width)
        with torch.no_grad():
            head_ms = _timed(lambda: module.model.action_head.predict(readouts, policy.generator), args.repeats)
        rows.append({"head": head["kind"], "num_steps": head.get("num_steps"),
                     "act_ms": round(_timed(lambda: policy.act(obs), args.repeats), 3), "head_ms": round(head_ms, 3),
                     "head_parameters": sum(p.numel() for p in module.model.action_head.parameters())})
        if head["kind"] == "tokens":  # the key/value cache against the reference decoder, same readouts
            with torch.no_grad():
                ref_ms = _timed(lambda: module.model.action_head._greedy_recompute(readouts), args.repeats)
            rows[-1].update(head_ms_recompute=round(ref_ms, 3), cache_speedup=round(ref_ms / head_ms, 2))
    base = next((r for r in rows if r["head"] == "cvae"), None)
    for r in rows:
        if base is not None:
            r["act_vs_cvae"] = round(r["act_ms"] / base["act_ms"], 3)
    return rows


if __name__ == "__main__":
    main()
