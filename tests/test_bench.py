"""The scale benchmarks stay runnable and compute what they claim: the FLOPs formula, MFU from a given peak, the
reference stack's size, and sharded optimizer state in the memory benchmark. No timing is asserted."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import memory  # noqa: E402
import rollout_speed  # noqa: E402
import train_throughput as tt  # noqa: E402

TINY = "2x32x2"


def test_flops_per_token_formula():
    f = tt.flops_per_token(1000, num_layers=2, width=32, seq_len=80, frozen_online={"text": (500, 77)})
    assert f["trainable"] == 6 * 1000 + 12 * 2 * 32 * 80
    assert f["frozen_online"]["text"] == pytest.approx(2 * 500 * 77 / 80)
    assert f["total"] == pytest.approx(f["trainable"] + f["frozen_online"]["text"])


def test_non_embedding_params_skip_lookup_tables():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    m[0].weight.requires_grad_(True)
    assert tt.non_embedding_params(m) == 4 * 3 + 3


def test_trunk_spec():
    assert tt.trunk_spec("B") == {"preset": "B"}
    assert tt.trunk_spec("2x32x2") == {"num_layers": 2, "width": 32, "num_heads": 2}


def test_trunk_vs_reference_runs_same_sized_models():
    r = tt.trunk_vs_reference(TINY, grid=4, vocab=64, batch=2, steps=1, device=torch.device("cpu"), text_tokens=8)
    assert r["seq_len"] == 8 + 3 * 16
    assert r["tokens_per_s"]["ours"] > 0 and r["tokens_per_s"]["ref"] > 0
    blocks = 2 * (12 * 32 * 32 + 13 * 32)  # per block: qkv, proj, fc, mlp proj weights + biases + 2 LayerNorms
    assert r["params"]["ref"] == blocks + 64 * 32 + r["seq_len"] * 32 + 2 * 32  # + wte (tied head), wpe, ln_f
    assert r["ratio_ours_over_ref"] == pytest.approx(r["tokens_per_s"]["ours"] / r["tokens_per_s"]["ref"], rel=1e-2)


def test_lightning_section_reports_mfu_from_the_given_peak():
    r = tt.lightning_run(TINY, "auto", "32-true", batch=2, steps=2, warmup=1, grid=4, vocab=64,
                         device=torch.device("cpu"), devices=1, act_ckpt=True, compile_blocks=False,
                         text_model="ViT-S-32-alt", peak_tflops=1.0)
    assert r["steps_timed"] == 2 and r["seq_len"] == 32 + 3 * 16
    expect = r["flops_per_token"]["total"] * r["tokens_per_s"] / 1e12
    assert r["mfu"] == pytest.approx(expect, rel=1e-2)
    assert r["params_trainable_non_embedding"] < r["params_trainable"]
    assert r["flops_per_token_executed"] > 0
    assert r["mfu_executed"] == pytest.approx(r["flops_per_token_executed"] * r["tokens_per_s"] / 1e12, rel=1e-2)


def test_synthetic_captions_are_distinct_so_the_text_tower_runs():
    caps = tt.synthetic_captions(0, 50) + tt.synthetic_captions(50, 50)
    assert len(set(caps)) == 100


def test_memory_benchmark_sees_fsdp2_shard_the_optimizer_state():
    import argparse

    ns = argparse.Namespace(preset="2x64x2", grid=4, vocab=64, batch_size=2, steps=1, device="cpu",
                            precision="fp32", nproc=2, lora=0)
    single = memory.run_one(ns, "single", act_ckpt=False)
    fsdp = memory.run_one(ns, "fsdp2", act_ckpt=True)
    assert "error" not in single and "error" not in fsdp, (single, fsdp)
    assert single["optimizer_state_mib"] == pytest.approx(2 * single["param_mib"], rel=0.05)  # Adam: m and v
    assert fsdp["world_size"] == 2
    assert fsdp["optimizer_state_mib"] == pytest.approx(single["optimizer_state_mib"] / 2, rel=0.1)
    assert fsdp["param_mib"] == pytest.approx(single["param_mib"] / 2, rel=0.1)
    lora = memory.run_one(ns, "single", act_ckpt=False, lora=4)
    assert "error" not in lora, lora
    # rank 4 on 2 blocks x (qkv 64->192, proj 64->64, fc 64->256, proj 256->64): 4 * sum(in + out) per block
    assert lora["trainable_params"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert lora["trainable_params"] < single["trainable_params"] / 10
    assert lora["optimizer_state_mib"] == pytest.approx(2 * lora["trainable_params"] * 4 / 2 ** 20, rel=0.01)


def test_throughput_benchmark_builds_strategies_from_the_yaml_overlays():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from gr.distributed import FSDP2Strategy

    assert tt._strategy("auto") == "auto"
    assert isinstance(tt._strategy("fsdp2"), FSDP2Strategy)
    ds = tt._strategy("deepspeed_stage_2")  # what bench/gpu_run.sh asks for
    assert isinstance(ds, DeepSpeedStrategy) and ds.config["zero_optimization"]["stage"] == 2
    with pytest.raises(SystemExit, match="no configs/strategy/nope.yaml"):
        tt._strategy("nope")


def test_rollout_speed_runs_both_paths_to_identical_tokens():
    """The rollout benchmark runs on the demo size and reports both paths; it asserts identical tokens itself."""
    r = rollout_speed.main(["--settings", "demo", "--num-frames", "2", "--batch", "2"])["demo"]
    assert r["identical_tokens"] and r["num_frames"] == 2 and r["batch"] == 2
    assert r["cached_frames_per_s"] > 0 and r["recompute_frames_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["cached_frames_per_s"] / r["recompute_frames_per_s"], rel=0.02)


def test_serve_latency_benchmark_measures_both_paths():
    import serve_latency

    r = serve_latency.main(["--repeats", "2", "--image-size", "32", "--clients", "2"])
    assert r["in_process_ms"] > 0 and r["round_trip_ms"] > 0 and r["server_total_ms"] > 0
    assert r["overhead_ms"] == pytest.approx(r["round_trip_ms"] - r["in_process_ms"], abs=2e-3)
    assert r["under_load"]["clients"] == 2 and r["under_load"]["mean_batch"] >= 1


def test_policy_latency_reports_every_head_and_step_count():
    import policy_latency

    result = policy_latency.main(["--repeats", "1", "--heads", "cvae", "flow", "tokens", "--steps", "1", "3"])
    rows = [(r["head"], r["num_steps"]) for r in result["per_head"]]
    assert rows == [("cvae", None), ("flow", 1), ("flow", 3), ("tokens", None)]
    assert all(r["act_ms"] > 0 and r["head_ms"] > 0 and r["head_parameters"] > 0 for r in result["per_head"])
    assert result["per_head"][0]["act_vs_cvae"] == 1.0
    tokens = result["per_head"][-1]  # the cached decoder is timed against the reference one, same readouts
    assert tokens["head_ms_recompute"] > 0 and tokens["cache_speedup"] > 0
