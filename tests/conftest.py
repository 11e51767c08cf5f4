"""Shared tiny fixtures: 32 px synthetic shards, tiny model/encoder configs, a YAML writer for CLI runs."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_TOKENIZER = dict(codebook_size=64, embed_dim=32, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1,
                      z_channels=32, resolution=32)  # 32 px -> 4x4 codes
TINY_MODEL = dict(trunk=dict(num_layers=2, num_heads=2, width=32), max_text_tokens=8,
                  clip=dict(num_history=2, future_frame_offset=1, fps=8.0, image_size=32))


def _initial_torch_threads() -> int:
    import torch

    return torch.get_num_threads()


_TORCH_THREADS = _initial_torch_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process closed-loop evaluation (`gr.evaluate` with one worker) sets torch to 1 thread, as its worker
    processes do, also from module-scoped fixtures; without restoring it, later tests ran on another thread count and
    so with other float rounding (tests/test_finetune.py's overfit test missed its bound)."""
    import torch

    yield
    torch.set_num_threads(_TORCH_THREADS)


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A WandbLogger run left open by one test would be reused by the next test's WandbLogger (Lightning attaches
    to `wandb.run` when one exists), so its media would land in the earlier test's folder."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """48 train + 16 val clips at 32 px, 8 clips per shard. Returns make_synthetic_video's summary dict."""
    from data_prep.make_synthetic_video import main

    out = tmp_path_factory.mktemp("synthetic")
    return main(["--out", str(out), "--num-train", "48", "--num-val", "16", "--size", "32", "--num-frames", "8",
                 "--per-shard", "8"])


def module_init_args(**overrides) -> dict:
    args = {"model": TINY_MODEL, "text_encoder": {"model_name": "ViT-S-32-alt"},
            "image_tokenizer": TINY_TOKENIZER, "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": 40}}
    args.update(overrides)
    return args


def write_config(path, shards: dict, root: str, max_steps: int = 10, every_n_steps: int = 5, num_workers: int = 0,
                 logger=False, val: bool = True, optim: dict | None = None) -> str:
    """A tiny fit config for the LightningCLI (same structure as configs/demo/pretrain.yaml)."""
    init = module_init_args()
    if optim:
        init["optim"] = optim
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "default_root_dir": root,
                    "logger": logger, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 2 if val else 0, "val_check_interval": max_steps,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": os.path.join(root, "checkpoints"), "filename": "step{step:06d}",
                                       "auto_insert_metric_name": False, "every_n_train_steps": every_n_steps,
                                       "save_top_k": -1, "save_last": True}},
                        {"class_path": "gr.training.callbacks.RunSummary"}]},
        "model": {"class_path": "gr.training.pretrain.PretrainModule", "init_args": init},
        "data": {"class_path": "gr.data.datamodule.VideoDataModule",
                 "init_args": {"train_shards": shards["train_shards"],
                               "val_shards": shards["val_shards"] if val else None,
                               "batch_size": 4, "num_workers": num_workers, "shuffle_buffer": 16}},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


ROBOT = dict(view_names=["head", "wrist"], state_dim=4, action_dim=4, action_chunk=4, num_readouts=2,
             head=dict(width=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, latent_dim=8, dropout=0.0))
TINY_ROBOT_MODEL = {**TINY_MODEL, "robot": ROBOT}


def robot_episode(rng, num_steps: int = 12, size: int = 32):
    """A synthetic two-view episode: a square moves with the (smooth) actions; the gripper closes half way."""
    import numpy as np

    from gr.data.robot import Episode

    t = np.arange(num_steps)[:, None]
    phase, freq = rng.uniform(0, 2 * np.pi, (1, 3)), rng.uniform(0.2, 0.5, (1, 3))
    action = np.concatenate([0.5 * np.sin(freq * t + phase), np.where(t < num_steps // 2, -1.0, 1.0)], 1)
    pos = np.cumsum(action[:, :3], 0) + rng.uniform(-1, 1, 3)
    state = np.concatenate([pos, (action[:, 3:] > 0).astype(float)], 1).astype(np.float32)
    frames = {}
    for v, view in enumerate(("head", "wrist")):
        f = np.full((num_steps, size, size, 3), 30 + 100 * v, np.uint8)
        for t in range(num_steps):
            x = int(np.clip(size / 2 + 3 * pos[t, v], 2, size - 10))
            f[t, 8:16, x:x + 8] = (250, 200, 40)
        frames[view] = f
    return Episode(frames=frames, state=state, action=action.astype(np.float32), instruction="move the block", fps=10.0)


@pytest.fixture(scope="session")
def robot_shards(tmp_path_factory):
    """6 train + 2 val synthetic two-view episodes in the robot shard format."""
    import numpy as np

    from gr.data.robot import EpisodeShardWriter

    out = tmp_path_factory.mktemp("robot")
    rng = np.random.default_rng(0)
    paths = {}
    for prefix, count in (("train", 6), ("val", 2)):
        with EpisodeShardWriter(str(out), prefix, max_per_shard=3, source="synthetic") as w:
            for i in range(count):
                w.write(f"{prefix}{i:04d}", robot_episode(rng))
        paths[f"{prefix}_shards"] = w.pattern
    paths["stats_file"] = str(out / "train-stats.json")
    return paths
