"""Robot dataset importers: LeRobot v2.1/v3.0 folders, robomimic/ALOHA HDF5 and npz folders are built here in their
real layouts, imported into robot episode shards, read back and compared with what went in."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import import_hdf5, import_lerobot, import_npz
from gr.data.video_io import encode_mp4, encode_video, get_frames, open_video, resize_center_crop

FPS = 10
LENGTHS = (6, 5)  # two episodes of different lengths, so a wrong cut shows
INSTRUCTIONS = ("pick up the red block", "push the blue cup left")


def smooth_frames(n: int, phase: int, size: int = 32) -> np.ndarray:
    """Smooth gradients (cheap for H.264). Red steps 30 per frame (time), green/blue move with `phase` (which
    episode and view), so an off-by-one cut or swapped views give a mean error far above the tolerance."""
    yy, xx = np.mgrid[0:size, 0:size]
    t = np.arange(n)[:, None, None]
    r = 20 + 2 * xx + 30 * t
    g = 30 + 3 * yy + 40 * phase + 0 * t
    b = 200 - 2 * xx - 30 * phase + 0 * t
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def make_episodes(views=("top", "wrist"), state_dim=3, action_dim=2) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"frames": {v: smooth_frames(n, 2 * i + j) for j, v in enumerate(views)},
             "state": rng.normal(size=(n, state_dim)).astype(np.float32),
             "action": rng.normal(size=(n, action_dim)).astype(np.float32),
             "instruction": INSTRUCTIONS[i]} for i, n in enumerate(LENGTHS)]


def read_shards(summary: dict) -> dict[str, dict]:
    """key -> {"meta", "state", "action", "frames": {view: decoded uint8 [T, H, W, 3]}} from the written tars."""
    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(summary["stats_file"]), "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                sample = out.setdefault(key, {"frames": {}})
                if ext == "json":
                    sample["meta"] = json.loads(data)
                elif ext.endswith(".npy"):
                    sample[ext[:-4]] = np.load(io.BytesIO(data))
                elif ext.endswith(".mp4"):
                    vr = open_video(data)
                    sample["frames"][ext[:-4]] = get_frames(vr, range(len(vr)))
    return out


def check_import(summary: dict, episodes: list[dict], keys: list[str], views: list[str]) -> dict[str, dict]:
    """Every episode comes back with its views, frames (within H.264 error), state, action, instruction and the
    dataset statistics; returns the decoded samples."""
    got = read_shards(summary)
    assert sorted(got) == sorted(keys)
    assert summary["episodes"] == len(episodes) and summary["views"] == sorted(views)
    assert summary["frames"] == sum(len(ep["state"]) for ep in episodes)
    for key, ep in zip(keys, episodes):
        sample = got[key]
        assert sample["meta"]["views"] == sorted(views) and sorted(sample["frames"]) == sorted(views)
        assert sample["meta"]["instruction"] == ep["instruction"]
        assert sample["meta"]["num_frames"] == len(ep["state"])
        np.testing.assert_array_equal(sample["state"], ep["state"])
        np.testing.assert_array_equal(sample["action"], ep["action"])
        for view in views:
            decoded, expected = sample["frames"][view].astype(float), ep["frames"][view].astype(float)
            assert decoded.shape == expected.shape, (key, view)
            assert np.abs(decoded - expected).mean(axis=(1, 2, 3)).max() < 8, (key, view)
    with open(summary["stats_file"]) as f:
        stats_file = json.load(f)
    for name in ("state", "action"):
        x = np.concatenate([ep[name] for ep in episodes]).astype(np.float64)
        for block in [stats_file[name]] + [s["meta"]["stats"][name] for s in got.values()]:
            for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
                np.testing.assert_allclose(block[stat], fn(x, axis=0), rtol=1e-6, atol=1e-9, err_msg=stat)
    return got


def expect_error(main, argv: list[str], capsys, *needles: str) -> None:
    """The CLI exits with status 2 and a message naming every needle (file, key); no partial shard is left."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    out = argv[argv.index("--out") + 1]
    assert not glob.glob(os.path.join(out, "*.partial")) and not glob.glob(os.path.join(out, "*.tar"))


# ----------------------------------------------------------------------------------------------------- LeRobot


