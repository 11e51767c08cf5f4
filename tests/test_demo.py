"""`make demo` end to end at a tiny size: every stage runs and reports measured values in summary.json."""

import json
import math
import os

import torch


def test_demo_stages_run_and_report(tmp_path):
    from gr.demo import main

    out = tmp_path / "demo"
    summary = main(["--out", str(out), "--num-train", "64", "--num-val", "16", "--num-frames", "6",
                    "--tokenizer-steps", "3", "--max-steps", "3", "--robot-demos", "2",
                    "--robot-tasks", "coffee-button-v3", "--finetune-steps", "2", "--eval-episodes", "1",
                    "--video-tasks", "coffee-button-v3", "reach-v3", "--video-episodes", "1"])
    assert json.load(open(out / "summary.json")) == summary
    assert list(summary["stages"]) == ["synthetic_data", "robot_video", "robot_demos", "tokenizer", "pretokenize",
                                       "pretokenize_robot_video", "pretrain", "robot_pretokenize", "finetune",
                                       "closed_loop_eval", "rollouts"]
    assert summary["pretrain_includes_target_tasks"] == ["coffee-button-v3"]
    assert all(stage["seconds"] > 0 for stage in summary["stages"].values())
    assert summary["checks"]["demo_within_30_min"] == (summary["total_seconds"] <= 1800)
    tok = summary["stages"]["tokenizer"]
    assert tok["held_out_frames"] == 32 and tok["global_step"] == 3
    for key in ("psnr_trained_db", "psnr_random_init_db", "psnr_robot_head_db", "psnr_robot_wrist_db"):
        assert math.isfinite(tok[key]) and 0 < tok[key] < 60
    assert tok["psnr_gain_db"] == round(tok["psnr_trained_db"] - tok["psnr_random_init_db"], 3)
    assert summary["checks"]["tokenizer_psnr_gain_ge_6db"] == (tok["psnr_gain_db"] >= 6.0)  # measured, not forced
    pre = summary["stages"]["pretokenize"]
    assert pre["frames"] == (64 + 16) * 6 and pre["skipped"] == 0
    assert summary["stages"]["pretrain"]["global_step"] == 3 and summary["stages"]["pretrain"]["codebook_size"] == 1024
    assert len(summary["stages"]["pretrain"]["train_sources"]) == 2  # synthetic clips + robot-scene video
    hp = torch.load(summary["checkpoint"], weights_only=True)["hyper_parameters"]
    assert hp["image_tokenizer"]["checkpoint"] == tok["checkpoint"] and os.path.isfile(tok["checkpoint"])
    ft = summary["stages"]["finetune"]
    assert ft["global_step"] == 2 and ft["transfer"]["dropped"] == 0 and ft["transfer"]["loaded"] > 0
    ev = summary["stages"]["closed_loop_eval"]
    rate = ev["per_task_success_rate"]["coffee-button-v3"]
    report = json.load(open(ev["report"]))
    assert rate == report["tasks"]["coffee-button-v3"]["success_rate"] in (0.0, 1.0)  # measured over 1 episode
    assert summary["checks"]["two_tasks_at_least_50pct_success"] is False  # one task cannot make two
    assert os.path.isfile(ev["videos"]["coffee-button-v3"])
    ro = summary["stages"]["rollouts"]
    tv = ro["video"]
    assert len(tv["metrics"]["psnr"]) == 4 and all(os.path.isfile(p) for p in tv["videos"] + tv["gifs"])
    assert summary["checks"]["pretrained_beats_copy_last_psnr_first4"] == (
        tv["mean_psnr_first4"] > tv["mean_psnr_copy_last_first4"])
    views = ro["robot"]["per_view_mean"]
    assert sorted(views) == ["head", "wrist"]
    assert summary["checks"]["finetuned_beats_copy_last_psnr_every_view"] == all(
        v["psnr"] > v["psnr_copy_last"] for v in views.values())
    assert summary["checks"]["finetuned_expected_frame_beats_copy_last_psnr_every_view"] == all(
        v["psnr_expected"] > v["psnr_copy_last"] for v in views.values())
    assert os.path.isfile(ro["robot"]["action_plots"][0]) and len(ro["robot"]["metrics"]["ssim"]) >= 1
    page = open(summary["report"]).read()  # make demo's gr report: every stage's curves, the rollouts, the eval
    assert summary["report"] == str(out / "report.html") and "<h2>Checks</h2>" in page
    assert page.count("<h3>") >= 3 + 2 + 1 and "coffee-button-v3" in page and "data:video/mp4;base64," in page

    # A second corpus tokenized with the first run's VQGAN (what `make experiment-ood` does), here the synthetic
    # clips alone (`make experiment-synthetic`): nothing is trained for the tokenizer, its held-out PSNR is measured
    # again, the pretraining has one source and names the same tokenizer files.
    export = os.path.dirname(tok["checkpoint"])
    again = main(["--out", str(tmp_path / "ood"), "--num-train", "64", "--num-val", "16", "--num-frames", "6",
                  "--max-steps", "2", "--robot-demos", "2", "--robot-tasks", "coffee-button-v3", "--skip-robot",
                  "--video-tasks", "none", "--tokenizer", export])  # the synthetic clips alone
    reused = again["stages"]["tokenizer"]
    assert reused["reused_from"] == export and reused["checkpoint"] == tok["checkpoint"]
    # Measured on this run's held-out frames (which frames are drawn depends on the shard paths) with the same VQGAN.
    from gr.demo import robot_frame_psnr
    from gr.encoders import FrozenVQGAN

    vq = FrozenVQGAN.from_taming(tok["checkpoint"], tok["yaml"])
    assert robot_frame_psnr(vq, again["stages"]["robot_demos"]["val_shards"], 64, ["head", "wrist"], "psnr_robot") == {
        k: reused[k] for k in ("psnr_robot_head_db", "psnr_robot_wrist_db")}
    assert not (tmp_path / "ood" / "tokenizer").exists() and "tokenizer_psnr_gain_ge_6db" not in again["checks"]
    assert again["pretrain_includes_target_tasks"] == [] and "robot_video" not in again["stages"]
    assert [src["weight"] for src in again["stages"]["pretrain"]["train_sources"]] == [1.0]
    assert "robot_video" not in again["stages"]["rollouts"] and again["num_clips"] == 64 + 16
    hp = torch.load(again["checkpoint"], weights_only=True)["hyper_parameters"]
    assert hp["image_tokenizer"]["checkpoint"] == tok["checkpoint"]
