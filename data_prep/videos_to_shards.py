"""Turn a manifest of videos + captions into webdataset text-video shards (`{key}.mp4` + `{key}.json`).

The manifest is CSV (header: path,caption[,start,end]) or JSONL ({"path", "caption", optional "start"/"end" in
seconds). Each video is decoded with decord, resampled to --fps, resized (short side) and centre-cropped to --size,
and re-encoded as H.264. Unreadable, empty or too-short inputs are counted and reported; they never stop the run.

    python data_prep/videos_to_shards.py --manifest clips.csv --out data/my_videos --size 256 --fps 8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections import Counter
from multiprocessing import Pool
from typing import Any, Iterator, Optional

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gr.data.video_io import (  # noqa: E402
    VideoDecodeError, encode_mp4, get_frames, open_video, resample_indices, resize_center_crop)
from gr.data.writer import VideoShardWriter  # noqa: E402

import numpy as np  # noqa: E402


def read_manifest(path: str) -> list[dict[str, Any]]:
    """Rows with path, caption, start, end; raises ValueError naming the file, line and field."""
    if not os.path.isfile(path):
        raise ValueError(f"--manifest: file not found: {path!r}")
    rows: list[dict[str, Any]] = []
    if path.endswith((".jsonl", ".json")):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from exc
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, row in enumerate(rows, 1):
        for field in ("path", "caption"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise ValueError(f"{path}: row {n}: field {field!r} must be a non-empty string")
        rec = {"path": row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"]),
               "caption": row["caption"]}
        for field in ("start", "end"):
            val = row.get(field)
            try:
                rec[field] = float(val) if val not in (None, "") else None
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {n}: field {field!r} must be a number, got {val!r}") from None
        out.append(rec)
    return out


def convert_one(job: tuple[int, dict[str, Any], int, float, int]) -> tuple[int, Optional[bytes], dict[str, Any]]:
    """Decode, resample, resize and re-encode one video. Returns (index, mp4 or None, meta or {'error': ...})."""
    index, row, size, fps, min_frames = job
    try:
        vr = open_video(row["path"])
        native_fps = vr.get_avg_fps()
        idx = resample_indices(len(vr), native_fps, fps, row["start"] or 0.0, row["end"])
        if len(idx) < min_frames:
            raise VideoDecodeError(f"only {len(idx)} frames at {fps} fps (need {min_frames})")
        chunks = [resize_center_crop(get_frames(vr, idx[i:i + 64]), size) for i in range(0, len(idx), 64)]
        frames = np.concatenate(chunks)
        mp4 = encode_mp4(frames, fps)
    except (VideoDecodeError, OSError, ValueError) as exc:
        return index, None, {"error": f"{type(exc).__name__}: {exc}"}
    meta = {"caption": row["caption"], "fps": fps, "source": os.path.basename(row["path"]),
            "source_fps": native_fps, "num_frames": int(len(frames))}
    if row["start"] is not None or row["end"] is not None:
        meta["source_start"], meta["source_end"] = row["start"], row["end"]
    return index, mp4, meta


def _key(index: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(path))[0])[:40]
    return f"{index:08d}_{stem}"  # webdataset splits keys at the first dot: no dots allowed


def convert(rows: list[dict[str, Any]], out: str, prefix: str, size: int, fps: float, per_shard: int,
            workers: int, min_frames: int) -> dict[str, Any]:
    jobs = [(i, r, size, fps, min_frames) for i, r in enumerate(rows)]
    failures: list[dict[str, str]] = []
    reasons: Counter = Counter()

    def results() -> Iterator:
        if workers <= 1:
            yield from map(convert_one, jobs)
        else:
            with Pool(workers) as pool:
                yield from pool.imap(convert_one, jobs, chunksize=1)

    with VideoShardWriter(out, prefix, per_shard) as writer:
        for index, mp4, meta in tqdm(results(), total=len(jobs), desc="videos", unit="video"):
            if mp4 is None:
                failures.append({"path": rows[index]["path"], "error": meta["error"]})
                reasons[meta["error"].split(":")[0]] += 1
                continue
            writer.write(_key(index, rows[index]["path"]), mp4, meta)
    return {"written": writer.count, "failed": len(failures), "failure_kinds": dict(reasons),
            "failures": failures, "shards": writer.pattern}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="CSV or JSONL with path, caption[, start, end]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shard file prefix")
    p.add_argument("--size", type=int, default=256, help="output frame size (short side resize, centre crop)")
    p.add_argument("--fps", type=float, default=8.0, help="output frame rate")
    p.add_argument("--per-shard", type=int, default=256, help="videos per tar")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel decode/encode processes")
    p.add_argument("--min-frames", type=int, default=2, help="skip videos with fewer frames at --fps")
    args = p.parse_args(argv)
    if args.size % 2:
        p.error("--size must be even (H.264 yuv420p)")
    t0 = time.time()
    try:
        rows = read_manifest(args.manifest)
    except ValueError as exc:
        p.error(str(exc))
    report = convert(rows, args.out, args.prefix, args.size, args.fps, args.per_shard, args.workers, args.min_frames)
    report["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(args.out, f"{args.prefix}-report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for fail in report["failures"]:
        print(f"skipped {fail['path']}: {fail['error']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
    return report


if __name__ == "__main__":
    main()
