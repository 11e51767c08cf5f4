"""DeepSpeed ZeRO: raw `deepspeed.initialize` ZeRO-2/3 over 2 CPU processes (gloo) must match a plain single-process
run step for step and actually shard; the Lightning strategy YAMLs must build; a Lightning fit runs on CUDA only."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, write_config

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed, DS_BUILD_OPS=0)")

WORKER = os.path.join(REPO, "tests", "dist", "zero_worker.py")
STEPS = 5
# float32 noise only: the DeepSpeed run averages two half-batch means over gloo, updates flat partitions and takes the
# clip norm in float64, the reference takes one full-batch mean. Measured: losses differ by ~5e-7 (1e-7 relative);
# weights by 1e-6 at the 99.9th percentile but up to 5e-5 where Adam divides a near-zero gradient (rarely seen codes'
# embeddings) by its own tiny RMS, which turns float noise into update noise. A skipped, doubled or unclipped step
# moves the loss by ~0.07 and each weight by ~lr = 3e-3, so these bounds still fail such runs by orders of magnitude.
LOSS_RTOL, PARAM_ATOL, DISPLACEMENT_RTOL = 1e-4, 1e-3, 1e-3


def _env() -> dict:
    # OMP_NUM_THREADS=1: two ranks on two cores, and the same BLAS reduction order in every process.
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _run(cmd: list, out: str) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero") / "reference.json")
    return _run([sys.executable, WORKER, "--reference", "--steps", str(STEPS), "--out", out], out)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process_and_shards(stage, reference, tmp_path):
    out = str(tmp_path / f"zero{stage}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           "--stage", str(stage), "--steps", str(STEPS), "--out", out, "--save-dir", str(tmp_path / "ds")]
    if stage == 3:
        # gr.distributed.deepspeed_config keeps tensors of <= 1e5 elements gathered on every rank; the tiny model's
        # largest has 8192, so the config as is would never partition a parameter. 0 partitions all of them, including
        # time_emb, which GRModel indexes through `.weight` outside that module's forward.
        cmd += ["--persistence-threshold", "0"]
    got = _run(cmd, out)
    assert got["engine_stage"] == stage and got["world_size"] == 2

    # Optimizer steps happened, and they are the reference's steps.
    assert reference["losses"][-1] < reference["losses"][0] - 0.1, reference["losses"]
    assert got["losses"][-1] < got["losses"][0] - 0.1, got["losses"]
    assert got["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL, abs=0)
    assert got["params"].keys() == reference["params"].keys()
    diff2 = moved2 = 0.0
    for name, want in reference["params"].items():
        want, mine, init = (torch.tensor(v, dtype=torch.float64)
                            for v in (want, got["params"][name], reference["initial_params"][name]))
        assert torch.allclose(mine, want, rtol=0, atol=PARAM_ATOL), name
        diff2 += (mine - want).square().sum().item()
        moved2 += (want - init).square().sum().item()
    # Final weights agree to a small fraction of how far training moved them.
    assert diff2 ** 0.5 <= DISPLACEMENT_RTOL * moved2 ** 0.5, (diff2 ** 0.5, moved2 ** 0.5)

    # Sharding: each rank's Adam state covers half of the parameters (plus alignment padding), not all of them.
    total = got["total_numel"]
    assert reference["ranks"][0]["opt_state_numel"] == total  # what an un-sharded run holds
    for r in got["ranks"]:
        assert total / 2 <= r["opt_state_numel"] <= total / 2 + 64, got["ranks"]
        if stage == 2:  # ZeRO-2 shards gradients and optimizer states; parameters stay replicated
            assert r["resident_param_numel"] == total
        else:  # ZeRO-3: between steps a rank holds only its partition of every parameter
            assert r["resident_param_numel"] == 0 and r["persistent_params"] == 0
            assert total / 2 <= r["partition_numel"] <= total / 2 + 64 * len(got["params"]), got["ranks"]


STRATEGY_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "strategy", "deepspeed_*.yaml")))


@pytest.mark.parametrize("path", STRATEGY_CONFIGS, ids=os.path.basename)
def test_strategy_config_builds_deepspeed_strategy(path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from gr.distributed import is_deepspeed_offload

    with open(path) as f:
        spec = yaml.safe_load(f)["trainer"]["strategy"]
    module, _, name = spec["class_path"].rpartition(".")
    # Construction needs no GPU (only setup refuses CPUs); an init_arg Lightning does not know raises TypeError here.
    strategy = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    base = os.path.basename(path)
    assert zero["stage"] == int(base.split("_")[2].split(".")[0])
    offload = "offload" in base
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert is_deepspeed_offload(strategy) == offload  # what switches gr to DeepSpeedCPUAdam


def test_strategy_configs_found():
    names = {os.path.basename(p) for p in STRATEGY_CONFIGS}
    assert {"deepspeed_stage_2.yaml", "deepspeed_stage_3.yaml"} <= names


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Lightning's DeepSpeedStrategy only runs on CUDA GPUs (it refuses CPU)")
def test_lightning_deepspeed_stage_2_fit_on_gpu(synthetic_shards, tmp_path):
    root = str(tmp_path / "run")
    cfg = write_config(tmp_path / "tiny.yaml", synthetic_shards, root, max_steps=4, every_n_steps=2, val=False)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", cfg,
           "--config", os.path.join(REPO, "configs", "strategy", "deepspeed_stage_2.yaml"),
           "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Under DeepSpeed a Lightning checkpoint is a directory of per-rank shards.
    assert os.path.exists(os.path.join(root, "checkpoints", "last.ckpt")), os.listdir(os.path.join(root, "checkpoints"))

    # `gr export` consolidates the ZeRO folder on the CPU to the weights the run ended with, which are the
    # single-process run's weights to float noise (checked above).
    from gr.export import export, load_export

    config = export(str(tmp_path / "ds"), str(tmp_path / "export"))
    assert config["source"]["checkpoint_kind"] == "deepspeed" and config["source"]["global_step"] == STEPS
    exported = load_export(str(tmp_path / "export")).state_dict()
    for name, value in got["params"].items():
        assert torch.equal(exported[name].flatten(), torch.tensor(value, dtype=torch.float32)), name
        want = torch.tensor(reference["params"][name], dtype=torch.float32)
        assert torch.allclose(exported[name].flatten(), want, rtol=0, atol=PARAM_ATOL), name
