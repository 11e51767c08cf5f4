"""Meta-World env layer and scripted-demo generation: shapes, upright views, seeding, shards that read back."""

import io
import json
import tarfile

from gr.envs import TASK_INSTRUCTIONS, episode_seed, expert_episode, make_env  # first: sets MUJOCO_GL=egl

import numpy as np  # noqa: I001
import pytest

from gr.data.video_io import open_video

TASK = "coffee-button-v3"  # a default task with the shortest expert episodes (~36 steps)
SIZE = 32


def saturation(img: np.ndarray) -> float:
    """Mean max-min channel spread: ~10 on the grey backdrop, ~30-40 on the wood table and the red robot."""
    return float((img.max(-1).astype(int) - img.min(-1)).mean())


def vertical_shift(before: np.ndarray, after: np.ndarray, max_shift: int = 6) -> int:
    """Rows by which the content of `after` lies below that of `before` (best match of grey images)."""
    a, b, h = before.astype(float).mean(-1), after.astype(float).mean(-1), before.shape[0]
    err = {d: np.mean((a[max(0, -d):h - max(0, d)] - b[max(0, d):h - max(0, -d)]) ** 2)
           for d in range(-max_shift, max_shift + 1)}
    return min(err, key=err.get)


def test_reset_and_step_shapes():
    env = make_env(TASK, seed=0, image_size=SIZE)
    obs = env.reset()
    assert sorted(obs["images"]) == ["head", "wrist"]
    for img in obs["images"].values():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert obs["raw"].shape == (39,)
    np.testing.assert_array_equal(obs["state"], obs["raw"][:4].astype(np.float32))
    assert obs["instruction"] == TASK_INSTRUCTIONS[TASK]
    action = env.expert_action(obs["raw"])
    assert action.shape == (4,) and action.dtype == np.float32 and np.abs(action).max() <= 1.0
    obs2, success, done = env.step(action)
    assert isinstance(success, bool) and isinstance(done, bool) and not done
    assert not np.array_equal(obs2["raw"], obs["raw"])
    assert env.max_steps == 500 and env.fps == 80.0


