"""Shared pieces of the robot-dataset importers (import_lerobot, import_hdf5, import_npz).

Each importer turns its input into a stream of `(key, Episode, where)` triples, where `where` names the source file
and group for error messages; `write_episodes` checks and writes them with `EpisodeShardWriter` behind a tqdm bar,
and `run_cli` turns user mistakes (ValueError, OSError) into an argparse error naming the file and key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gr.data.robot import Episode, EpisodeShardWriter, check_episode  # noqa: E402
from gr.data.video_io import resize_center_crop  # noqa: E402


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Add the options every importer shares: --out, --prefix, --per-shard, --image-size, --instruction, --cameras.

    Args:
        p: the importer's parser.
    """
    p.add_argument("--out", required=True, help="output folder for the robot episode shards")
    p.add_argument("--prefix", default="train", help="shard file prefix (<out>/<prefix>-000000.tar)")
    p.add_argument("--per-shard", type=int, default=32, help="episodes per tar")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize (short side) and centre-crop every view to this even size; default: keep")
    p.add_argument("--instruction", default=None, help="instruction for episodes whose source has none")
    p.add_argument("--cameras", default=None, help="comma-separated cameras to keep; default: all")


def split_list(text: Optional[str]) -> Optional[list[str]]:
    """'a, b,c' -> ['a', 'b', 'c']; None or '' -> None.

    Args:
        text: comma-separated names.
    """
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_indices(text: Optional[str]) -> Optional[list[int]]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]; None -> None. Raises ValueError on anything else.

    Args:
        text: comma-separated integers and inclusive ranges.
    """
    if not text:
        return None
    out: list[int] = []
    for part in split_list(text) or []:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"--episodes: {part!r} is not an index or a range like 3-7")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def safe_name(text: str) -> str:
    """A view name or sample key usable in a webdataset tar: no dots (webdataset splits keys at the first dot).

    Args:
        text: any name.
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def natural_key(path: str) -> list:
    """Sort key that orders 'episode_2' before 'episode_10'.

    Args:
        path: a file or group name.
    """
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]


def check_lengths(where: str, lengths: dict[str, int]) -> int:
    """Return the common length of named arrays, or raise a ValueError naming each key and its length.

    Args:
        where: the file (and group) the arrays come from.
        lengths: key -> number of steps.
    """
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{key!r} has {n}" for key, n in lengths.items())
        raise ValueError(f"{where}: steps differ between keys: {listing}")
    return next(iter(lengths.values()))


def positive_number(value, integer: bool = False) -> bool:
    """A finite number > 0 (an integer one with `integer`), not a bool: metadata checks of the importers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        return False
    return not integer or float(value).is_integer()


def as_2d(x: np.ndarray, where: str, key: str) -> np.ndarray:
    """[T] or [T, ...] numeric array -> float [T, D]; raises ValueError naming the key otherwise.

    Args:
        x: the array read from the source.
        where: the source file (and group).
        key: the array's name in the source.
    """
    x = np.asarray(x)
    if x.ndim == 0 or not np.issubdtype(x.dtype, np.number) or x.size == 0:
        raise ValueError(f"{where}: {key!r} must be a non-empty numeric [T, dim] array, got {x.dtype} {x.shape}")
    x = x.reshape(len(x), -1)
    if not np.isfinite(x).all():  # a NaN state or action would train silently wrong
        raise ValueError(f"{where}: {key!r} has {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def resize_views(frames: dict[str, np.ndarray], size: Optional[int], where: str) -> dict[str, np.ndarray]:
    """Resize + centre-crop every view to size x size (None: keep); H.264 needs even sizes, so odd ones are an error.

    Args:
        frames: view name -> uint8 [T, H, W, 3].
        size: output side, or None to keep the source size.
        where: the source, for error messages.
    """
    out = {}
    for view, x in frames.items():
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"{where}: camera {view!r} must be uint8 [T, H, W, 3], got {x.dtype} {x.shape}")
        x = x if size is None else resize_center_crop(x, size)
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"{where}: camera {view!r} is {x.shape[1]}x{x.shape[2]} px; H.264 needs even sizes, "
                             f"pass --image-size")
        out[view] = x
    return out


def pick_instruction(where: str, found: Optional[str], fallback: Optional[str], field: str) -> str:
    """The source's own instruction if it has one, else --instruction; raises ValueError naming the field otherwise.

    Args:
        where: the source, for error messages.
        found: instruction read from the source (None or '' when absent).
        fallback: the --instruction option.
        field: where the source would keep it, for the error message.
    """
    text = found.strip() if isinstance(found, str) else ""
    if text:
        return text
    if fallback and fallback.strip():
        return fallback.strip()
    raise ValueError(f"{where}: no instruction ({field} is missing or empty); pass --instruction")


def _remove_partials(writer: EpisodeShardWriter) -> None:
    for shard in writer.shards:
        for tmp in (shard + ".partial", shard + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)


def write_episodes(episodes: Iterable[tuple[str, Episode, str]], total: int, args: argparse.Namespace,
                   source: str, desc: str) -> dict[str, Any]:
    """Check and write every episode into shards; returns the summary dict (without 'seconds').

    Args:
        episodes: (sample key, episode, where) triples, read lazily so that memory holds one episode at a time.
        total: number of episodes, for the progress bar.
        args: parsed options (out, prefix, per_shard).
        source: dataset name recorded in every episode's json.
        desc: progress bar label.
    """
    if total == 0:
        raise ValueError(f"{source}: no episodes found (empty dataset)")
    created = not os.path.exists(args.out)
    before = set() if created else set(os.listdir(args.out))  # never removed on a failure: an earlier import's
    writer = EpisodeShardWriter(args.out, args.prefix, args.per_shard, source=source)
    seen: set[str] = set()
    try:
        with writer:  # closes the open tar on an error; finishes the shards and statistics otherwise
            for key, ep, where in tqdm(episodes, total=total, desc=desc, unit="episode"):
                if key in seen:
                    raise ValueError(f"{where}: episode key {key!r} is used twice")
                seen.add(key)
                check_episode(ep, where, writer.views)
                writer.write(key, ep)
    except BaseException:
        # A failed import leaves nothing of its own: no shard, statistics file or temp file it wrote, and not the
        # folder it created. Files that were there before it (an earlier import's) are kept.
        _remove_partials(writer)
        if created:
            shutil.rmtree(args.out, ignore_errors=True)
        elif os.path.isdir(args.out):
            for name in set(os.listdir(args.out)) - before:
                path = os.path.join(args.out, name)
                if os.path.isfile(path) and name.startswith(f"{args.prefix}-"):
                    os.remove(path)
        raise
    return {"episodes": writer.count, "frames": writer.num_frames, "shards": writer.pattern, "views": writer.views,
            "stats_file": os.path.join(args.out, f"{args.prefix}-stats.json")}


def run_cli(p: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], dict[str, Any]],
            argv: Optional[list[str]]) -> dict[str, Any]:
    """Parse argv, run `convert(args)`, print the JSON summary and return it; user mistakes exit with status 2.

    Args:
        p: the importer's parser (already holding the common options).
        convert: reads the input and returns `write_episodes`' summary.
        argv: command line (None: sys.argv).
    """
    args = p.parse_args(argv)
    if args.per_shard < 1:
        p.error("--per-shard must be at least 1")
    if args.image_size is not None and (args.image_size < 2 or args.image_size % 2):
        p.error("--image-size must be a positive even number (H.264 yuv420p)")
    t0 = time.time()
    try:
        summary = convert(args)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    summary["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(summary))
    return summary
