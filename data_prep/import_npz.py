"""Import a plain folder of episodes (episode_*.npz, optionally with episode_*.<view>.mp4) into robot episode shards.

Each `episode_<id>.npz` holds
    state           float [T, S]
    action          float [T, A]
    instruction     optional 0-d string array (else --instruction)
    fps             optional scalar (else --fps)
    images_<view>   optional uint8 [T, H, W, 3], one per camera view
and a camera view may instead be a sibling file `episode_<id>.<view>.mp4` holding T frames.

    python data_prep/import_npz.py --input my_episodes/ --out data/my_robot --instruction "stack the blocks"
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep._episodes import (  # noqa: E402
    add_common_args, as_2d, check_lengths, natural_key, pick_instruction, resize_views, run_cli, safe_name,
    split_list, write_episodes)
from gr.data.robot import Episode  # noqa: E402
from gr.data.video_io import VideoDecodeError, get_frames, open_video  # noqa: E402

IMAGE_PREFIX = "images_"


def list_files(folder: str) -> list[str]:
    """The folder's episode_*.npz files in natural order; raises ValueError when there are none.

    Args:
        folder: --input.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"--input: {folder!r} is not a folder")
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "episode_*.npz")), key=natural_key)
    if not files:
        raise ValueError(f"{folder}: no episode_*.npz files (empty dataset)")
    return files


def sibling_videos(path: str) -> dict[str, str]:
    """View name -> mp4 path for the files `<stem>.<view>.mp4` next to `<stem>.npz`.

    Args:
        path: the episode's npz file.
    """
    stem = path[:-len(".npz")]
    return {p[len(stem) + 1:-len(".mp4")]: p for p in glob.glob(glob.escape(stem) + ".*.mp4")}


def decode_mp4(path: str) -> np.ndarray:
    """Every frame of an mp4 -> uint8 [T, H, W, 3]; raises ValueError naming the file.

    Args:
        path: mp4 file.
    """
    try:
        vr = open_video(path)
        return get_frames(vr, range(len(vr)))
    except VideoDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def load_views(z, path: str, cameras: Optional[list[str]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(view -> frames, view -> source key or file) from `images_<view>` arrays and sibling mp4s.

    Args:
        z: the open npz.
        path: its file name.
        cameras: --cameras, or None for every view found.
    """
    arrays = {k[len(IMAGE_PREFIX):]: k for k in z.files if k.startswith(IMAGE_PREFIX)}
    videos = sibling_videos(path)
    twice = sorted(set(arrays) & set(videos))
    if twice:
        raise ValueError(f"{path}: views {twice} are given both as {IMAGE_PREFIX}<view> arrays and as mp4 files")
    found = sorted(set(arrays) | set(videos))
    frames, sources = {}, {}
    for view in cameras or found:
        if view in arrays:
            frames[view], sources[view] = z[arrays[view]], arrays[view]
        elif view in videos:
            frames[view], sources[view] = decode_mp4(videos[view]), os.path.basename(videos[view])
        else:
            raise ValueError(f"{path}: no camera key {IMAGE_PREFIX + view!r} and no file "
                             f"{os.path.basename(path)[:-4]}.{view}.mp4 (cameras: {found})")
    if not frames:
        raise ValueError(f"{path}: no camera views (no {IMAGE_PREFIX}<view> arrays or <stem>.<view>.mp4 files)")
    return {safe_name(v): x for v, x in frames.items()}, sources


def _get(z, key: str, path: str) -> np.ndarray:
    if key not in z.files:
        raise ValueError(f"{path}: no key {key!r} (keys: {sorted(z.files)})")
    return z[key]


def _text(x: np.ndarray) -> str:
    value = x.reshape(-1)[0].item() if x.size else ""
    return value.decode() if isinstance(value, bytes) else str(value)


def read_episode(path: str, args: argparse.Namespace) -> Episode:
    """Load one episode file.

    Args:
        path: the npz file.
        args: parsed command line (cameras, instruction, fps).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            state = as_2d(_get(z, "state", path), path, "state")
            action = as_2d(_get(z, "action", path), path, "action")
            frames, sources = load_views(z, path, split_list(args.cameras))
            instruction = _text(z["instruction"]) if "instruction" in z.files else None
            fps = float(z["fps"]) if "fps" in z.files else args.fps
    except (OSError, EOFError, ValueError) as exc:  # numpy's own errors (truncated file, object arrays) lack the path
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable npz file: {exc}") from exc
    check_lengths(path, {"state": len(state), "action": len(action),
                         **{sources[v]: len(x) for v, x in frames.items()}})
    instruction = pick_instruction(path, instruction, args.instruction, "key 'instruction'")
    return Episode(frames, state, action, instruction, fps, {"source_file": os.path.basename(path)})


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Read every episode in args.input and write shards; returns the summary.

    Args:
        args: parsed command line.
    """
    files = list_files(args.input)

    def episodes() -> Iterator[tuple[str, Episode, str]]:
        for path in files:
            ep = read_episode(path, args)
            ep.frames = resize_views(ep.frames, args.image_size, path)
            yield safe_name(os.path.basename(path)[:-len(".npz")]), ep, path

    name = os.path.basename(os.path.normpath(args.input))
    return write_episodes(episodes(), len(files), args, f"npz:{name}", "npz episodes")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this importer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of episode_*.npz (and episode_*.<view>.mp4) files")
    p.add_argument("--fps", type=float, default=10.0, help="control rate for episodes without an 'fps' key")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(build_parser(), convert, argv)


if __name__ == "__main__":
    main()
