"""What it takes for the demo's VQGAN to reconstruct robot frames at >= 25 dB at 64 px: grid, codebook, width, steps.

Trains `configs/demo/tokenizer.yaml` variants on `make demo`'s data (synthetic captioned clips + action-free robot-scene
video, the same weights) and measures reconstruction PSNR on the demo's held-out robot episodes, per view, and on
held-out synthetic frames, exactly as `make demo` reports them (gr/demo.py). Writes `<out>/sweep.json` after every
arm, and skips arms already in it, so a stopped sweep resumes where it was.

    python bench/tokenizer_sweep.py --out outputs/tokenizer_sweep                          # every arm
    python bench/tokenizer_sweep.py --out outputs/tokenizer_sweep --arms f4_1024_700 f8_1024_1400

Arms are `f<downsampling>_<codes>_<steps>` (+ `_wide`: z_channels 128, embed_dim 64). f8 is the demo's 8x8 grid,
f4 a 16x16 grid: four times the tokens per frame in every GPT sequence downstream.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Keys other than DATA_KEYS override `model.init_args.tokenizer`; DATA_KEYS set the batch, the robot-video weight of
# the training mix (make demo's YAML: synthetic 1.0, robot video 2.0), the pixel loss and the steps. Every arm names
# its batch so that it keeps its meaning when configs/demo/tokenizer.yaml changes.
DATA_KEYS = ("steps", "batch_size", "robot_weight", "pixel_loss")
F8 = {"ch_mult": [1, 2, 2, 4], "codebook_size": 1024}
ARMS = {
    "f8_1024_700": {**F8, "steps": 700, "batch_size": 16},  # the demo's tokenizer until 2026-12-07
    "f8_1024_1400": {**F8, "steps": 1400, "batch_size": 16},
    "f8_1024_2800": {**F8, "steps": 2800, "batch_size": 16},
    "f8_1024_700_wide": {**F8, "steps": 700, "batch_size": 16, "z_channels": 128, "embed_dim": 64},
    "f4_1024_700": {"ch_mult": [1, 2, 4], "codebook_size": 1024, "steps": 700, "batch_size": 16},
    # equal compute (steps x batch) at 400 x 16: smaller batches, more steps
    "f8_1024_400": {**F8, "steps": 400, "batch_size": 16},
    "f8_1024_400_embed8": {**F8, "steps": 400, "batch_size": 16, "embed_dim": 8},
    "f8_1024_800_b8": {**F8, "steps": 800, "batch_size": 8},
    "f8_1024_800_b8_l2": {**F8, "steps": 800, "batch_size": 8, "pixel_loss": "l2"},
    "f8_1024_800_b8_robot5": {**F8, "steps": 800, "batch_size": 8, "robot_weight": 5.0},
    "f8_1024_1600_b4": {**F8, "steps": 1600, "batch_size": 4},
    # batch 4, robot video weighted 5; 4500 steps is make demo's tokenizer from 2026-12-07
    "f8_1024_3000_b4_robot5": {**F8, "steps": 3000, "batch_size": 4, "robot_weight": 5.0},
    "f8_1024_4500_b4_robot5": {**F8, "steps": 4500, "batch_size": 4, "robot_weight": 5.0},
}


def data(out: str) -> dict:
    """make demo's corpora (made once, reused by every arm)."""
    from gr.demo import VIDEO_EPISODES_PER_TASK, VIDEO_TASKS, make_data, make_robot_video, robot_demos
    from gr.envs import DEFAULT_TASKS

    path = os.path.join(out, "data.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    found = {"synthetic": make_data(os.path.join(out, "data"), 1024, 128, 10),
             "video": make_robot_video(os.path.join(out, "data_video_robot"), list(VIDEO_TASKS),
                                       VIDEO_EPISODES_PER_TASK),
             "demos": robot_demos(out, 20, 2, list(DEFAULT_TASKS))}
    with open(path, "w") as f:
        json.dump(found, f, indent=2)
    return found


def run_arm(name: str, spec: dict, out: str, corpora: dict) -> dict:
    from gr.demo import _derived_config, _run_config, held_out_frames, reconstruction_psnr, robot_frame_psnr
    from gr.encoders import FrozenVQGAN

    root = os.path.join(out, name)
    cfg = _derived_config("tokenizer", root, spec["steps"])
    cfg["trainer"]["val_check_interval"] = spec["steps"]
    tok = cfg["model"]["init_args"]["tokenizer"]
    tok.update({k: v for k, v in spec.items() if k not in DATA_KEYS})
    cfg["data"]["init_args"]["batch_size"] = spec["batch_size"]
    cfg["model"]["init_args"]["loss"]["pixel_loss"] = spec.get("pixel_loss", "l1")
    sources = cfg["data"]["init_args"]["train_sources"]
    sources[1]["weight"] = spec.get("robot_weight", 2.0)
    for src, shards in zip(sources, (corpora["synthetic"]["train_shards"], corpora["video"]["train_shards"])):
        src["shards"] = shards
    cfg["data"]["init_args"]["val_sources"] = [{"shards": corpora["demos"]["val_shards"]}]
    t0 = time.time()
    cli = _run_config(cfg, root, "tokenizer")
    seconds = time.time() - t0
    export = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ExportTamingVQGAN")
    vq = FrozenVQGAN.from_taming(*export.last_paths)
    size = cfg["model"]["init_args"]["image_size"]
    return {"spec": spec, "grid": vq.grid_size(size), "train_seconds": round(seconds, 1),
            "psnr_video_db": reconstruction_psnr(vq, held_out_frames(corpora["synthetic"]["val_shards"], size, 256)),
            **robot_frame_psnr(vq, corpora["demos"]["val_shards"], size, ["head", "wrist"], "psnr_robot")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/tokenizer_sweep")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    corpora = data(args.out)
    path = os.path.join(args.out, "sweep.json")
    result = {"benchmark": "tokenizer_sweep", "command": " ".join(["python", "bench/tokenizer_sweep.py", *sys.argv[1:]]),
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip(),
              "machine": {"cpu_count": os.cpu_count()}, "target_db": 25.0, "arms": {}}
    if os.path.isfile(path):
        with open(path) as f:
            result["arms"] = json.load(f).get("arms", {})
    for name in args.arms:
        if name in result["arms"]:
            continue
        arm = run_arm(name, ARMS[name], args.out, corpora)
        arm["meets_target"] = min(arm["psnr_robot_head_db"], arm["psnr_robot_wrist_db"]) >= result["target_db"]
        result["arms"][name] = arm
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
        print(json.dumps({name: arm}), flush=True)
    return result


if __name__ == "__main__":
    main()
