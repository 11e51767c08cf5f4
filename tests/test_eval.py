"""`gr eval` and the finetuning entry point, end to end at a tiny size."""

import json
import os
import sys

import pytest
import torch
import yaml

from gr.data.video_io import open_video
from gr.training.finetune import FinetuneModule
from tests.conftest import REPO, TINY_ROBOT_MODEL, module_init_args

STATS = {"state": {"mean": [0.0] * 4, "std": [0.2] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
         "action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}


@pytest.fixture(scope="module")
def robot_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    module.normalization_stats(STATS)
    path = tmp_path_factory.mktemp("ft") / "robot.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def test_eval_writes_success_json_and_a_video_per_task(robot_ckpt, tmp_path):
    from gr.evaluate import main

    out = tmp_path / "eval"
    report = main(["--checkpoint", robot_ckpt, "--tasks", "coffee-button-v3", "--episodes", "2", "--max-steps", "6",
                   "--workers", "1", "--out", str(out), "--execute-steps", "2"])
    task = report["tasks"]["coffee-button-v3"]
    assert task["num_episodes"] == 2 and 0.0 <= task["success_rate"] <= 1.0
    assert [e["steps"] for e in task["episodes"]] == [6, 6]  # an untrained policy does not succeed in 6 steps
    assert task["success_rate"] == sum(e["success"] for e in task["episodes"]) / 2  # computed, not set
    assert json.load(open(out / "eval.json"))["tasks"]["coffee-button-v3"]["success_rate"] == task["success_rate"]
    vr = open_video(str(out / "coffee-button-v3.mp4"))
    assert len(vr) == 6 and vr[0].shape == (32, 64, 3)  # head | wrist at the model's 32 px
    again = main(["--checkpoint", robot_ckpt, "--tasks", "coffee-button-v3", "--episodes", "2", "--max-steps", "6",
                  "--workers", "1", "--out", str(tmp_path / "again"), "--execute-steps", "2", "--no-video"])
    assert [e["seed"] for e in again["tasks"]["coffee-button-v3"]["episodes"]] == [e["seed"] for e in task["episodes"]]


def test_eval_clear_errors(robot_ckpt, tmp_path, capsys):
    from gr.evaluate import main
    from gr.training.pretrain import PretrainModule

    pre = PretrainModule(**module_init_args())
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, path)
    for args, message in ((["--checkpoint", str(path)], "has no action head"),
                          (["--checkpoint", robot_ckpt, "--tasks", "fly-v3"], "fly-v3"),
                          (["--checkpoint", str(tmp_path / "none.ckpt")], "not found")):
        with pytest.raises(SystemExit):
            main(args + ["--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err


def test_finetune_entry_point_trains_from_a_pretraining_checkpoint(robot_shards, tmp_path):
    import subprocess

    from gr.training.pretrain import PretrainModule

    pre = PretrainModule(**module_init_args())
    pre_path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, pre_path)
    root = tmp_path / "run"
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "default_root_dir": str(root),
                       "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                       "limit_val_batches": 1, "val_check_interval": 3, "check_val_every_n_epoch": None,
                       "num_sanity_val_steps": 0,
                       "callbacks": [{"class_path": "gr.training.callbacks.RolloutVideos",
                                      "init_args": {"num_samples": 2}}]},
           "model": {"class_path": "gr.training.finetune.FinetuneModule",
                     "init_args": {**module_init_args(model=TINY_ROBOT_MODEL), "init_from": str(pre_path)}},
           "data": {"class_path": "gr.data.robot_stream.RobotDataModule",
                    "init_args": {"train_shards": robot_shards["train_shards"], "val_shards": robot_shards["val_shards"],
                                  "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8}}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "finetune.py"), "fit", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "init_from" in proc.stderr and "loaded" in proc.stderr  # the transfer report is logged
    ckpt = torch.load(next((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").exists() else
                      next(root.rglob("*.ckpt")), weights_only=True)
    stats = json.load(open(robot_shards["stats_file"]))
    assert torch.allclose(ckpt["state_dict"]["stats_action"][1], torch.tensor(stats["action"]["std"]))
    assert ckpt["global_step"] == 3
    from PIL import Image

    assert Image.open(root / "rollouts" / "step000003" / "sample01.gif").n_frames == 3  # 2 history steps + future
    # Resuming never re-reads init_from: the pretraining file may have moved; the weights are in the checkpoint.
    last = next(root.rglob("*.ckpt"))
    pre_path.rename(tmp_path / "moved.ckpt")
    cfg["trainer"]["max_steps"] = 5
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"dirpath": str(tmp_path / "resumed"), "every_n_train_steps": 1}}]
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "finetune.py"), "fit", "--config", str(path),
                           "--ckpt_path", str(last)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(tmp_path / "resumed" / "epoch=0-step=5.ckpt", weights_only=True)
    assert resumed["global_step"] == 5
    assert resumed["hyper_parameters"]["init_from"] is None
    assert resumed["hyper_parameters"]["pretrained_from"] == str(pre_path)  # provenance kept


def test_policy_step_executes_chunks_or_ensembles(robot_ckpt, monkeypatch):
    import numpy as np

    from gr.policy import GRPolicy

    obs = {"images": {v: np.zeros((32, 32, 3), np.uint8) for v in ("head", "wrist")},
           "state": np.zeros(4, np.float32), "instruction": "close the drawer"}
    policy = GRPolicy.from_checkpoint(robot_ckpt, execute_steps=2)
    calls = []
    real_act = policy.act
    monkeypatch.setattr(policy, "act", lambda o: calls.append(1) or real_act(o))
    chunk = real_act(obs)
    policy.reset()
    actions = [policy.step(obs) for _ in range(5)]
    assert len(calls) == 3  # a new chunk every 2 steps
    assert np.allclose(actions[0], chunk[0], atol=1e-5) and np.allclose(actions[1], chunk[1], atol=1e-5)
    assert len(policy.history) == 2  # the history kept moving while a chunk was executed

    ens = GRPolicy.from_checkpoint(robot_ckpt, temporal_ensemble=0.5)
    chunks = iter([np.full((4, 4), 0.0, np.float32), np.full((4, 4), 0.5, np.float32)])
    monkeypatch.setattr(ens, "act", lambda o: next(chunks))
    ens.reset()
    ens.step(obs)
    second = ens.step(obs)
    w = np.exp(-0.5 * np.arange(2))
    assert np.allclose(second[:3], (w[0] * 0.0 + w[1] * 0.5) / w.sum())  # oldest prediction weighs most
    assert second[3] in (-1.0, 1.0)  # the gripper stays binary
    with pytest.raises(ValueError, match="execute_steps must be in"):
        GRPolicy.from_checkpoint(robot_ckpt, execute_steps=9)