def test_views_differ_and_are_upright():
    env = make_env(TASK, seed=1, image_size=SIZE)
    obs = env.reset()
    head, wrist = obs["images"]["head"], obs["images"]["wrist"]
    assert not np.array_equal(head, wrist)
    assert head.std() > 20 and wrist.std() > 10  # not a blank / single-colour frame
    # Head view: the grey backdrop is at the top (upside down, the table and robot would be there), and the robot
    # stands on the left (the camera looks from +x towards -x, +y, so +y is to the right; a mirror image has it right).
    assert saturation(head[: SIZE // 8]) < 20 < saturation(head[SIZE // 2:])
    robot = (head[..., 0] > 110) & (head[..., 1] < 60) & (head[..., 2] < 60)
    assert robot[:, : SIZE // 3].sum() > 5 * max(1, robot[:, -(SIZE // 3):].sum())
    # Wrist view looks down with the far side of the table up: moving the hand forward (+y) moves the scene down.
    # The right half is compared because the gripper fingers, fixed in the image, fill the left half.
    for _ in range(8):
        obs, _, _ = env.step(np.array([0.0, 1.0, 0.0, 0.0]))
    assert vertical_shift(wrist[:, SIZE // 2:], obs["images"]["wrist"][:, SIZE // 2:]) >= 2


def test_seed_reproduces_and_varies_the_layout():
    first = make_env(TASK, seed=5, image_size=SIZE).reset()
    env = make_env(TASK, seed=5, image_size=SIZE)
    again = env.reset()
    np.testing.assert_array_equal(first["raw"], again["raw"])
    for view in first["images"]:
        np.testing.assert_array_equal(first["images"][view], again["images"][view])
    later = env.reset()  # the stream continues: a new layout
    assert np.abs(later["raw"][4:7] - first["raw"][4:7]).max() > 1e-3
    np.testing.assert_array_equal(env.reset(seed=5)["raw"], first["raw"])  # reseeding goes back
    other = make_env(TASK, seed=6, image_size=SIZE).reset()
    assert np.abs(other["raw"][4:7] - first["raw"][4:7]).max() > 1e-3  # object
    assert np.abs(other["raw"][-3:] - first["raw"][-3:]).max() > 1e-3  # goal
    assert not np.array_equal(other["images"]["head"], first["images"]["head"])


def test_episode_seeds_are_stable_and_split_apart():
    assert episode_seed(0, TASK, "train", 3) == episode_seed(0, TASK, "train", 3)
    seeds = {episode_seed(0, TASK, split, i) for split in ("train", "val", "test") for i in range(20)}
    assert len(seeds) == 60
    assert episode_seed(0, TASK, "train", 0) != episode_seed(0, "drawer-close-v3", "train", 0)
    with pytest.raises(ValueError, match="split"):
        episode_seed(0, TASK, "eval", 0)


def test_unknown_task_and_camera_are_clear_errors(capsys):
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'reach-v2'.*reach-v3"):
        make_env("reach-v2", seed=0)
    with pytest.raises(ValueError, match=r"unknown \['nosuchcam'\].*corner4"):
        make_env(TASK, seed=0, image_size=SIZE, camera_names=("corner4", "nosuchcam"))
    from data_prep.metaworld_demos import main

    with pytest.raises(SystemExit):
        main(["--out", "unused", "--tasks", "reach-v2"])
    assert "unknown Meta-World task 'reach-v2'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from data_prep.metaworld_demos import main

    out = tmp_path_factory.mktemp("metaworld")
    return main(["--out", str(out), "--tasks", TASK, "--num-demos", "2", "--num-val", "1", "--image-size", str(SIZE),
                 "--workers", "1"])


def read_episodes(path: str) -> dict[str, dict]:
    episodes: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            episodes.setdefault(key, {})[field] = tar.extractfile(member).read()
    return episodes


def test_demos_summary(demos):
    c = demos["tasks"][TASK]
    assert (c["train"], c["val"], c["failures"], c["attempts"]) == (2, 1, 0, 3)
    assert demos["num_train"] == 2 and demos["num_val"] == 1
    assert demos["train_shards"].endswith("train-000000.tar") and demos["val_shards"].endswith("val-000000.tar")
    with open(demos["train_stats"]) as f:
        assert len(json.load(f)["action"]["mean"]) == 4


def test_demo_shards_read_back(demos):
    train = read_episodes(demos["train_shards"])
    assert len(train) == 2
    for key, sample in train.items():
        meta = json.loads(sample["json"])
        state, action = np.load(io.BytesIO(sample["state.npy"])), np.load(io.BytesIO(sample["action.npy"]))
        t = meta["num_frames"]
        assert state.shape == (t, 4) and action.shape == (t, 4) and np.abs(action).max() <= 1.0
        assert meta["views"] == ["head", "wrist"] and meta["instruction"] == TASK_INSTRUCTIONS[TASK]
        assert meta["task"] == TASK and meta["success_step"] == t - 1 and meta["fps"] == 80.0
        assert meta["stats"]["num_episodes"] == 2 and len(meta["stats"]["state"]["std"]) == 4
        for view in meta["views"]:
            video = open_video(sample[f"{view}.mp4"])
            assert len(video) == t and video[0].shape == (SIZE, SIZE, 3)
    val = read_episodes(demos["val_shards"])
    assert len(val) == 1 and all(key.startswith("val") for key in val)
    train_seeds = {json.loads(s["json"])["seed"] for s in train.values()}
    assert json.loads(next(iter(val.values()))["json"])["seed"] not in train_seeds


def test_recorded_steps_replay_to_success(demos):
    """Frame/state t is what was seen before action t: replaying the actions from the seed retraces the states."""
    sample = next(iter(read_episodes(demos["train_shards"]).values()))
    meta = json.loads(sample["json"])
    state, action = np.load(io.BytesIO(sample["state.npy"])), np.load(io.BytesIO(sample["action.npy"]))
    env = make_env(TASK, seed=meta["seed"], image_size=SIZE)
    obs = env.reset()
    first_head = open_video(sample["head.mp4"])[0].asnumpy()
    assert np.abs(first_head.astype(int) - obs["images"]["head"]).mean() < 8  # H.264 at crf 18
    for t in range(len(action)):
        np.testing.assert_array_equal(obs["state"], state[t])
        np.testing.assert_array_equal(env.expert_action(obs["raw"]), action[t])
        obs, success, done = env.step(action[t])
        assert success == (t == len(action) - 1)
    assert done


def test_expert_episode_stops_at_max_steps():
    env = make_env(TASK, seed=0, image_size=16, camera_names=("corner4",), max_steps=5)
    episode = expert_episode(env)
    assert not episode["success"] and episode["success_step"] is None
    assert list(episode["frames"]) == ["head"] and episode["frames"]["head"].shape == (5, 16, 16, 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="max_steps"):
        make_env(TASK, seed=0, image_size=16, max_steps=501)
