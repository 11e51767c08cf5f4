"""`gr rollout --source`: any video file decord or PyAV opens, a folder of them with sidecar captions, and
pre-tokenized shards (text-video and robot), whose ground truth is the VQGAN decode and is labelled so."""

import json
import re

import numpy as np
import pytest
import torch

from data_prep.tokenize_shards import run as tokenize
from gr.data.video_io import encode_video
from gr.encoders import save_taming_vqgan
from gr.rollout import main, module_from_checkpoint
from gr.training.finetune import FinetuneModule
from tests.conftest import TINY_ROBOT_MODEL, module_init_args
from tests.test_rollout import _save, pre_ckpt  # noqa: F401 - the fixture is used by name

# (file name, PyAV encoder, container): the formats a lab's footage comes in; MPEG-2 and MS-MPEG4 AVI were the
# ones that failed before, AV1 is what decord cannot open at all (PyAV reads it).
FORMATS = [("a.avi", "msmpeg4v2", "avi"), ("b.mpg", "mpeg2video", "mpeg"), ("c.mov", "libx264", "mov"),
           ("d.mkv", "libx264", "matroska"), ("e.webm", "libvpx-vp9", "webm"), ("f.mp4", "libsvtav1", "mp4"),
           ("g.m4v", "mpeg4", "mp4")]


def _frames(seed: int, n: int = 8) -> np.ndarray:
    """A bright square moving over a gradient: enough structure that a wrong frame order would show."""
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.stack([np.stack([4 * yy, 4 * xx, np.full_like(xx, 60 + 20 * seed)], -1) for _ in range(n)])
    for t in range(n):
        out[t, 8:16, 2 + 3 * t:10 + 3 * t] = 255
    return out.astype(np.uint8)


def test_every_container_and_codec_rolls_out_from_a_folder_with_sidecar_captions(pre_ckpt, tmp_path):
    folder = tmp_path / "footage"
    folder.mkdir()
    for i, (name, codec, container) in enumerate(FORMATS):
        (folder / name).write_bytes(encode_video(_frames(i), 8.0, codec, container))
        stem = name.split(".")[0]
        if i % 2:
            (folder / f"{stem}.json").write_text(json.dumps({"caption": f"clip {stem} from json"}))
        else:
            (folder / f"{stem}.txt").write_text(f"clip {stem} from txt\n")
    (folder / "notes.md").write_text("not a video")  # other files in the folder are left alone
    report = main(["--checkpoint", pre_ckpt, "--source", str(folder), "--num-samples", str(len(FORMATS)),
                   "--num-frames", "3", "--out", str(tmp_path / "ro")])
    assert [s["key"] for s in report["samples"]] == [f[0] for f in FORMATS]
    assert report["samples"][0]["caption"] == "clip a from txt" and report["samples"][1]["caption"] == "clip b from json"
    assert report["ground_truth"] == "raw"
    # the frames really are the clip's: copying the last seen frame scores like a moving square, never garbage
    for s in report["samples"]:
        assert 12 < s["metrics"]["psnr_copy_last"][0] < 40


def test_a_single_file_takes_caption_from_the_flag_or_its_sidecar(pre_ckpt, tmp_path):
    clip = tmp_path / "clip.mpg"
    clip.write_bytes(encode_video(_frames(0), 8.0, "mpeg2video", "mpeg"))
    report = main(["--checkpoint", pre_ckpt, "--source", str(clip), "--caption", "a square moves right",
                   "--num-frames", "2", "--out", str(tmp_path / "a")])
    assert report["samples"][0]["caption"] == "a square moves right" and report["samples"][0]["key"] == "clip.mpg"
    (tmp_path / "clip.txt").write_text("from the sidecar")
    report = main(["--checkpoint", pre_ckpt, "--source", str(clip), "--num-frames", "2", "--out", str(tmp_path / "b")])
    assert report["samples"][0]["caption"] == "from the sidecar"


