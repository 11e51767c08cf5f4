"""Pre-tokenize video or robot shards with a frozen taming-format VQGAN, so training never decodes video.

For every `{key}.mp4` member (text-video shards) or `{key}.{view}.mp4` member (robot shards) it writes
`{key}.tokens.npy` / `{key}.{view}.tokens.npy`: uint16 (or int32) codes [T, h, w] of every native frame (or of frames
resampled to --fps), resized and centre-cropped to --image-size exactly as the training loader does. Every other
member is copied unchanged, and the json gains a `tokens` block (fps, grid, codebook size, tokenizer fingerprint) that
the loader checks against the model's tokenizer.

Each output shard keeps its input's file name and is written under a temporary name, then renamed: shards already in
--out are skipped, so an interrupted run resumes where it stopped. Bad samples are skipped, counted and listed in
`<out>/tokenize-report.json`.

    python data_prep/tokenize_shards.py --shards "data/synthetic/train-{000000..000031}.tar" \\
        --out data/synthetic_tokens --checkpoint outputs/tokenizer/vqgan.ckpt --image-size 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from multiprocessing import get_context
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gr.data.shards import expand_urls  # noqa: E402
from gr.data.video_io import (  # noqa: E402
    VideoDecodeError, get_frames_min_size, open_video, resample_indices, resize_center_crop)

_TOKENIZER: dict[str, Any] = {}  # one frozen VQGAN per worker process


def _tokenizer(checkpoint: str, yaml_path: Optional[str]):
    if checkpoint not in _TOKENIZER:
        from gr.encoders.vqgan import FrozenVQGAN

        _TOKENIZER.clear()
        _TOKENIZER[checkpoint] = FrozenVQGAN.from_taming(checkpoint, yaml_path)
    return _TOKENIZER[checkpoint]


def tokens_block(vq, image_size: int, fps: float, native_fps: float, num_native: int, dtype: str,
                 checkpoint: str) -> dict[str, Any]:
    grid = vq.grid_size(image_size)
    return {"fps": fps, "native_fps": native_fps, "num_native_frames": num_native, "image_size": image_size,
            "grid": [grid, grid], "codebook_size": vq.codebook_size, "dtype": dtype,
            "fingerprint": vq.vq.codebook_fingerprint(), "tokenizer": os.path.basename(checkpoint)}


def tokenize_video(vq, mp4: bytes, image_size: int, fps: Optional[float], dtype: str, chunk: int):
    """mp4 bytes -> (codes [T, h, w] in `dtype`, tokens fps, native fps, native frame count)."""
    import torch

    vr = open_video(mp4)
    native_fps, n = float(vr.get_avg_fps()), len(vr)
    idx = np.arange(n) if fps is None else resample_indices(n, native_fps, fps)
    if len(idx) == 0:
        raise VideoDecodeError(f"no frames at {fps} fps")
    parts = []
    for lo in range(0, len(idx), chunk):  # bounded memory for long videos
        # Frames smaller than one code's patch are refused rather than blown up.
        frames = get_frames_min_size(vr, [int(i) for i in idx[lo:lo + chunk]], vq.downsample_factor)
        frames = resize_center_crop(frames, image_size)
        parts.append(vq.encode(torch.from_numpy(frames), chunk=chunk).numpy())
    return np.concatenate(parts).astype(dtype), (native_fps if fps is None else fps), native_fps, n


def tokenize_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one input shard into one output shard (atomic). Returns its statistics and skipped samples."""
    import torch
    import webdataset as wds

    torch.set_num_threads(job["threads"])
    vq = _tokenizer(job["checkpoint"], job["yaml"])
    t0, stats, skipped = time.time(), Counter(), []
    tmp = job["out"] + ".tmp"
    with wds.TarWriter(tmp) as writer:
        for raw in wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": job["url"]}])):
            key = raw["__key__"]
            try:
                sample = _tokenize_sample(vq, raw, job)
            except (VideoDecodeError, ValueError) as exc:
                skipped.append({"key": f"{job['url']}:{key}", "error": str(exc)})
                continue
            stats["frames"] += sample.pop("_frames")
            writer.write(sample)
            stats["samples"] += 1
    if stats["samples"]:
        os.replace(tmp, job["out"])
    else:  # nothing usable: write no shard, so the loader never sees an empty one and a rerun retries it
        os.remove(tmp)
    return {"shard": job["out"], "samples": stats["samples"], "frames": stats["frames"], "skipped": skipped,
            "seconds": round(time.time() - t0, 2)}


