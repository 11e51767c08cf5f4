"""Make the embedded text-video data: procedural clips whose caption decides the motion.

Each clip shows one coloured shape on a plain background moving in a direction at a speed, e.g.
"a red circle moves left quickly". Shape, colour, direction and speed are all in the caption and all visible, so a
model can only predict the next frame well if it reads the text. Output: webdataset shards of `{key}.mp4` +
`{key}.json`, the same format as data_prep/videos_to_shards.py.

    python data_prep/make_synthetic_video.py --out data/synthetic --num-train 384 --num-val 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gr.data.video_io import encode_mp4  # noqa: E402
from gr.data.writer import VideoShardWriter  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
           "magenta": (210, 50, 200), "cyan": (40, 210, 210), "white": (235, 235, 235), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 1.0, "quickly": 2.0}  # pixels per frame at 64 px, scaled with size


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def make_clip(rng: np.random.Generator, size: int, num_frames: int):
    """One clip: uint8 (T, size, size, 3) frames and its caption/attributes."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    direction = rng.choice(list(DIRECTIONS))
    speed_word = rng.choice(list(SPEEDS))
    r = size * rng.uniform(0.10, 0.14)
    step = SPEEDS[speed_word] * size / 64.0
    travel = step * (num_frames - 1)
    ux, uy = DIRECTIONS[direction]
    # Start so that the whole path stays inside the frame.
    lo, hi = r + 1, size - r - 1
    cx = rng.uniform(lo + max(0, -ux) * travel, hi - max(0, ux) * travel)
    cy = rng.uniform(lo + max(0, -uy) * travel, hi - max(0, uy) * travel)
    bg = rng.integers(10, 70, size=3)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        img = np.broadcast_to(bg.astype(np.uint8), (size, size, 3)).copy()
        img[shape_mask(shape, size, cx + ux * step * t, cy + uy * step * t, r)] = COLOURS[colour]
        frames[t] = img
    caption = f"a {colour} {shape} moves {direction} {speed_word}"
    attrs = {"colour": colour, "shape": shape, "direction": direction, "speed": speed_word}
    return frames, caption, attrs


def write_split(out: str, prefix: str, count: int, seed: int, size: int, num_frames: int, fps: float,
                per_shard: int) -> VideoShardWriter:
    rng = np.random.default_rng(seed)
    with VideoShardWriter(out, prefix, per_shard) as writer:
        for i in tqdm(range(count), desc=f"{prefix} clips", unit="clip"):
            frames, caption, attrs = make_clip(rng, size, num_frames)
            meta = {"caption": caption, "fps": fps, "source": "synthetic", **attrs}
            writer.write(f"{prefix}{i:06d}", encode_mp4(frames, fps), meta)
    return writer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the tar shards")
    p.add_argument("--num-train", type=int, default=384, help="training clips")
    p.add_argument("--num-val", type=int, default=64, help="validation clips")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels (even)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4")
    p.add_argument("--per-shard", type=int, default=64, help="clips per tar shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size % 2 or args.size < 16:
        p.error("--size must be even and >= 16")
    t0 = time.time()
    train = write_split(args.out, "train", args.num_train, args.seed, args.size, args.num_frames, args.fps, args.per_shard)
    val = write_split(args.out, "val", args.num_val, args.seed + 1, args.size, args.num_frames, args.fps, args.per_shard)
    summary = {"num_train": train.count, "num_val": val.count, "train_shards": train.pattern,
               "val_shards": val.pattern, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
