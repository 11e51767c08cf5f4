"""Scale-out from YAML: every strategy overlay parses, DDP and FSDP2 train the tiny config on 2 CPU processes (gloo)
to the same weights, torch.compile of the blocks keeps the loss, and the optimizer follows the strategy."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
import yaml

from gr.cli import run_lightning_cli
from tests.conftest import REPO, module_init_args, write_config

STRATEGIES = sorted(glob.glob(os.path.join(REPO, "configs", "strategy", "*.yaml")))
EXPECTED_CLASS = {"ddp": "lightning.pytorch.strategies.DDPStrategy", "fsdp2": "gr.distributed.FSDP2Strategy",
                  "deepspeed_stage_2": "lightning.pytorch.strategies.DeepSpeedStrategy",
                  "deepspeed_stage_2_offload": "lightning.pytorch.strategies.DeepSpeedStrategy",
                  "deepspeed_stage_3": "lightning.pytorch.strategies.DeepSpeedStrategy",
                  "deepspeed_stage_3_offload": "lightning.pytorch.strategies.DeepSpeedStrategy"}


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def test_all_strategies_are_there():
    assert sorted(map(_name, STRATEGIES)) == sorted(EXPECTED_CLASS)


@pytest.mark.parametrize("path", STRATEGIES, ids=_name)
@pytest.mark.parametrize("base", ["configs/pretrain.yaml", "configs/finetune.yaml"])
def test_strategy_overlay_parses_with_the_training_configs(path, base, capsys):
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli(["fit", "--config", os.path.join(REPO, base), "--config", path, "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("seed_everything:"):])  # deepspeed logs a line to stdout on import
    assert printed["trainer"]["strategy"]["class_path"] == EXPECTED_CLASS[_name(path)]
    assert printed["model"]["class_path"].startswith("gr.training.")


def _fit(cfg: str, strategy: str | None, *overrides: str, devices: int = 2) -> subprocess.CompletedProcess:
    overlay = ["--config", os.path.join(REPO, "configs", "strategy", f"{strategy}.yaml")] if strategy else []
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", cfg, *overlay,
           "--trainer.accelerator=cpu", f"--trainer.devices={devices}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_process_runs(synthetic_shards, tmp_path_factory):
    """The tiny pretraining config, 6 steps on 2 gloo processes, once per CPU-capable strategy."""
    out = {}
    for strategy in ("ddp", "fsdp2"):
        root = tmp_path_factory.mktemp(strategy)
        cfg = write_config(root / "c.yaml", synthetic_shards, str(root / "run"), max_steps=6, every_n_steps=6)
        with open(cfg) as f:
            spec = yaml.safe_load(f)
        # Rank 0 writes rollout videos at validation: under FSDP2 that needs the gathered weights (no hang, no shards).
        spec["trainer"]["callbacks"].append({"class_path": "gr.training.callbacks.RolloutVideos",
                                             "init_args": {"num_samples": 1}})
        with open(cfg, "w") as f:
            yaml.safe_dump(spec, f)
        # FSDP2 writes a sharded torch.distributed.checkpoint folder, which gr reads by consolidating it on the CPU.
        # (Its default, one gathered .ckpt, is what the robot finetuning test below writes.)
        _fit(cfg, strategy, *(["--trainer.strategy.init_args.save_distributed_checkpoint=true"]
                              if strategy == "fsdp2" else []))
        out[strategy] = os.path.join(root, "run", "checkpoints", "last.ckpt")
        out[f"{strategy}_rollouts"] = sorted(glob.glob(os.path.join(root, "run", "rollouts", "*", "*.mp4")))
    return out


def test_ddp_and_fsdp2_train_on_two_cpu_processes_to_the_same_weights(two_process_runs):
    from gr.training.checkpoint_io import module_from_checkpoint

    init = torch.load(two_process_runs["ddp"], weights_only=True)
    assert init["global_step"] == 6
    ddp = module_from_checkpoint(two_process_runs["ddp"]).model.state_dict()
    assert os.path.isfile(os.path.join(two_process_runs["fsdp2"], ".metadata"))  # a sharded folder, one file per rank
    assert len(glob.glob(os.path.join(two_process_runs["fsdp2"], "*.distcp"))) == 2
    fsdp = module_from_checkpoint(two_process_runs["fsdp2"]).model.state_dict()  # consolidated by gr.export
    assert ddp.keys() == fsdp.keys()
    fresh = __import__("gr.training.pretrain", fromlist=["PretrainModule"]).PretrainModule(**module_init_args())
    moved = [k for k, v in fresh.model.state_dict().items() if not torch.equal(v, ddp[k])]
    assert len(moved) > len(ddp) // 2  # the optimizer really stepped
    for key in ddp:  # same data split, same averaged gradients: sharding must not change the math
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_gr_export_consolidates_the_fsdp2_sharded_checkpoint(two_process_runs, tmp_path):
    from gr.export import export, load_export
    from gr.training.checkpoint_io import module_from_checkpoint

    config = export(two_process_runs["fsdp2"], str(tmp_path / "export"))
    assert config["source"]["checkpoint_kind"] == "dcp" and config["source"]["global_step"] == 6
    exported = load_export(str(tmp_path / "export")).model.state_dict()
    ddp = module_from_checkpoint(two_process_runs["ddp"]).model.state_dict()
    assert exported.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(exported[key], ddp[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_rollout_videos_during_multi_process_training(two_process_runs, strategy):
    assert len(two_process_runs[f"{strategy}_rollouts"]) == 1  # rank 0 only, one sample, gathered weights under FSDP2


def test_fsdp2_strategy_is_pure_data_parallel():
    from gr.distributed import FSDP2Strategy

    s = FSDP2Strategy(reshard_after_forward=False)
    assert s._tensor_parallel_size == 1 and s.reshard_after_forward is False
    assert s._save_distributed_checkpoint is False  # one .ckpt file that rollout/policy/init_from read


def test_apply_fsdp2_shards_blocks_and_leaves_frozen_encoders(monkeypatch):
    import torch.distributed.fsdp as fsdp

    from gr.distributed import apply_fsdp2, transformer_blocks
    from gr.training.pretrain import PretrainModule

    module = PretrainModule(**module_init_args())
    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: sharded.append(m) or m)
    roots = apply_fsdp2(module, mesh=None)
    assert roots == [module.model]
    assert sharded == [*transformer_blocks(module.model), module.model]  # blocks first, then their root
    assert not any(m is module.text_encoder or m is module.image_tokenizer for m in sharded)


def test_compiled_blocks_give_the_same_loss_and_gradients():
    from gr.distributed import apply_compile
    from gr.training.pretrain import PretrainModule

    torch.manual_seed(0)
    batch = {"frames": torch.randint(0, 255, (2, 3, 32, 32, 3), dtype=torch.uint8), "caption": ["a", "b c"]}
    eager = PretrainModule(**module_init_args())
    compiled = PretrainModule(**module_init_args())
    compiled.model.load_state_dict(eager.model.state_dict())
    assert apply_compile(compiled.model, backend="aot_eager") == 2
    losses = []
    for m in (eager, compiled):
        loss = m._loss(batch)[0]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # generation with the KV cache stays eager: same tokens, no recompilation per length
    text, mask = eager.text_encoder(["a"])
    hist = torch.randint(0, 64, (1, 2, 4, 4))
    with torch.no_grad():
        assert torch.equal(compiled.model.generate_future_frame(text, mask, hist),
                           eager.model.generate_future_frame(text, mask, hist))


def test_compile_flag_reaches_configure_model(monkeypatch):
    import gr.distributed
    from gr.training.pretrain import PretrainModule

    calls = []
    monkeypatch.setattr(gr.distributed, "apply_compile", lambda model, **kw: calls.append(model) or 2)
    module = PretrainModule(**module_init_args(), compile=True)
    module.configure_model()
    module.configure_model()  # Lightning may call it again (e.g. fit then validate): compile once
    assert calls == [module.model]
    assert module.hparams["compile"] is True
    PretrainModule(**module_init_args()).configure_model()
    assert len(calls) == 1


def test_optimizer_follows_the_strategy():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from gr.distributed import optimizer_class

    assert optimizer_class(None) is torch.optim.AdamW
    assert optimizer_class(DDPStrategy()) is torch.optim.AdamW
    assert optimizer_class(DeepSpeedStrategy(stage=2)) is torch.optim.AdamW  # built on CPU; only setup needs CUDA
    assert optimizer_class(DeepSpeedStrategy(stage=3, offload_optimizer=True)) is DeepSpeedCPUAdam


def test_bf16_mixed_with_activation_checkpointing_trains(synthetic_shards, tmp_path):
    import json

    root = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", synthetic_shards, str(root), max_steps=4, every_n_steps=4, val=False)
    _fit(cfg, None, "--trainer.precision=bf16-mixed", "--model.init_args.model.trunk.activation_checkpointing=true",
         devices=1)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(v.dtype == torch.float32 for k, v in ckpt["state_dict"].items() if v.is_floating_point())  # fp32 master
    losses = [json.loads(line)["loss"] for line in open(root / "summary" / "losses.jsonl")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_fsdp2_finetunes_the_robot_model_on_two_cpu_processes(robot_shards, tmp_path):
    """The action head runs after the trunk and validation calls readout_features outside forward: both must see
    gathered weights under FSDP2 (sharded as its own unit / registered forward method)."""
    from tests.conftest import TINY_ROBOT_MODEL

    root = tmp_path / "run"
    shards = robot_shards["train_shards"]  # 2 shards: one per rank for training and for validation
    cfg = {"seed_everything": 0,
           "trainer": {"max_steps": 3, "default_root_dir": str(root), "logger": False,
                       "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 1,
                       "val_check_interval": 3, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                       "callbacks": [{"class_path": "gr.training.callbacks.RolloutVideos",
                                      "init_args": {"num_samples": 1}}]},
           "model": {"class_path": "gr.training.finetune.FinetuneModule",
                     "init_args": module_init_args(model=TINY_ROBOT_MODEL)},
           "data": {"class_path": "gr.data.robot_stream.RobotDataModule",
                    "init_args": {"train_shards": shards, "val_shards": shards, "batch_size": 2, "num_workers": 0,
                                  "shuffle_buffer": 4}}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _fit(str(path), "fsdp2")
    (path,) = glob.glob(str(root / "checkpoints" / "*.ckpt"))  # Lightning's default checkpoint at the end
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 3
    assert any(k.startswith("model.action_head.") for k in ckpt["state_dict"])  # gathered into one full file
    assert torch.isfinite(ckpt["state_dict"]["stats_action"]).all()
    assert len(glob.glob(str(root / "rollouts" / "*" / "*.mp4"))) == 1