def _features(views, state_dim=3, action_dim=2, codec="h264") -> dict:
    feats = {"observation.state": {"dtype": "float32", "shape": [state_dim], "names": None},
             "action": {"dtype": "float32", "shape": [action_dim], "names": None}}
    for v in views:
        feats[f"observation.images.{v}"] = {
            "dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"],
            "info": {"video.fps": float(FPS), "video.height": 32, "video.width": 32, "video.codec": codec,
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "has_audio": False}}
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        feats[k] = {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
    return feats


def _data_table(episodes: list[dict], first_index: int = 0, first_episode: int = 0) -> pa.Table:
    """LeRobot data rows; the state is a fixed-size list column, the action a plain list (both occur)."""
    cols = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index", "task_index")}
    for i, ep in enumerate(episodes):
        n = len(ep["state"])
        cols["observation.state"] += ep["state"].tolist()
        cols["action"] += ep["action"].tolist()
        cols["timestamp"] += (np.arange(n, dtype=np.float32) / FPS).tolist()
        cols["frame_index"] += list(range(n))
        cols["episode_index"] += [first_episode + i] * n
        cols["task_index"] += [first_episode + i] * n
    dim = episodes[0]["state"].shape[1]
    return pa.table({"observation.state": pa.array(cols["observation.state"], pa.list_(pa.float32(), dim)),
                     "action": pa.array(cols["action"], pa.list_(pa.float32())),
                     "timestamp": pa.array(cols["timestamp"], pa.float32()),
                     "frame_index": cols["frame_index"], "episode_index": cols["episode_index"],
                     "index": list(range(first_index, first_index + len(cols["timestamp"]))),
                     "task_index": cols["task_index"]})


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_lerobot_v21(root: str, episodes: list[dict]) -> None:
    views = sorted(episodes[0]["frames"]) if episodes else ["top"]
    info = {"codebase_version": "v2.1", "robot_type": "test_arm", "total_episodes": len(episodes),
            "total_frames": sum(len(ep["state"]) for ep in episodes), "total_tasks": len(episodes),
            "chunks_size": 1000, "fps": FPS, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": _features(views)}
    _write(os.path.join(root, "meta", "info.json"), json.dumps(info))
    _write(os.path.join(root, "meta", "episodes.jsonl"), "".join(
        json.dumps({"episode_index": i, "tasks": [ep["instruction"]], "length": len(ep["state"])}) + "\n"
        for i, ep in enumerate(episodes)))
    _write(os.path.join(root, "meta", "tasks.jsonl"), "".join(
        json.dumps({"task_index": i, "task": ep["instruction"]}) + "\n" for i, ep in enumerate(episodes)))
    start = 0
    for i, ep in enumerate(episodes):
        path = os.path.join(root, "data", "chunk-000", f"episode_{i:06d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(_data_table([ep], start, i), path)
        start += len(ep["state"])
        for view, frames in ep["frames"].items():
            _write(os.path.join(root, "videos", "chunk-000", f"observation.images.{view}", f"episode_{i:06d}.mp4"),
                   encode_mp4(frames, FPS))


def write_lerobot_v30(root: str, episodes: list[dict], codec: str = "h264") -> None:
    """Every episode in one data parquet and one mp4 per camera, as LeRobot v3.0 packs them; `codec` "av1" encodes
    the videos as LeRobot does by default (libsvtav1)."""
    views = sorted(episodes[0]["frames"])
    info = {"codebase_version": "v3.0", "robot_type": "test_arm", "total_episodes": len(episodes),
            "total_frames": sum(len(ep["state"]) for ep in episodes), "total_tasks": len(episodes),
            "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": FPS,
            "splits": {"train": f"0:{len(episodes)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _features(views, codec=codec)}
    _write(os.path.join(root, "meta", "info.json"), json.dumps(info))
    os.makedirs(os.path.join(root, "data", "chunk-000"))
    pq.write_table(_data_table(episodes), os.path.join(root, "data", "chunk-000", "file-000.parquet"))
    for view in views:
        _write(os.path.join(root, "videos", f"observation.images.{view}", "chunk-000", "file-000.mp4"),
               encode_video(np.concatenate([ep["frames"][view] for ep in episodes]), FPS,
                            {"h264": "libx264", "av1": "libsvtav1"}[codec]))
    rows, start = [], 0
    for i, ep in enumerate(episodes):
        n = len(ep["state"])
        row = {"episode_index": i, "tasks": [ep["instruction"]], "length": n, "data/chunk_index": 0,
               "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + n,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
               "stats/action/mean": ep["action"].mean(0).tolist()}
        for view in views:
            row.update({f"videos/observation.images.{view}/chunk_index": 0,
                        f"videos/observation.images.{view}/file_index": 0,
                        f"videos/observation.images.{view}/from_timestamp": start / FPS,
                        f"videos/observation.images.{view}/to_timestamp": (start + n) / FPS})
        rows.append(row)
        start += n
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"))
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))
    tasks = pd.DataFrame({"task_index": range(len(episodes))},
                         index=pd.Index([ep["instruction"] for ep in episodes], name="task"))
    tasks.to_parquet(os.path.join(root, "meta", "tasks.parquet"))


@pytest.mark.parametrize("writer", [write_lerobot_v21, write_lerobot_v30], ids=["v2.1", "v3.0"])
def test_lerobot_dataset_round_trip(tmp_path, writer):
    episodes = make_episodes()
    writer(str(tmp_path / "ds"), episodes)
    summary = import_lerobot.main(["--root", str(tmp_path / "ds"), "--out", str(tmp_path / "out")])
    got = check_import(summary, episodes, ["episode_000000", "episode_000001"], ["top", "wrist"])
    assert got["episode_000001"]["meta"]["fps"] == FPS and got["episode_000001"]["meta"]["episode_index"] == 1


def test_lerobot_v3_subset_camera_and_resize(tmp_path):  # 40 px: decord misdecodes some widths (16, 24, 48)
    episodes = make_episodes()
    write_lerobot_v30(str(tmp_path / "ds"), episodes)
    summary = import_lerobot.main(["--root", str(tmp_path / "ds"), "--out", str(tmp_path / "out"),
                                   "--episodes", "1", "--cameras", "wrist", "--image-size", "40"])
    ep = dict(episodes[1], frames={"wrist": resize_center_crop(episodes[1]["frames"]["wrist"], 40)})
    check_import(summary, [ep], ["episode_000001"], ["wrist"])


@pytest.mark.parametrize("writer", [write_lerobot_v21, write_lerobot_v30], ids=["v2.1", "v3.0"])
def test_lerobot_errors_name_file_and_key(tmp_path, writer, capsys):
    writer(str(tmp_path / "ds"), make_episodes())
    argv = ["--root", str(tmp_path / "ds"), "--out", str(tmp_path / "out")]
    expect_error(import_lerobot.main, argv + ["--cameras", "top,observation.images.side"], capsys,
                 os.path.join("meta", "info.json"), "'observation.images.side'")
    expect_error(import_lerobot.main, argv + ["--state-key", "observation.joints"], capsys,
                 os.path.join("meta", "info.json"), "'observation.joints'")
    expect_error(import_lerobot.main, argv + ["--episodes", "0,7"], capsys, "episode(s) [7]")


def test_lerobot_empty_dataset(tmp_path, capsys):
    write_lerobot_v21(str(tmp_path / "ds"), [])
    expect_error(import_lerobot.main, ["--root", str(tmp_path / "ds"), "--out", str(tmp_path / "out")], capsys,
                 os.path.join("meta", "episodes.jsonl"), "no episodes")


# -------------------------------------------------------------------------------------------------------- HDF5

ROBOMIMIC_STATE = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def write_robomimic(path: str, episodes: list[dict], problem_info: bool = True, short_action: int = -1) -> None:
    """robomimic layout; the state of each episode is split into the three robot0_* obs keys (3 + 4 + 2 dims).
    `short_action`: index of a demo whose actions lose their last step."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        env_args = {"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {"control_freq": FPS}}
        data.attrs["env_args"] = json.dumps(env_args)
        if problem_info:
            data.attrs["problem_info"] = json.dumps({"language_instruction": INSTRUCTIONS[0]})
        for i, ep in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=ep["action"][:-1] if i == short_action else ep["action"])
            demo.attrs["num_samples"] = len(ep["action"])
            for view, frames in ep["frames"].items():
                demo.create_dataset(f"obs/{view}_image", data=frames)
            start = 0
            for key, dim in ROBOMIMIC_STATE.items():
                demo.create_dataset(f"obs/{key}", data=ep["state"][:, start:start + dim])
                start += dim
            demo.create_dataset("obs/object", data=np.zeros((len(ep["state"]), 10)))


def test_robomimic_round_trip(tmp_path):
    episodes = make_episodes(views=("agentview", "robot0_eye_in_hand"), state_dim=9, action_dim=7)
    write_robomimic(str(tmp_path / "image.hdf5"), episodes)
    summary = import_hdf5.main(["--input", str(tmp_path / "image.hdf5"), "--out", str(tmp_path / "out"),
                                "--instruction", "ignored: the file has its own"])
    for ep in episodes:
        ep["instruction"] = INSTRUCTIONS[0]  # problem_info.language_instruction, for every demo
    check_import(summary, episodes, ["image_demo_0", "image_demo_1"], ["agentview", "robot0_eye_in_hand"])


def test_robomimic_state_key_order_and_instruction_fallbacks(tmp_path):
    episodes = make_episodes(views=("agentview",), state_dim=9, action_dim=7)
    write_robomimic(str(tmp_path / "low.hdf5"), episodes, problem_info=False)
    summary = import_hdf5.main(["--input", str(tmp_path / "low.hdf5"), "--out", str(tmp_path / "out"),
                                "--layout", "robomimic", "--state-keys", "robot0_gripper_qpos,robot0_eef_pos",
                                "--instruction", "put the can in the bin"])
    for ep in episodes:  # gripper (dims 7:9) first, then position (0:3); the quaternion is left out
        ep["state"] = np.concatenate([ep["state"][:, 7:9], ep["state"][:, 0:3]], 1)
        ep["instruction"] = "put the can in the bin"
    check_import(summary, episodes, ["low_demo_0", "low_demo_1"], ["agentview"])
    args = import_hdf5.build_parser().parse_args(["--input", "x", "--out", "y"])
    args.state_keys = None
    with h5py.File(tmp_path / "low.hdf5", "r") as f:  # no --instruction either: the environment name
        ep, _ = import_hdf5.robomimic_episode(f, "low.hdf5", "demo_0", args)
    assert ep.instruction == "pick place can" and ep.fps == FPS


def write_aloha(folder: str, episodes: list[dict]) -> None:
    """One file per episode; episode 1 is a compressed recording (JPEG rows) with its own instruction."""
    from PIL import Image

    os.makedirs(folder)
    for i, ep in enumerate(episodes):
        with h5py.File(os.path.join(folder, f"episode_{i}.hdf5"), "w") as f:
            f.attrs["sim"] = False
            f.create_dataset("observations/qpos", data=ep["state"])
            f.create_dataset("observations/qvel", data=np.zeros_like(ep["state"]))
            f.create_dataset("action", data=ep["action"])
            for view, frames in ep["frames"].items():
                if i == 0:
                    f.create_dataset(f"observations/images/{view}", data=frames)
                    continue
                jpegs = []
                for frame in frames:
                    buf = io.BytesIO()
                    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
                    jpegs.append(np.frombuffer(buf.getvalue(), np.uint8))
                padded = np.zeros((len(jpegs), max(map(len, jpegs)) + 16), np.uint8)
                for row, jpeg in zip(padded, jpegs):
                    row[:len(jpeg)] = jpeg
                f.create_dataset(f"observations/images/{view}", data=padded)
            if i == 1:
                f.attrs["compress"] = True
                f.attrs["language_instruction"] = ep["instruction"]


def test_aloha_round_trip(tmp_path, capsys):
    episodes = make_episodes(views=("cam_high", "cam_left_wrist"), state_dim=14, action_dim=14)
    write_aloha(str(tmp_path / "aloha"), episodes)
    argv = ["--input", str(tmp_path / "aloha"), "--out", str(tmp_path / "out")]
    expect_error(import_hdf5.main, argv, capsys, "episode_0.hdf5", "language_instruction", "--instruction")
    summary = import_hdf5.main(argv + ["--instruction", INSTRUCTIONS[0]])
    got = check_import(summary, episodes, ["episode_0", "episode_1"], ["cam_high", "cam_left_wrist"])
    assert got["episode_0"]["meta"]["fps"] == 50.0


def test_hdf5_errors_name_file_and_key(tmp_path, capsys):
    episodes = make_episodes(views=("agentview",), state_dim=9, action_dim=7)
    write_robomimic(str(tmp_path / "bad.hdf5"), episodes, short_action=1)
    argv = ["--input", str(tmp_path / "bad.hdf5"), "--out", str(tmp_path / "out")]
    expect_error(import_hdf5.main, argv, capsys, "bad.hdf5", "data/demo_1", "'actions' has 4", "'obs/agentview_image'")
    expect_error(import_hdf5.main, argv + ["--cameras", "agentview,sideview"], capsys,
                 "bad.hdf5: data/demo_0/obs", "'sideview_image'")
    expect_error(import_hdf5.main, argv + ["--layout", "aloha"], capsys, "bad.hdf5", "'observations'")
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("data")
    expect_error(import_hdf5.main, ["--input", str(tmp_path / "empty.hdf5"), "--out", str(tmp_path / "out")], capsys,
                 "empty.hdf5", "no demos under 'data'")
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    expect_error(import_hdf5.main, ["--input", str(tmp_path / "junk.hdf5"), "--out", str(tmp_path / "out")], capsys,
                 "junk.hdf5: not a readable HDF5 file")
    os.makedirs(tmp_path / "no_files")
    expect_error(import_hdf5.main, ["--input", str(tmp_path / "no_files"), "--out", str(tmp_path / "out")], capsys,
                 "no_files", "no .hdf5 files")


# --------------------------------------------------------------------------------------------------------- npz


def write_npz_folder(folder: str, episodes: list[dict], short_action: int = -1) -> None:
    """Episode 0 keeps its images and instruction in the npz; episode 1 has sibling mp4s and no instruction."""
    os.makedirs(folder)
    for i, ep in enumerate(episodes):
        arrays = {"state": ep["state"], "action": ep["action"][:-1] if i == short_action else ep["action"]}
        if i == 0:
            arrays["instruction"] = np.array(ep["instruction"])
            arrays.update({f"images_{v}": x for v, x in ep["frames"].items()})
        else:
            for view, frames in ep["frames"].items():
                _write(os.path.join(folder, f"episode_{i}.{view}.mp4"), encode_mp4(frames, FPS))
        np.savez(os.path.join(folder, f"episode_{i}.npz"), **arrays)


def test_npz_folder_round_trip(tmp_path):
    episodes = make_episodes()
    write_npz_folder(str(tmp_path / "eps"), episodes)
    summary = import_npz.main(["--input", str(tmp_path / "eps"), "--out", str(tmp_path / "out"), "--per-shard", "1",
                               "--instruction", INSTRUCTIONS[1]])
    assert summary["shards"].endswith("train-{000000..000001}.tar")
    got = check_import(summary, episodes, ["episode_0", "episode_1"], ["top", "wrist"])
    assert got["episode_1"]["meta"]["fps"] == FPS


def test_npz_errors_name_file_and_key(tmp_path, capsys):
    write_npz_folder(str(tmp_path / "eps"), make_episodes(), short_action=0)
    argv = ["--input", str(tmp_path / "eps"), "--out", str(tmp_path / "out"), "--instruction", "x"]
    expect_error(import_npz.main, argv, capsys, "episode_0.npz", "'state' has 6", "'action' has 5")
    expect_error(import_npz.main, argv + ["--cameras", "top,side"], capsys, "episode_0.npz", "'images_side'")
    os.makedirs(tmp_path / "none")
    expect_error(import_npz.main, ["--input", str(tmp_path / "none"), "--out", str(tmp_path / "out")], capsys,
                 "none", "no episode_*.npz files")


@pytest.mark.parametrize("module, option", [(import_lerobot, "--state-key"), (import_hdf5, "--layout"),
                                            (import_npz, "--fps")])
def test_help(module, option, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert option in out and "--image-size" in out and "--per-shard" in out
