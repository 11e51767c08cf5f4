"""Turn a manifest of videos + captions into webdataset text-video shards (`{key}.mp4` + `{key}.json`).

The manifest is CSV (header: path,caption[,start,end]) or JSONL ({"path", "caption", optional "start"/"end" in
seconds). Each video is decoded with decord, resampled to --fps, resized (short side) and centre-cropped to --size,
and re-encoded as H.264. Unreadable, empty or too-short inputs are counted and reported; they never stop the run.
Bad manifest rows (an empty caption, start not before end, a missing path or file, an unparsable line) are skipped and
counted by kind in `<prefix>-report.json` too; `--strict` stops at the first one instead.

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


class ManifestError(ValueError):
    """A bad manifest row under --strict: the message names the file, the row and the field."""


def _raw_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(row number, parsed row or an Exception for an unparsable line) for a CSV or JSONL manifest."""
    with open(path, newline="") as f:
        if path.endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield n, exc
        else:
            yield from enumerate(csv.DictReader(f), 1)


def _check_row(row: Any, base: str) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
    """(record, None) for a good row, else (None, (kind, message naming the field))."""
    if isinstance(row, Exception):
        return None, ("bad_json", f"not valid JSON: {row}")
    if not isinstance(row, dict):
        return None, ("not_an_object", f"a row must be an object with path and caption, got {type(row).__name__}")
    if not isinstance(row.get("path"), str) or not row["path"]:
        return None, ("missing_path", "field 'path' must be a non-empty string")
    if not isinstance(row.get("caption"), str) or not row["caption"].strip():
        return None, ("empty_caption", "field 'caption' must be a non-empty string")
    rec = {"path": row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"]),
           "caption": row["caption"]}
    for field in ("start", "end"):
        val = row.get(field)
        try:
            rec[field] = float(val) if val not in (None, "") else None
        except (TypeError, ValueError):
            return None, (f"bad_{field}", f"field {field!r} must be a number, got {val!r}")
        if rec[field] is not None and not (rec[field] >= 0 and np.isfinite(rec[field])):
            return None, (f"bad_{field}", f"field {field!r} must be a finite number >= 0, got {val!r}")
    if rec["start"] is not None and rec["end"] is not None and rec["start"] >= rec["end"]:
        return None, ("start_after_end", f"start {rec['start']} s is not before end {rec['end']} s")
    if not os.path.isfile(rec["path"]):
        return None, ("file_not_found", f"field 'path': file not found: {rec['path']!r}")
    return rec, None


def read_manifest(path: str, strict: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(good rows with path, caption, start, end; skipped rows with row, kind, error). A web-scale manifest has some
    bad rows (an empty caption, start after end, a missing path or file), so they are skipped and counted; with
    `strict` the first one raises a ManifestError naming the file, the row and the field."""
    if not os.path.isfile(path):
        raise ValueError(f"--manifest: file not found: {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    rows, skipped = [], []
    for n, row in _raw_rows(path):
        rec, bad = _check_row(row, base)
        if bad is None:
            rows.append(rec)
            continue
        if strict:
            raise ManifestError(f"{path}: row {n}: {bad[1]}")
        skipped.append({"row": n, "kind": bad[0], "error": bad[1]})
    return rows, skipped


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
    p.add_argument("--strict", action="store_true", help="stop at the first bad manifest row instead of skipping it")
    args = p.parse_args(argv)
    if args.size % 2:
        p.error("--size must be even (H.264 yuv420p)")
    t0 = time.time()
    try:
        rows, bad_rows = read_manifest(args.manifest, args.strict)
    except ValueError as exc:
        p.error(str(exc))
    for bad in bad_rows:
        print(f"skipped {args.manifest} row {bad['row']} ({bad['kind']}): {bad['error']}", file=sys.stderr)
    report = convert(rows, args.out, args.prefix, args.size, args.fps, args.per_shard, args.workers, args.min_frames)
    report.update(manifest_rows=len(rows) + len(bad_rows), manifest_skipped=len(bad_rows),
                  manifest_skip_kinds=dict(Counter(b["kind"] for b in bad_rows)), manifest_skips=bad_rows)
    report["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(args.out, f"{args.prefix}-report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for fail in report["failures"]:
        print(f"skipped {fail['path']}: {fail['error']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k not in ("failures", "manifest_skips")}))
    return report


if __name__ == "__main__":
    main()
