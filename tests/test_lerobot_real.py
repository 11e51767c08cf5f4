"""LeRobot round trip with datasets written by the real `lerobot` 0.4.4 library (tests/artifacts/lerobot, made by
make_lerobot_fixtures.py there): AV1 video in lerobot's default encoding, an episode with two tasks, an image-only
dataset; and a failed import leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from data_prep import import_lerobot
from tests.artifacts.lerobot.make_lerobot_fixtures import CAMERAS, episode_data
from tests.test_importers import read_shards

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts", "lerobot")


def _import(name: str, out, *extra: str) -> tuple[dict, dict]:
    summary = import_lerobot.main(["--root", os.path.join(FIXTURES, name), "--out", str(out), *extra])
    return summary, read_shards(summary)


def _check(sample: dict, ep: dict, a: int, b: int, cameras: list[str], max_mae: float) -> None:
    assert sample["meta"]["num_frames"] == b - a
    np.testing.assert_array_equal(sample["state"], ep["state"][a:b])  # bit-identical
    np.testing.assert_array_equal(sample["action"], ep["action"][a:b])
    assert sorted(sample["frames"]) == sorted(cameras)
    for cam in cameras:
        got, want = sample["frames"][cam].astype(float), ep["frames"][cam][a:b].astype(float)
        assert got.shape == want.shape
        assert np.abs(got - want).mean(axis=(1, 2, 3)).max() < max_mae, cam


def test_real_lerobot_av1_dataset_imports_with_per_frame_tasks(tmp_path):
    info = json.load(open(os.path.join(FIXTURES, "v30_av1", "meta", "info.json")))
    assert info["codebase_version"] == "v3.0"
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"  # lerobot's default
    summary, got = _import("v30_av1", tmp_path / "out")
    eps = episode_data("v30_av1")
    # Episode 1 has two tasks: split at the frame where lerobot recorded the change, each part with its own task.
    assert sorted(got) == ["episode_000000", "episode_000001_part00", "episode_000001_part01", "episode_000002"]
    assert summary["episodes"] == 4 and summary["frames"] == sum(len(e["state"]) for e in eps)
    assert summary["views"] == sorted(CAMERAS["v30_av1"])
    parts = {"episode_000000": (0, 0, 12), "episode_000001_part00": (1, 0, 8), "episode_000001_part01": (1, 8, 20),
             "episode_000002": (2, 0, 9)}
    for key, (e, a, b) in parts.items():
        sample = got[key]
        assert sample["meta"]["instruction"] == eps[e]["tasks"][a]
        assert set(eps[e]["tasks"][a:b]) == {sample["meta"]["instruction"]}
        _check(sample, eps[e], a, b, CAMERAS["v30_av1"], max_mae=7)
    meta = got["episode_000001_part01"]["meta"]
    assert meta["frame_range"] == [8, 20] and meta["episode_index"] == 1 and meta["segment"] == 1
    assert meta["tasks_in_episode"] == ["pick up the cube", "place it in the bowl"]


def test_episode_task_list_order_does_not_change_the_instructions(tmp_path):
    """lerobot writes an episode's `tasks` as list(set(...)): its order depends on the writer's hash seed. Reversing it
    must not change what is imported."""
    import pandas as pd

    root = tmp_path / "reordered"
    shutil.copytree(os.path.join(FIXTURES, "v30_av1"), root)
    meta = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    df = pd.read_parquet(meta)
    assert len(df.loc[1, "tasks"]) == 2
    df.at[1, "tasks"] = list(reversed(list(df.loc[1, "tasks"])))
    df.to_parquet(meta)
    _, a = _import("v30_av1", tmp_path / "a")
    b = read_shards(import_lerobot.main(["--root", str(root), "--out", str(tmp_path / "b")]))
    assert {k: v["meta"]["instruction"] for k, v in a.items()} == {k: v["meta"]["instruction"] for k, v in b.items()}


def test_real_lerobot_image_only_dataset_imports(tmp_path):
    info = json.load(open(os.path.join(FIXTURES, "v30_images", "meta", "info.json")))
    assert info["features"]["observation.images.front"]["dtype"] == "image"  # use_videos=False
    summary, got = _import("v30_images", tmp_path / "out")
    eps = episode_data("v30_images")
    assert sorted(got) == ["episode_000000", "episode_000001"] and summary["views"] == ["front"]
    for key, ep in zip(sorted(got), eps):
        assert got[key]["meta"]["instruction"] == ep["tasks"][0]
        _check(got[key], ep, 0, len(ep["state"]), ["front"], max_mae=4)  # PNG in, H.264 out


def test_failed_import_leaves_nothing(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(FIXTURES, "v30_av1"), broken)
    # The last episode's metadata disagrees with its data: episodes 0 and 1 are written (one shard each) first.
    import pandas as pd

    meta = broken / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    df = pd.read_parquet(meta)
    df.loc[df["episode_index"] == 2, "length"] = 99
    df.to_parquet(meta)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        import_lerobot.main(["--root", str(broken), "--out", str(out), "--per-shard", "1"])
    assert info.value.code == 2 and "episode 2 has 9 rows but" in capsys.readouterr().err
    assert not out.exists()  # the folder this run created is gone with every shard it wrote
    # Into a folder holding an earlier, good import with the same prefix: that import survives byte for byte.
    kept = tmp_path / "kept"
    import_lerobot.main(["--root", os.path.join(FIXTURES, "v30_images"), "--out", str(kept), "--per-shard", "1"])
    (kept / "notes.txt").write_text("mine")
    earlier = {name: (kept / name).read_bytes() for name in os.listdir(kept)}
    assert "train-000000.tar" in earlier and "train-stats.json" in earlier
    with pytest.raises(SystemExit):
        import_lerobot.main(["--root", str(broken), "--out", str(kept), "--per-shard", "1"])
    assert {name: (kept / name).read_bytes() for name in os.listdir(kept)} == earlier