def _tokenize_sample(vq, raw: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    key = f"{job['url']}:{raw['__key__']}"
    if "json" not in raw:
        raise ValueError(f"{key}: missing json member")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}.json: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{key}.json: expected an object")
    members = sorted(k for k in raw if k == "mp4" or k.endswith(".mp4"))
    if not members:
        raise ValueError(f"{key}: no mp4 member to tokenize")
    out: dict[str, Any] = {"__key__": raw["__key__"], "_frames": 0}
    blocks = {}
    for m in members:
        try:
            codes, fps, native_fps, n = tokenize_video(vq, raw[m], job["image_size"], job["fps"], job["dtype"],
                                                       job["batch_size"])
        except VideoDecodeError as exc:
            raise ValueError(f"{key}.{m}: {exc}") from exc
        buf = io.BytesIO()
        np.save(buf, codes, allow_pickle=False)
        name = "tokens.npy" if m == "mp4" else m[: -len("mp4")] + "tokens.npy"
        out[name] = buf.getvalue()
        out["_frames"] += len(codes)
        blocks[m] = tokens_block(vq, job["image_size"], fps, native_fps, n, job["dtype"], job["checkpoint"])
    if "mp4" in blocks:  # text-video sample
        meta["tokens"] = blocks["mp4"]
    else:  # robot episode: shared tokenizer fields, plus per-view fps and frame counts
        meta["tokens"] = {**next(iter(blocks.values())), "views": {m[: -len(".mp4")]: b for m, b in blocks.items()}}
    for k, v in raw.items():  # everything else travels unchanged (state.npy, action.npy, ...)
        if k not in members and not k.startswith("__") and k != "json":
            out[k] = v
    out["json"] = json.dumps(meta).encode()
    return out


def output_paths(urls: list[str], out_dir: str) -> list[str]:
    outs = [os.path.join(out_dir, os.path.basename(u)) for u in urls]
    dup = [o for o, c in Counter(outs).items() if c > 1]
    if dup:
        raise ValueError(f"--shards: two input shards share the file name {os.path.basename(dup[0])!r}")
    return outs


def run(shards: list[str], out: str, checkpoint: str, yaml_path: Optional[str] = None, image_size: int = 256,
        fps: Optional[float] = None, dtype: str = "auto", batch_size: int = 64, workers: int = 1) -> dict[str, Any]:
    """Tokenize `shards` into `out`; returns the report (also written to `<out>/tokenize-report.json`)."""
    urls = [u for s in shards for u in expand_urls(s, "--shards")]
    vq = _tokenizer(checkpoint, yaml_path)  # fail here, once, on a bad checkpoint or size
    vq.grid_size(image_size)
    if dtype == "auto":
        dtype = "uint16" if vq.codebook_size <= 65536 else "int32"
    if dtype == "uint16" and vq.codebook_size > 65536:
        raise ValueError(f"--dtype uint16 cannot hold {vq.codebook_size} codes; use int32")
    os.makedirs(out, exist_ok=True)
    outs = output_paths(urls, out)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    jobs = [dict(url=u, out=o, checkpoint=checkpoint, yaml=yaml_path,
                 image_size=image_size, fps=fps, dtype=dtype, batch_size=batch_size, threads=threads)
            for u, o in zip(urls, outs) if not os.path.isfile(o)]
    report: dict[str, Any] = {"shards_total": len(urls), "shards_already_done": len(urls) - len(jobs),
                              "shards_written": 0, "samples": 0, "frames": 0, "skipped": []}
    t0 = time.time()
    pool = get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(tokenize_shard, jobs) if pool else map(tokenize_shard, jobs)
        with tqdm(results, total=len(jobs), desc="tokenize", unit="shard") as bar:
            for r in bar:
                report["shards_written"] += 1
                report["samples"] += r["samples"]
                report["frames"] += r["frames"]
                report["skipped"] += r["skipped"]
                bar.set_postfix(frames_per_s=round(report["frames"] / max(1e-9, time.time() - t0), 1))
    finally:
        if pool:
            pool.close()
            pool.join()
    if jobs and report["samples"] == 0:
        first = report["skipped"][0]["error"] if report["skipped"] else "the shards hold no samples"
        raise ValueError(f"--shards: no sample could be tokenized ({len(report['skipped'])} skipped); "
                         f"first problem: {first}")
    report.update(seconds=round(time.time() - t0, 2), dtype=dtype, out=out,
                  pattern=_pattern(shards, out), fingerprint=vq.vq.codebook_fingerprint())
    with open(os.path.join(out, "tokenize-report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _pattern(shards: list[str], out: str) -> str | list[str]:
    """The input brace pattern(s) re-rooted at `out`, for `data.train_shards` with `shard_format: tokens`."""
    pats = [os.path.join(out, os.path.basename(s)) for s in shards]
    return pats[0] if len(pats) == 1 else pats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="input shard pattern(s), brace-expanded")
    p.add_argument("--out", required=True, help="output folder (existing shards there are skipped)")
    p.add_argument("--checkpoint", required=True, help="taming-format VQGAN .ckpt")
    p.add_argument("--yaml", default=None, help="taming yaml (default: the .ckpt path with .yaml)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="deprecated, does nothing: pickled .ckpt files load with no code from them run (gr.safe_load)")
    p.add_argument("--image-size", type=int, required=True, help="frame side the model trains at (clip.image_size)")
    p.add_argument("--fps", type=float, default=None,
                   help="tokenize frames resampled to this rate (default: every native frame, exact for any clip fps)")
    p.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder call")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one shard each)")
    args = p.parse_args(argv)
    try:
        report = run(args.shards, args.out, args.checkpoint, args.yaml, args.image_size, args.fps, args.dtype,
                     args.batch_size, args.workers)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    for s in report["skipped"]:
        print(f"skipped {s['key']}: {s['error']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"} | {"skipped": len(report["skipped"])}))
    return report


if __name__ == "__main__":
    main()
