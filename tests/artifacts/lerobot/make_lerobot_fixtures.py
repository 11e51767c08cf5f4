"""Write the LeRobot fixtures of tests/test_lerobot_real.py with the real `lerobot` library (0.4.4, codebase v3.0).

lerobot pins torch < 2.11, older than this project's torch, so it cannot live in the project's environment. These
small datasets (about 100 KB) are written once by the real library and committed with this script:
- `v30_av1/`: lerobot's default encoding (AV1, libsvtav1), two cameras, three episodes; episode 1 carries two tasks
  (its first frames "pick up the cube", the rest "place it in the bowl"), recorded through `add_frame(task=...)`;
- `v30_images/`: `use_videos=False`, one image camera whose frames lerobot embeds in the data parquet.
The frames, states and actions come from `episode_data`, which the test calls to know what the files must hold.

To rewrite them (a separate environment; lerobot is installed without its dependency pins, beside torch 2.13):
    python -m venv /tmp/lrv && /tmp/lrv/bin/pip install torch==2.13.0 && /tmp/lrv/bin/pip install --no-deps lerobot==0.4.4
    /tmp/lrv/bin/pip install datasets huggingface-hub av jsonlines imageio deepdiff draccus termcolor einops accelerate
    (plus torchvision 0.28 with tools/torchvision_cpu_shim.py, as the Makefile installs it)
    /tmp/lrv/bin/python tests/artifacts/lerobot/make_lerobot_fixtures.py
"""

from __future__ import annotations

import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FPS = 10
HEIGHT, WIDTH = 48, 64
# (episode length, [(first frame, task)]) per dataset.
AV1_EPISODES = [(12, [(0, "push the red block")]),
                (20, [(0, "pick up the cube"), (8, "place it in the bowl")]),
                (9, [(0, "push the red block")])]
IMAGE_EPISODES = [(6, [(0, "open the drawer")]), (8, [(0, "close the drawer")])]
CAMERAS = {"v30_av1": ["top", "wrist"], "v30_images": ["front"]}


def frame(t: int, episode: int, camera: int) -> np.ndarray:
    """A smooth, moving gradient (lossy codecs keep it within a few levels)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    r = 40 + 2.0 * x + 3.0 * t
    g = 30 + 3.0 * y + 40.0 * camera
    b = 120 + 60.0 * np.sin((x + y) / 20.0 + t / 3.0 + episode)
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


def episode_data(name: str) -> list[dict]:
    """What each fixture episode holds: frames per camera, state (T, 4), action (T, 3), per-frame task."""
    episodes = AV1_EPISODES if name == "v30_av1" else IMAGE_EPISODES
    out = []
    for e, (length, tasks) in enumerate(episodes):
        rng = np.random.default_rng(100 + e)
        per_frame = [next(task for start, task in reversed(tasks) if t >= start) for t in range(length)]
        out.append({"frames": {c: np.stack([frame(t, e, i) for t in range(length)])
                               for i, c in enumerate(CAMERAS[name])},
                    "state": rng.normal(size=(length, 4)).astype(np.float32),
                    "action": rng.uniform(-1, 1, size=(length, 3)).astype(np.float32), "tasks": per_frame})
    return out


def write(name: str) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = os.path.join(HERE, name)
    shutil.rmtree(root, ignore_errors=True)
    video = name == "v30_av1"
    features = {"observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "grip"]},
                "action": {"dtype": "float32", "shape": (3,), "names": ["dx", "dy", "dz"]}}
    for c in CAMERAS[name]:
        features[f"observation.images.{c}"] = {"dtype": "video" if video else "image", "shape": (HEIGHT, WIDTH, 3),
                                               "names": ["height", "width", "channels"]}
    ds = LeRobotDataset.create(repo_id=f"gr/{name}", fps=FPS, features=features, root=root, robot_type="sim",
                               use_videos=video)
    for ep in episode_data(name):
        for t in range(len(ep["state"])):
            ds.add_frame({"observation.state": ep["state"][t], "action": ep["action"][t], "task": ep["tasks"][t],
                          **{f"observation.images.{c}": ep["frames"][c][t] for c in CAMERAS[name]}})
        ds.save_episode()
    ds.finalize()
    shutil.rmtree(os.path.join(root, "images"), ignore_errors=True)  # lerobot's temporary PNGs, if any are left


if __name__ == "__main__":
    for dataset in CAMERAS:
        write(dataset)
        print(dataset, sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(HERE, dataset))
                            for f in fs), "bytes")