def test_bad_sources_name_the_file_and_the_decoders_message(pre_ckpt, tmp_path, capsys):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF" + bytes(200))
    (tmp_path / "broken.txt").write_text("x")
    nocap = tmp_path / "nocap" / "clip.mkv"
    nocap.parent.mkdir()
    nocap.write_bytes(encode_video(_frames(0), 8.0, "libx264", "matroska"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "badjson.mov").write_bytes(encode_video(_frames(0), 8.0, "libx264", "mov"))
    (tmp_path / "badjson.json").write_text(json.dumps({"text": "no caption field"}))
    cases = [
        ([str(broken)], rf"--source {broken}: cannot open video: .*\(PyAV: "),
        ([str(nocap.parent)], rf"--source {nocap}: no caption; pass --caption or put clip.txt or clip.json"),
        ([str(empty)], rf"--source {empty}: no video files"),
        ([str(tmp_path / "missing.avi")], "video file not found"),
        ([str(tmp_path / "badjson.mov")], r"badjson.json: needs a non-empty string field 'caption'"),
    ]
    for source, pattern in cases:
        with pytest.raises(SystemExit):
            main(["--checkpoint", pre_ckpt, "--source", *source, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert re.search(pattern, err), err


def _vqgan_of(ckpt: str, tmp_path) -> str:
    """The checkpoint's own VQGAN in taming format, so tokenize_shards makes codes this model accepts."""
    vq = module_from_checkpoint(ckpt).image_tokenizer.vq
    save_taming_vqgan(vq, str(tmp_path / "vq.ckpt"), str(tmp_path / "vq.yaml"))
    return str(tmp_path / "vq.ckpt")


def test_pretokenized_text_video_shards_roll_out_against_the_vqgan_decode(pre_ckpt, synthetic_shards, tmp_path):
    from PIL import Image

    tok = tokenize([synthetic_shards["val_shards"]], str(tmp_path / "tok"), _vqgan_of(pre_ckpt, tmp_path),
                   image_size=32)
    raw = main(["--checkpoint", pre_ckpt, "--source", synthetic_shards["val_shards"], "--num-samples", "2",
                "--num-frames", "3", "--out", str(tmp_path / "raw")])
    codes = main(["--checkpoint", pre_ckpt, "--source", tok["pattern"], "--num-samples", "2", "--num-frames", "3",
                  "--out", str(tmp_path / "codes")])
    assert codes["ground_truth"] == "vqgan_decode" and raw["ground_truth"] == "raw"
    assert [s["key"].split(":")[1] for s in codes["samples"]] == [s["key"].split(":")[1] for s in raw["samples"]]
    assert [s["caption"] for s in codes["samples"]] == [s["caption"] for s in raw["samples"]]
    m = codes["metrics"]
    assert m["psnr_copy_last"] == m["psnr_copy_last_vq"]  # no raw frames: both baselines are the decode
    assert min(m["psnr_recon"]) > 90  # the reference is the decode itself: the ceiling sits at the cap
    # the same clips, the same history codes: the same greedy prediction, so the same token accuracy vs copy-last
    assert m["token_agree_copy_last"] == pytest.approx(raw["metrics"]["token_agree_copy_last"])
    assert Image.open(tmp_path / "codes" / "sample00.gif").n_frames == 3


def test_pretokenized_robot_shards_roll_out(robot_shards, tmp_path):
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    module.normalization_stats(json.load(open(robot_shards["stats_file"])))
    ckpt = _save(module, tmp_path / "robot.ckpt")
    tok = tokenize([robot_shards["val_shards"]], str(tmp_path / "tok"), _vqgan_of(ckpt, tmp_path), image_size=32)
    raw = main(["--checkpoint", ckpt, "--source", robot_shards["val_shards"], "--num-frames", "3",
                "--out", str(tmp_path / "raw")])
    codes = main(["--checkpoint", ckpt, "--source", tok["pattern"], "--num-frames", "3",
                  "--out", str(tmp_path / "codes")])
    assert codes["ground_truth"] == "vqgan_decode" and raw["ground_truth"] == "raw"
    assert set(codes["metrics"]["per_view"]) == {"head", "wrist"}
    # same episode, same codes in the history: the actions predicted from them are the same
    assert codes["samples"][0]["action_l1"] == pytest.approx(raw["samples"][0]["action_l1"], rel=1e-5)
    assert min(codes["metrics"]["psnr_recon"]) > 90
