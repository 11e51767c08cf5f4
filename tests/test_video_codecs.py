"""Videos decord cannot open (AV1, LeRobot's default codec) are read with PyAV (gr/data/pyav_reader.py), through the
same `open_video` every reader uses; VP9 and H.264 stay with decord. Clips are made here with PyAV's encoders."""

import json

import numpy as np
import pytest

from data_prep import import_lerobot
from gr.config import ClipSpec
from gr.data.frames import FrameStream
from gr.data.pyav_reader import PyAVVideo
from gr.data.shards import ClipStream
from gr.data.video_io import VideoDecodeError, encode_video, get_frames, open_video
from tests.test_data import _tar_with
from tests.test_importers import check_import, make_episodes, write_lerobot_v30

CODECS = {"av1": ("libsvtav1", "mp4"), "vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}


def moving_frames(n: int, size: int = 32) -> np.ndarray:
    """Gradients that shift by 37 and 11 levels a frame: neighbouring frames differ by far more than codec error."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([np.stack([(2 * yy + 37 * t) % 200 + 20, (2 * xx + 11 * t) % 200 + 20, np.full_like(xx, 100)], -1)
                     for t in range(n)]).astype(np.uint8)


def assert_right_frames(got: np.ndarray, frames: np.ndarray, indices) -> None:
    """Each decoded frame is nearest to the encoded frame it was asked for (among its 20 neighbours either side), and
    within codec error of it (measured at 32 px, crf 18: at most 10.2 for AV1, 7.3 for VP9 and H.264)."""
    for g, i in zip(got.astype(float), indices):
        lo = max(0, i - 20)
        err = np.abs(g[None] - frames[lo:i + 21].astype(float)).mean(axis=(1, 2, 3))
        assert lo + int(err.argmin()) == i, f"frame {i} decoded as frame {lo + int(err.argmin())}"
        assert err[i - lo] < 12


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    frames = moving_frames(60)
    return {name: encode_video(frames, 10.0, codec, container) for name, (codec, container) in CODECS.items()}


@pytest.mark.parametrize("sandbox", [False, True], ids=["in-process", "sandboxed"])
@pytest.mark.parametrize("name", list(CODECS))
def test_every_codec_decodes_to_the_encoded_frames(clips, name, sandbox):
    vr = open_video(clips[name], sandbox=sandbox)
    assert len(vr) == 60 and vr.get_avg_fps() == pytest.approx(10.0)
    frames = get_frames(vr, range(60))
    assert_right_frames(frames, moving_frames(60), range(60))
    picked = get_frames(vr, [47, 3, 48])  # out of order, after a seek
    np.testing.assert_array_equal(picked, frames[[47, 3, 48]])
    np.testing.assert_array_equal(vr[5].asnumpy(), frames[5])


def test_only_the_streams_decord_cannot_open_go_to_pyav(clips):
    assert isinstance(open_video(clips["av1"], sandbox=False), PyAVVideo)
    assert not isinstance(open_video(clips["vp9"], sandbox=False), PyAVVideo)
    assert not isinstance(open_video(clips["h264"], sandbox=False), PyAVVideo)


def test_a_long_av1_file_seeks_to_late_frames(tmp_path):
    frames = moving_frames(400)
    path = tmp_path / "long.mp4"
    path.write_bytes(encode_video(frames, 10.0, "libsvtav1"))
    vr = open_video(str(path), sandbox=False)  # a path, as the LeRobot importer opens files
    assert len(vr) == 400
    got = get_frames(vr, [390, 391, 12])
    assert_right_frames(got, frames, [390, 391, 12])


def test_unreadable_input_names_both_decoders():
    with pytest.raises(VideoDecodeError, match=r"cannot open video: .*\(PyAV: "):
        open_video(b"\x00" * 300, sandbox=False)
    vr = open_video(encode_video(moving_frames(4), 10.0, "libsvtav1"), sandbox=False)
    with pytest.raises(VideoDecodeError, match="out of range"):
        get_frames(vr, [4])


def test_text_video_and_tokenizer_frame_shards_take_av1_and_vp9(clips, tmp_path):
    cap = lambda c: json.dumps({"caption": c}).encode()  # noqa: E731
    path = _tar_with(tmp_path, "codecs.tar", {"a.mp4": clips["av1"], "a.json": cap("av1"),
                                              "b.mp4": clips["vp9"], "b.json": cap("vp9")})
    clip = ClipSpec(num_history=2, future_frame_offset=1, fps=10.0, image_size=32)
    out = list(ClipStream([path], clip, shuffle=False))
    assert [s["caption"] for s in out] == ["av1", "vp9"] and all(s["num_skipped"] == 0 for s in out)
    assert all(tuple(s["frames"].shape) == (3, 32, 32, 3) for s in out)
    frames = list(FrameStream([([path], 1.0, None, "codecs")], image_size=32, frames_per_video=3, endless=False,
                              shuffle_buffer=1))
    assert len(frames) == 6 and {f["key"].split(".")[-1].split("#")[0] for f in frames} == {"mp4"}


def test_lerobot_v3_dataset_with_av1_videos_imports(tmp_path):
    """LeRobot v3.0's default: one AV1 (libsvtav1) mp4 per camera holding every episode, info.json says av1."""
    episodes = make_episodes()
    write_lerobot_v30(str(tmp_path / "ds"), episodes, codec="av1")
    info = json.load(open(tmp_path / "ds" / "meta" / "info.json"))
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"
    summary = import_lerobot.main(["--root", str(tmp_path / "ds"), "--out", str(tmp_path / "out")])
    check_import(summary, episodes, ["episode_000000", "episode_000001"], ["top", "wrist"])
