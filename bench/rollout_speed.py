"""Rollout speed: frames/s of KV-cache generation vs full recomputation for every token, in one run.

Prints one JSON object with, for each setting, frames/s with and without the cache and the speedup:
- `demo`: the demo's pretraining model (4 layers x 128, 8x8 codes, 256 codes, 2 history frames), 8 frames;
- `preset_S`: trunk preset S (12 x 448), 8x8 codes, 8 frames (a few minutes on 2 CPU cores; the target is >= 10x).
Generation is greedy from random weights: the cost does not depend on the weights. Both paths produce the same tokens
(asserted here and in tests/test_rollout.py). After one untimed warm-up frame per path, the two paths
alternate frame by frame, so the ratio is not skewed by the machine's speed drifting during the run. At batch 1 a cached step is a matrix-vector product per weight matrix,
bound by memory bandwidth (the whole model is read per token); `--batch` shares those reads across samples.

    .venv/bin/python bench/rollout_speed.py                 # both settings
    .venv/bin/python bench/rollout_speed.py --settings demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {"demo": {"num_layers": 4, "num_heads": 4, "width": 128}, "preset_S": {"preset": "S"}}


def run(trunk: dict, num_frames: int, grid: int = 8, codebook: int = 256, batch: int = 1) -> dict:
    from gr.config import ClipSpec, GRModelConfig
    from gr.model import GRModel

    torch.manual_seed(0)
    cfg = GRModelConfig(trunk=trunk, clip=ClipSpec(num_history=2, image_size=grid * 8), max_text_tokens=16)
    model = GRModel(cfg, codebook, grid, 512).eval()
    text, mask = torch.randn(batch, 16, 512), torch.ones(batch, 16, dtype=torch.bool)
    hist = torch.randint(0, codebook, (batch, 2, grid, grid))
    seconds = {True: 0.0, False: 0.0}
    with torch.no_grad():
        for use_cache in (True, False):  # warm-up (thread pools, allocator), not timed
            model.generate_future_frame(text, mask, hist, use_cache=use_cache)
        for f in range(num_frames):
            # Interleaved per frame, alternating which path goes first: drift in this shared machine's speed over
            # the run then falls on both paths alike instead of on whichever ran last.
            frames = {}
            for use_cache in ((True, False) if f % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                frames[use_cache] = model.generate_future_frame(text, mask, hist, use_cache=use_cache)
                seconds[use_cache] += time.perf_counter() - t0
            assert torch.equal(frames[True], frames[False]), f"cached and recomputed generation differ at frame {f}"
            hist = torch.cat([hist[:, 1:], frames[True][:, None]], dim=1)
    params = sum(p.numel() for p in model.parameters())
    return {"trunk": trunk, "params": params, "grid": grid, "num_frames": num_frames, "batch": batch,
            "tokens_per_frame": grid * grid, "cached_frames_per_s": round(batch * num_frames / seconds[True], 3),
            "recompute_frames_per_s": round(batch * num_frames / seconds[False], 3),
            "speedup": round(seconds[False] / seconds[True], 2), "identical_tokens": True, "warmup_frames": 1,
            "timing": "paths interleaved per frame"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="samples generated together (gr rollout --num-samples)")
    args = p.parse_args(argv)
    result = {"benchmark": "rollout_speed", "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    for name in args.settings:
        result[name] = run(SETTINGS[name], args.num_frames, batch=args.batch)
    if "preset_S" in result:
        result["target_speedup_preset_S"] = 10.0
        result["meets_target"] = result["preset_S"]["speedup"] >= 10.0
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
