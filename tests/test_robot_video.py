"""Action-free Meta-World video for pretraining (data_prep/metaworld_videos.py): text-video shards that the clip
loader and the pre-tokenizer read like web video, with no action or state anywhere."""

import io
import json
import tarfile

from gr.envs import TASK_INSTRUCTIONS, episode_seed  # first: sets MUJOCO_GL=egl

import numpy as np  # noqa: I001
import pytest

from data_prep.metaworld_videos import main
from data_prep.tokenize_shards import run as tokenize
from gr.config import ClipSpec
from gr.data.shards import ClipStream, expand_urls
from tests.test_metaworld import SIZE, TASK, read_episodes
from tests.test_pretokenized import tiny_vqgan  # noqa: F401  (a pytest fixture)

EXCLUDED = "drawer-close-v3"
VIEWS = ["head", "wrist"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("metaworld_video")
    return main(["--out", str(out), "--tasks", TASK, EXCLUDED, "--exclude-tasks", EXCLUDED,
                 "--episodes-per-task", "2", "--num-val", "1", "--image-size", str(SIZE), "--workers", "1"])


def all_samples(videos) -> dict[str, dict]:
    return {**read_episodes(videos["train_shards"]), **read_episodes(videos["val_shards"])}


def test_one_text_video_clip_per_view_and_episode(videos):
    assert videos["included_tasks"] == [TASK] and videos["excluded_tasks"] == [EXCLUDED]
    assert EXCLUDED not in videos["tasks"] and videos["views"] == VIEWS
    c = videos["tasks"][TASK]
    assert (c["train"], c["val"], c["failures"], c["attempts"]) == (2, 1, 0, 3)
    assert videos["num_train_clips"] == 4 and videos["num_val_clips"] == 2
    samples = all_samples(videos)
    assert sorted(samples) == sorted(f"{split}_{TASK}_{i:06d}_{view}" for split, n in (("train", 2), ("val", 1))
                                     for i in range(n) for view in VIEWS)
    for key, sample in samples.items():
        assert sorted(sample) == ["json", "mp4"]  # no action.npy / state.npy, no per-view robot members
        meta = json.loads(sample["json"])
        assert not [name for name in meta if "action" in name or "state" in name]
        assert meta["caption"] == TASK_INSTRUCTIONS[TASK] and meta["source"] == "metaworld"
        assert meta["task"] == TASK and key.endswith(meta["view"]) and meta["fps"] == 80.0
        # Layouts come from the "train"/"val" streams of base seed 1, never metaworld_demos' 0 or the "test" stream.
        assert meta["seed"] == episode_seed(1, TASK, meta["split"], meta["attempt"])
    seeds = {json.loads(s["json"])["seed"] for s in samples.values()}
    assert len(seeds) == 3  # the two views of an episode share its seed; episodes differ


def test_views_of_an_episode_differ(videos):
    from gr.data.video_io import open_video

    samples = read_episodes(videos["train_shards"])
    key = f"train_{TASK}_000000"
    head, wrist = (open_video(samples[f"{key}_{view}"]["mp4"]) for view in VIEWS)
    assert len(head) == len(wrist) == json.loads(samples[f"{key}_head"]["json"])["num_frames"]
    assert head[0].shape == (SIZE, SIZE, 3)
    assert np.abs(head[0].asnumpy().astype(int) - wrist[0].asnumpy()).mean() > 10


def test_clip_stream_reads_the_shards(videos):
    clip = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=SIZE)
    urls = expand_urls(videos["train_shards"], "train_shards")
    items = list(ClipStream(urls, clip, shuffle=False))
    assert len(items) == 4 and not any(item["num_skipped"] for item in items)
    for item in items:
        assert item["frames"].shape == (clip.span, SIZE, SIZE, 3) and item["caption"] == TASK_INSTRUCTIONS[TASK]


def test_tokenize_shards_reads_the_shards(videos, tiny_vqgan, tmp_path):  # noqa: F811
    report = tokenize([videos["train_shards"]], str(tmp_path / "tok"), tiny_vqgan[0], tiny_vqgan[1],
                      image_size=SIZE)
    num_frames = [json.loads(s["json"])["num_frames"] for s in read_episodes(videos["train_shards"]).values()]
    assert report["samples"] == 4 and not report["skipped"] and report["frames"] == sum(num_frames)
    with tarfile.open(expand_urls(report["pattern"], "pattern")[0]) as tar:
        codes = np.load(io.BytesIO(tar.extractfile(f"train_{TASK}_000000_head.tokens.npy").read()))
        meta = json.loads(tar.extractfile(f"train_{TASK}_000000_head.json").read())
    assert codes.shape == (meta["num_frames"], 4, 4) and meta["tokens"]["codebook_size"] == 64


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "reach-v2"], "--tasks: unknown Meta-World task 'reach-v2'"),
    (["--exclude-tasks", "reach-v2"], "--exclude-tasks: unknown Meta-World task 'reach-v2'"),
    (["--tasks", TASK, "--episodes-per-task", "0"], "--episodes-per-task must be >= 1"),
    (["--tasks", TASK, "--exclude-tasks", TASK], "--exclude-tasks leaves no task"),
    (["--tasks", TASK, "--views", "head", "top"], "--views: unknown view 'top'"),
])
def test_bad_options_stop_with_one_line_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["--out", "unused"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not [line for line in err if "Traceback" in line]
