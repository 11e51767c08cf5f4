"""`gr rollout`: KV-cache generation beside the ground truth, MP4/GIF grids, metrics, clear errors."""

import json

import numpy as np
import pytest
import torch

from gr.metrics import psnr, ssim
from gr.rollout import imagine, main
from gr.training.finetune import FinetuneModule
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_ROBOT_MODEL, module_init_args


def _save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


@pytest.fixture(scope="module")
def pre_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return _save(PretrainModule(**module_init_args()), tmp_path_factory.mktemp("ro") / "pre.ckpt")


def test_ssim_and_psnr_behave():
    a = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64)) and torch.isinf(psnr(a, a)).all()
    noisy = [(a.float() + torch.randn(a.shape) * s).clamp(0, 255).to(torch.uint8) for s in (5, 20, 60)]
    scores = [float(ssim(n, a).mean()) for n in noisy]
    assert scores[0] > scores[1] > scores[2] > 0  # more noise, less similar
    assert abs(float(psnr(torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4, 3), 255.0))[0])) < 1e-9  # 0 dB at full scale


def test_imagine_cached_equals_recomputed(pre_ckpt):
    from gr.rollout import module_from_checkpoint

    module = module_from_checkpoint(pre_ckpt)
    hist = torch.randint(0, 64, (2, 2, 4, 4))
    a = imagine(module, hist, ["a red circle moves left", "a blue square moves up"], 3)
    b = imagine(module, hist, ["a red circle moves left", "a blue square moves up"], 3, use_cache=False)
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b)


def test_text_video_rollout_files_and_metrics(pre_ckpt, synthetic_shards, tmp_path):
    import av
    from PIL import Image

    out = tmp_path / "ro"
    report = main(["--checkpoint", pre_ckpt, "--source", synthetic_shards["val_shards"], "--num-samples", "2",
                   "--num-frames", "3", "--temperature", "1.0", "--top-k", "8", "--seed", "1", "--out", str(out)])
    assert len(report["samples"]) == 2 and report["kind"] == "text-video"
    with av.open(str(out / "sample00.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (24 + 2 * 32, 2 * 2 * 32, 3)  # header + 1 view; true | pred, x2
    gif = Image.open(out / "sample01.gif")
    assert gif.n_frames == 3 and gif.size == (128, 88)
    saved = json.load(open(out / "metrics.json"))
    for key in ("psnr", "ssim", "psnr_copy_last", "ssim_copy_last", "psnr_copy_last_vq", "ssim_copy_last_vq",
                "psnr_recon", "ssim_recon", "token_acc", "token_acc_copy_last", "token_agree_copy_last"):
        assert len(saved["metrics"][key]) == 3 and len(saved["samples"][1]["metrics"][key]) == 3
    assert saved["metrics"]["reference"] == "raw"
    assert (out / "metrics.png").stat().st_size > 1000
    assert saved["samples"][0]["caption"].startswith("a ")


def test_robot_rollout_and_action_plot(robot_shards, tmp_path):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    stats = json.load(open(robot_shards["stats_file"]))
    module.normalization_stats(stats)
    ckpt = _save(module, tmp_path / "robot.ckpt")
    out = tmp_path / "ro"
    report = main(["--checkpoint", ckpt, "--source", robot_shards["val_shards"], "--num-samples", "2",
                   "--num-frames", "4", "--out", str(out)])
    assert report["kind"] == "robot" and len(report["samples"]) == 2
    assert (out / "sample00_actions.png").stat().st_size > 1000 and np.isfinite(report["samples"][0]["action_l1"])
    from PIL import Image

    assert Image.open(out / "sample00.gif").size == (128, 24 + 2 * 2 * 32)  # two views, one row each
    wrist = main(["--checkpoint", ckpt, "--source", robot_shards["val_shards"], "--views", "wrist",
                  "--num-frames", "2", "--out", str(tmp_path / "w")])
    assert wrist["views"] == ["wrist"]


def test_rollout_clear_errors(pre_ckpt, synthetic_shards, robot_shards, tmp_path, capsys):
    from gr.data.video_io import encode_mp4
    from gr.training.tokenizer import TokenizerModule
    from tests.test_tokenizer import TOKENIZER_ARGS

    short = tmp_path / "short.mp4"
    short.write_bytes(encode_mp4(np.zeros((1, 32, 32, 3), np.uint8), 8.0))
    tok = _save(TokenizerModule(**TOKENIZER_ARGS), tmp_path / "tok.ckpt")
    robot = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    robot.normalization_stats(json.load(open(robot_shards["stats_file"])))
    robot_ckpt = _save(robot, tmp_path / "robot.ckpt")
    cases = [
        (["--checkpoint", tok, "--source", synthetic_shards["val_shards"]], "no frame head"),
        (["--checkpoint", pre_ckpt, "--source", str(short), "--caption", "x"], "fewer than the model's history (2)"),
        (["--checkpoint", robot_ckpt, "--source", robot_shards["val_shards"], "--views", "top"],
         "unknown view 'top'"),
        (["--checkpoint", pre_ckpt, "--source", str(short)], "short.mp4: no caption; pass --caption"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit):
            main(args + ["--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err


def test_training_logs_rollout_videos_to_disk_and_wandb(synthetic_shards, tmp_path):
    import glob
    import os

    import yaml

    from gr.cli import run_lightning_cli
    from tests.conftest import write_config

    root = str(tmp_path / "run")
    cfg_path = write_config(tmp_path / "c.yaml", synthetic_shards, root, max_steps=2, every_n_steps=2,
                            logger={"class_path": "lightning.pytorch.loggers.WandbLogger",
                                    "init_args": {"save_dir": root, "offline": True, "project": "gr-test"}})
    cfg = yaml.safe_load(open(cfg_path))
    cfg["trainer"]["callbacks"].append({"class_path": "gr.training.callbacks.RolloutVideos",
                                        "init_args": {"every_n_val_epochs": 1, "num_samples": 2}})
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    cli = run_lightning_cli(["fit", "--config", cfg_path])
    import wandb

    wandb.finish()
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RolloutVideos")
    assert [w["step"] for w in cb.written] == [2]
    # Raw validation frames: the metrics compare with them, and the headline scalars reach the loggers.
    assert cb.written[0]["metrics"]["reference"] == "raw" and len(cb.written[0]["samples"][0]["metrics"]["psnr"]) == 1
    scalars = cb.written[0]["scalars"]
    for key in ("psnr", "psnr_copy_last", "token_acc", "token_acc_copy_last"):
        logged = cli.trainer.callback_metrics[f"val/rollout_{key}"]
        assert float(logged) == pytest.approx(scalars[f"val/rollout_{key}"])
    gif = os.path.join(root, "rollouts", "step000002", "sample01.gif")
    from PIL import Image

    assert Image.open(gif).n_frames == 3  # two history frames, then the predicted future frame
    assert glob.glob(os.path.join(root, "wandb", "offline-run-*", "files", "media", "videos", "val", "*.gif"))
