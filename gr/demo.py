"""`make demo`: the embedded end-to-end run on data made on this machine.

Stages (wall time of each goes in the summary):
1. synthetic text-video shards (data_prep/make_synthetic_video.py);
2. a tiny VQGAN trained on their frames (configs/demo/tokenizer.yaml, `gr tokenizer fit`), with reconstruction PSNR
   on held-out frames against the same architecture with random weights;
3. pre-tokenized shards made with it (data_prep/tokenize_shards.py);
4. tiny pretraining run on those (configs/demo/pretrain.yaml) through the same LightningCLI as `lightning fit`;
5. Meta-World scripted demos (data_prep/metaworld_demos.py), pre-tokenized with the same VQGAN;
6. robot finetuning from the pretrained checkpoint (configs/demo/finetune.yaml);
7. closed-loop evaluation in Meta-World (`gr eval`): per-task success rates;
8. rollouts of both models beside the ground truth (`gr rollout`): MP4/GIF, PSNR/SSIM against copy-last-frame.
Writes `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # data_prep/ lives beside the package

NUM_TRAIN_CLIPS = 1024
NUM_FRAMES = 10  # frames per clip: pre-tokenizing every frame is the demo's one-off encoder cost
EVAL_EXECUTE_STEPS = 4  # actions executed from each predicted chunk (of 8) before predicting again
ROLLOUT_FRAMES = 4  # imagined frames per held-out clip (the synthetic clips have 10)


def make_data(out: str, num_train: int, num_val: int, num_frames: int) -> dict:
    from data_prep.make_synthetic_video import main as make_synthetic

    return make_synthetic(["--out", out, "--num-train", str(num_train), "--num-val", str(num_val),
                           "--num-frames", str(num_frames), "--per-shard", "64"])


def _derived_config(name: str, root: str, max_steps: Optional[int]) -> dict:
    """configs/demo/<name>.yaml pointed at this run's output folder (data paths are set by the caller)."""
    import yaml

    with open(os.path.join(REPO, f"configs/demo/{name}.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["default_root_dir"] = root
    if max_steps is not None:
        cfg["trainer"]["max_steps"] = max_steps
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = root
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = os.path.join(root, "checkpoints")
        if cb["class_path"].endswith("ExportTamingVQGAN"):
            cb["init_args"]["dirpath"] = os.path.join(root, "export")
    return cfg


def _run_config(cfg: dict, root: str, name: str):
    """Keep the resolved config beside the run and fit it through the LightningCLI."""
    import yaml

    from gr.cli import run_lightning_cli

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"demo_{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cli = run_lightning_cli(["fit", "--config", path])
    import wandb

    if wandb.run is not None:  # else the next stage's WandbLogger would reuse (and log into) this stage's run
        wandb.finish()
    return cli


def held_out_frames(val_shards: str, image_size: int, count: int):
    """The first `count` frames (2 per clip) of the validation clips: never seen by the tokenizer."""
    import torch

    from gr.data.frames import FrameStream
    from gr.data.shards import expand_urls

    stream = FrameStream([(expand_urls(val_shards, "val_shards"), 1.0, None, "val")], image_size,
                         frames_per_video=2, endless=False, shuffle_buffer=1, max_frames=count, seed=123)
    return torch.stack([f["frame"] for f in stream])


def reconstruction_psnr(vq, frames) -> float:
    from gr.metrics import psnr

    return round(float(psnr(vq.decode(vq.encode(frames)), frames).mean()), 3)


def train_tokenizer(out: str, data: dict, max_steps: Optional[int]) -> dict:
    from gr.config import ImageTokenizerConfig
    from gr.encoders import FrozenVQGAN

    root = os.path.join(out, "tokenizer")
    cfg = _derived_config("tokenizer", root, max_steps)
    cfg["data"]["init_args"]["train_sources"] = [{"shards": data["train_shards"]}]
    cfg["data"]["init_args"]["val_sources"] = [{"shards": data["val_shards"]}]
    cli = _run_config(cfg, root, "tokenizer")
    export = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ExportTamingVQGAN")
    ckpt, yml = export.last_paths
    with open(os.path.join(root, "summary", "summary.json")) as f:
        summary = json.load(f)
    tok_args = cfg["model"]["init_args"]["tokenizer"]
    frames = held_out_frames(data["val_shards"], cfg["model"]["init_args"]["image_size"], 256)
    trained = FrozenVQGAN.from_taming(ckpt, yml)
    random_vq = FrozenVQGAN(ImageTokenizerConfig(**{**tok_args, "random_init_seed": 0}))
    summary.update(checkpoint=ckpt, yaml=yml, codebook_size=trained.codebook_size,
                   held_out_frames=int(frames.shape[0]), psnr_trained_db=reconstruction_psnr(trained, frames),
                   psnr_random_init_db=reconstruction_psnr(random_vq, frames))
    summary["psnr_gain_db"] = round(summary["psnr_trained_db"] - summary["psnr_random_init_db"], 3)
    return summary


def pretokenize(out: str, data: dict, tok: dict, image_size: int) -> dict:
    from data_prep.tokenize_shards import run as tokenize

    dest = os.path.join(out, "data_tokens")
    train = tokenize([data["train_shards"]], dest, tok["checkpoint"], tok["yaml"], image_size=image_size)
    val = tokenize([data["val_shards"]], dest, tok["checkpoint"], tok["yaml"], image_size=image_size)
    return {"train_shards": train["pattern"], "val_shards": val["pattern"], "frames": train["frames"] + val["frames"],
            "skipped": len(train["skipped"]) + len(val["skipped"])}


def pretrain(out: str, tokens: dict, tok: dict, max_steps: Optional[int]) -> dict:
    root = os.path.join(out, "pretrain")
    cfg = _derived_config("pretrain", root, max_steps)
    cfg["data"]["init_args"].update(train_shards=tokens["train_shards"], val_shards=tokens["val_shards"],
                                    shard_format="tokens")
    cfg["model"]["init_args"]["image_tokenizer"].update(checkpoint=tok["checkpoint"], yaml=tok["yaml"],
                                                        codebook_size=tok["codebook_size"])
    cli = _run_config(cfg, root, "pretrain")
    with open(os.path.join(root, "summary", "summary.json")) as f:
        summary = json.load(f)
    summary["codebook_size"] = cli.model.image_tokenizer.codebook_size
    summary["chance_token_acc"] = 1.0 / summary["codebook_size"]
    summary["trainable_params"] = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    return summary


def robot_demos(out: str, num_demos: int, num_val: int, tasks: Optional[list[str]]) -> dict:
    from data_prep.metaworld_demos import main as make_demos

    args = ["--out", os.path.join(out, "data_robot"), "--num-demos", str(num_demos), "--num-val", str(num_val),
            "--image-size", "64", "--workers", str(min(2, os.cpu_count() or 1))]
    return make_demos(args + (["--tasks", *tasks] if tasks else []))


def finetune(out: str, robot_tokens: dict, tok: dict, pretrained: str, max_steps: Optional[int]) -> dict:
    root = os.path.join(out, "finetune")
    cfg = _derived_config("finetune", root, max_steps)
    cfg["data"]["init_args"].update(train_shards=robot_tokens["train_shards"], val_shards=robot_tokens["val_shards"],
                                    shard_format="tokens")
    init = cfg["model"]["init_args"]
    init["init_from"] = pretrained
    init["image_tokenizer"].update(checkpoint=tok["checkpoint"], yaml=tok["yaml"], codebook_size=tok["codebook_size"])
    cli = _run_config(cfg, root, "finetune")
    with open(os.path.join(root, "summary", "summary.json")) as f:
        summary = json.load(f)
    report = cli.model.init_report
    summary["transfer"] = {"loaded": len(report["loaded"]), "new": len(report["new"]),
                           "dropped": len(report["dropped"])}
    return summary


def closed_loop(out: str, checkpoint: str, tasks: list[str], episodes: int) -> dict:
    from gr.evaluate import evaluate

    report = evaluate(checkpoint, tasks, episodes=episodes, seed=0, workers=min(2, os.cpu_count() or 1),
                      out=os.path.join(out, "eval"), execute_steps=EVAL_EXECUTE_STEPS)
    return {"per_task_success_rate": {t: r["success_rate"] for t, r in report["tasks"].items()},
            "mean_steps_to_success": {t: r["mean_steps_to_success"] for t, r in report["tasks"].items()},
            "episodes_per_task": episodes, "execute_steps": EVAL_EXECUTE_STEPS, "videos": {t: r.get("video") for t, r in report["tasks"].items()},
            "report": os.path.join(out, "eval", "eval.json")}


def rollouts(out: str, pretrained: str, val_shards: str, finetuned: Optional[str], robot_val: Optional[str]) -> dict:
    """Rollouts of the pretrained text-video model (imagined frames vs held-out clips) and of the finetuned robot model
    (one-step predictions along held-out episodes)."""
    from gr.rollout import module_from_checkpoint, rollout_robot, rollout_text_video

    result = {}
    video = rollout_text_video(module_from_checkpoint(pretrained), val_shards, os.path.join(out, "rollout_video"),
                               num_samples=8, num_frames=ROLLOUT_FRAMES)
    m = video["metrics"]
    result["text_video"] = {"metrics": m, "metrics_json": os.path.join(out, "rollout_video", "metrics.json"),
                            "videos": [s["mp4"] for s in video["samples"]], "gifs": [s["gif"] for s in video["samples"]],
                            "mean_psnr_first4": round(float(sum(m["psnr"][:4]) / 4), 3),
                            "mean_psnr_first4_copy_last": round(float(sum(m["psnr_copy_last"][:4]) / 4), 3)}
    if finetuned and robot_val:
        robot = rollout_robot(module_from_checkpoint(finetuned), robot_val, os.path.join(out, "rollout_robot"),
                              num_samples=2, num_frames=ROLLOUT_FRAMES)
        result["robot"] = {"metrics": robot["metrics"], "videos": [s["mp4"] for s in robot["samples"]],
                           "action_plots": [s["actions_plot"] for s in robot["samples"]],
                           "metrics_json": os.path.join(out, "rollout_robot", "metrics.json")}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--num-train", type=int, default=NUM_TRAIN_CLIPS)
    p.add_argument("--num-val", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=NUM_FRAMES, help="frames per synthetic clip")
    p.add_argument("--tokenizer-steps", type=int, default=None, help="default: configs/demo/tokenizer.yaml")
    p.add_argument("--max-steps", type=int, default=None, help="pretraining steps; default: configs/demo/pretrain.yaml")
    p.add_argument("--robot-demos", type=int, default=20, help="Meta-World demos per task")
    p.add_argument("--robot-tasks", nargs="+", default=None, help="default: gr.envs.DEFAULT_TASKS")
    p.add_argument("--finetune-steps", type=int, default=None, help="default: configs/demo/finetune.yaml")
    p.add_argument("--eval-episodes", type=int, default=10, help="seeded closed-loop episodes per task")
    p.add_argument("--skip-robot", action="store_true", help="stop after pretraining")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"stages": {}}
    t0 = time.time()
    data = make_data(os.path.join(args.out, "data"), args.num_train, args.num_val, args.num_frames)
    summary["stages"]["synthetic_data"] = {"seconds": round(time.time() - t0, 1), "num_train_clips": data["num_train"],
                                           "num_val_clips": data["num_val"], "frames_per_clip": args.num_frames}
    t1 = time.time()
    tok = train_tokenizer(args.out, data, args.tokenizer_steps)
    tok["seconds"] = round(time.time() - t1, 1)
    summary["stages"]["tokenizer"] = tok
    t1 = time.time()
    image_size = int(_derived_config("pretrain", "", None)["model"]["init_args"]["model"]["clip"]["image_size"])
    tokens = pretokenize(args.out, data, tok, image_size)
    tokens["seconds"] = round(time.time() - t1, 1)
    summary["stages"]["pretokenize"] = tokens
    t1 = time.time()
    pre = pretrain(args.out, tokens, tok, args.max_steps)
    pre["seconds"] = round(time.time() - t1, 1)
    first, last = pre["first_train_loss"], pre["last_train_loss"]
    pre["train_loss_drop"] = round(1.0 - last / first, 4) if first else None
    summary["stages"]["pretrain"] = pre
    summary["num_clips"] = data["num_train"] + data["num_val"]
    # Acceptance checks of the foundation issue, computed from the measured values (never forced).
    summary["checks"] = {"train_loss_drop_ge_30pct": bool(pre["train_loss_drop"] and pre["train_loss_drop"] >= 0.30),
                         "val_token_acc_over_10x_chance": pre.get("val/token_acc", 0.0) > 10 * pre["chance_token_acc"],
                         "tokenizer_psnr_gain_ge_6db": tok["psnr_gain_db"] >= 6.0}
    summary["checkpoint"] = pre["last_checkpoint"]
    if not args.skip_robot:
        robot_stages(args, summary, tok, pre["last_checkpoint"], image_size)
    t1 = time.time()
    ro = rollouts(args.out, pre["last_checkpoint"], data["val_shards"], summary.get("finetuned_checkpoint"),
                  summary.get("robot_val_shards"))
    ro["seconds"] = round(time.time() - t1, 1)
    summary["stages"]["rollouts"] = ro
    tv = ro["text_video"]
    summary["checks"]["pretrained_beats_copy_last_psnr_first4"] = tv["mean_psnr_first4"] > tv["mean_psnr_first4_copy_last"]
    summary["total_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


def robot_stages(args, summary: dict, tok: dict, pretrained: str, image_size: int) -> None:
    """Meta-World demos -> pre-tokenized robot shards -> finetuning from the pretrained model -> closed loop."""
    from data_prep.tokenize_shards import run as tokenize

    t1 = time.time()
    demos = robot_demos(args.out, args.robot_demos, max(1, args.robot_demos // 10), args.robot_tasks)
    summary["stages"]["robot_demos"] = {**{k: demos[k] for k in ("tasks", "num_train", "num_val", "attempts",
                                                                  "failures")}, "seconds": round(time.time() - t1, 1)}
    t1 = time.time()
    dest = os.path.join(args.out, "data_robot_tokens")
    train = tokenize([demos["train_shards"]], dest, tok["checkpoint"], tok["yaml"], image_size=image_size)
    val = tokenize([demos["val_shards"]], dest, tok["checkpoint"], tok["yaml"], image_size=image_size)
    robot_tokens = {"train_shards": train["pattern"], "val_shards": val["pattern"]}
    summary["stages"]["robot_pretokenize"] = {"frames": train["frames"] + val["frames"],
                                              "seconds": round(time.time() - t1, 1)}
    t1 = time.time()
    ft = finetune(args.out, robot_tokens, tok, pretrained, args.finetune_steps)
    ft["seconds"] = round(time.time() - t1, 1)
    summary["stages"]["finetune"] = ft
    t1 = time.time()
    ev = closed_loop(args.out, ft["last_checkpoint"], list(demos["tasks"]), args.eval_episodes)
    ev["seconds"] = round(time.time() - t1, 1)
    summary["stages"]["closed_loop_eval"] = ev
    rates = list(ev["per_task_success_rate"].values())
    summary["checks"]["two_tasks_at_least_50pct_success"] = sum(r >= 0.5 for r in rates) >= 2
    summary["finetuned_checkpoint"] = ft["last_checkpoint"]
    summary["robot_val_shards"] = demos["val_shards"]


if __name__ == "__main__":
    main()
