"""Video co-training during finetuning (gr/data/cotrain.py, gr/model/video_mode.py)."""

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from gr.config import ConfigError
from gr.data.cotrain import CotrainConfig, is_video_step
from gr.data.robot_stream import RobotDataModule
from gr.training.finetune import FinetuneModule
from tests.conftest import TINY_ROBOT_MODEL, module_init_args


def test_mix_matches_the_weight_and_is_seeded():
    for weight in (0.1, 0.3, 0.5):
        n = sum(is_video_step(0, k, weight) for k in range(1000))
        assert abs(n - 1000 * weight) < 4 * math.sqrt(1000 * weight * (1 - weight)), (weight, n)
    seq = [is_video_step(7, k, 0.3) for k in range(200)]
    assert seq == [is_video_step(7, k, 0.3) for k in range(200)]
    assert seq != [is_video_step(8, k, 0.3) for k in range(200)]
    assert not any(is_video_step(0, k, 0.0) for k in range(100))


@pytest.mark.parametrize("weight", [1.0, -0.1, "half"])
def test_bad_weight_names_the_field(weight):
    with pytest.raises(ConfigError, match="data.cotrain.weight"):
        CotrainConfig(shards="x-{000000..000001}.tar", weight=weight)


def _dm(module, robot_shards, synthetic_shards, **cotrain):
    dm = RobotDataModule(train_shards=robot_shards["train_shards"], batch_size=2, num_workers=0, shuffle_buffer=4,
                         cotrain={"shards": synthetic_shards["train_shards"], "weight": 0.4, "shard_format": "video",
                                  "fps": 8.0, **cotrain})
    dm.trainer = SimpleNamespace(lightning_module=module, training=True)
    dm.setup("fit")
    return dm


def _take(dm, n):
    """n training batches, each marked consumed as Lightning's on_before_batch_transfer does."""
    out = []
    for batch in dm.train_dataloader():
        dm.on_before_batch_transfer(batch, 0)
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_loader_mixes_by_the_sequence_and_resumes_it(robot_shards, synthetic_shards):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    full = _take(_dm(module, robot_shards, synthetic_shards), 12)
    kinds = ["video" if "caption" in b else "robot" for b in full]
    assert kinds == ["video" if is_video_step(0, k, 0.4) else "robot" for k in range(12)]
    assert 0 < kinds.count("video") < 12
    assert all(b["view"] == 0 for b in full if "caption" in b)  # the first view: "head"
    first = _dm(module, robot_shards, synthetic_shards)
    _take(first, 5)
    state = first.train_dataloader().state_dict()
    assert state["consumed"] == 5 and sum(state["counts"].values()) == 5
    resumed = _dm(module, robot_shards, synthetic_shards)
    resumed.train_dataloader().load_state_dict(state)
    rest = _take(resumed, 7)
    assert [b["key"] for b in rest] == [b["key"] for b in full[5:]]  # the same batches, in the same order
    with pytest.raises(ConfigError, match="data.cotrain.view: 'top'"):
        _dm(module, robot_shards, synthetic_shards, view="top").train_dataloader()


def test_video_batches_train_only_the_frame_loss(robot_shards, synthetic_shards):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    batches = _take(_dm(module, robot_shards, synthetic_shards, view="wrist"), 8)
    video = next(b for b in batches if "caption" in b)
    robot = next(b for b in batches if "caption" not in b)
    assert video["view"] == 1
    module.train()
    loss = module.training_step(video, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in module.model.named_parameters()}
    assert grads["trunk.blocks.0.attn.qkv.weight"] is not None and grads["frame_head.weight"] is not None
    assert grads["view_emb.weight"][1].abs().sum() > 0 and grads["view_emb.weight"][0].abs().sum() == 0
    assert all(g is None for n, g in grads.items() if n.startswith(("action_head.", "state_proj.", "readout_emb.")))
    module.zero_grad()
    assert torch.isfinite(module.training_step(robot, 1))  # robot batches: the usual losses


class _Batches(pl.Callback):
    """What each training step got: its kind and sample keys."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("video" if "caption" in batch else "robot", tuple(batch["key"])))


def _fit(robot_shards, synthetic_shards, root, max_steps, ckpt_path=None, every=None):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    dm = RobotDataModule(train_shards=robot_shards["train_shards"], batch_size=2, num_workers=0, shuffle_buffer=4,
                         cotrain={"shards": synthetic_shards["train_shards"], "weight": 0.4, "shard_format": "video",
                                  "fps": 8.0})
    seen = _Batches()
    cbs = [seen] + ([pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1,
                                                  filename="s{step}", auto_insert_metric_name=False)] if every else [])
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=cbs, limit_val_batches=0, enable_checkpointing=bool(every),
                         default_root_dir=str(root))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return seen.seen, trainer


def test_lightning_resume_continues_the_mixed_sequence(robot_shards, synthetic_shards, tmp_path):
    """A finetune stopped mid-epoch at step 4 and resumed from its checkpoint trains on the same mixed batches, in
    the same order, as the uninterrupted run (the CotrainLoader's state rides in Lightning's checkpoint)."""
    full, _ = _fit(robot_shards, synthetic_shards, tmp_path / "full", 9)
    kinds = [k for k, _ in full]
    assert kinds == ["video" if is_video_step(0, k, 0.4) else "robot" for k in range(9)]
    assert "video" in kinds[4:] and "robot" in kinds[4:]
    first, _ = _fit(robot_shards, synthetic_shards, tmp_path / "a", 4, every=4)
    assert first == full[:4]
    ckpt = tmp_path / "a" / "s4.ckpt"
    resumed, trainer = _fit(robot_shards, synthetic_shards, tmp_path / "b", 9, ckpt_path=str(ckpt))
    assert resumed == full[4:]
    assert trainer.datamodule.train_dataloader().counts == {"robot": kinds.count("robot"),
                                                            "video": kinds.count("video")}
