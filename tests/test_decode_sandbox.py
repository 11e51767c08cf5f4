"""Video decoding runs in a child process (gr/data/decode_sandbox.py): a decoder that dies with SIGSEGV or stalls costs
one video, counted as a skipped sample, and the run goes on with a fresh decoder."""

import json
import logging
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from gr.config import ClipSpec
from gr.data import decode_sandbox
from gr.data.shards import ClipStream
from gr.data.video_io import VideoDecodeError, encode_mp4, get_frames, open_video
from tests.test_data import _tar_with

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=32)


def _good() -> bytes:
    return encode_mp4(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 8.0)


MARK = b"GR-TEST-SEGFAULT"  # videos starting with this kill the decoder child that the `segfault_hook` fixture arms

HOOK = f"""
# Loaded by every Python started with this folder on PYTHONPATH (the decoder children of the test only): decord's
# VideoReader kills its own process with SIGSEGV on bytes starting with the marker, as decord itself does on some
# corrupt files (tools/fuzz_inputs.py --decord-crash-rate finds those; they do not crash every run, so tests use this).
import os, signal
import decord
_real = decord.VideoReader
def VideoReader(src, *args, **kwargs):
    data = src.getvalue() if hasattr(src, "getvalue") else open(src, "rb").read()
    if data.startswith({MARK!r}):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _real(src, *args, **kwargs)
decord.VideoReader = VideoReader
"""


@pytest.fixture
def segfault_hook(tmp_path, monkeypatch):
    """Arm the hook for decoder children started from now on (and stop the current one, which started without it)."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path / "hook"), os.environ.get("PYTHONPATH"))
                                                     if p))
    decode_sandbox.decoder().close()
    yield MARK + _good()
    decode_sandbox.decoder().close()  # the next test's child starts without the hook


def _fuzz_case(n: int) -> bytes:
    """Case n of `tools/fuzz_inputs.py --decord-crash-rate` (seed 0): byte flips and truncation of a good mp4."""
    good, rng = _good(), random.Random(0)
    for _ in range(n + 1):
        data = bytearray(good)
        for _ in range(rng.randint(1, 24)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data)
    return data


def test_the_hook_really_kills_an_in_process_decoder(segfault_hook, tmp_path):
    """Without the sandbox the marked video takes the whole process down, so the tests below test isolation."""
    path = tmp_path / "c.mp4"
    path.write_bytes(segfault_hook)
    code = ("import sys; from gr.data.video_io import open_video, get_frames; "
            "vr = open_video(open(sys.argv[1], 'rb').read(), sandbox=False); get_frames(vr, range(len(vr)))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGSEGV


def test_a_segfaulting_decoder_is_one_videos_error_and_the_next_video_decodes(segfault_hook):
    proc = decode_sandbox.decoder()
    want = get_frames(open_video(_good(), sandbox=False), range(8))
    assert np.array_equal(get_frames(open_video(_good()), range(8)), want)
    crashes, generation = proc.crashes, proc.generation
    with pytest.raises(VideoDecodeError, match=r"the decoder process died on this video \(SIGSEGV\)"):
        vr = open_video(segfault_hook)
        get_frames(vr, range(len(vr)))
    assert proc.crashes == crashes + 1
    assert np.array_equal(get_frames(open_video(_good()), range(8)), want)
    assert proc.generation == generation + 1  # a fresh child


def test_a_reader_opened_before_a_crash_reopens_in_the_new_child(segfault_hook):
    vr = open_video(_good())
    with pytest.raises(VideoDecodeError, match="SIGSEGV"):
        bad = open_video(segfault_hook)
        get_frames(bad, range(len(bad)))
    assert get_frames(vr, [3, 1]).shape == (2, 32, 32, 3)
    assert vr[0].shape == (32, 32, 3)


def test_a_real_decord_crasher_is_an_error_either_way():
    """Case 65 of the fuzz run segfaults decord 0.6 in some runs and raises in others (its threaded decoder): both are
    this video's VideoDecodeError in the sandbox, and the next video decodes."""
    with pytest.raises(VideoDecodeError):
        vr = open_video(_fuzz_case(65))
        get_frames(vr, range(len(vr)))
    assert get_frames(open_video(_good()), range(8)).shape == (8, 32, 32, 3)


def test_a_stalled_decoder_is_killed_after_the_timeout():
    proc = decode_sandbox.DecoderProcess(timeout_s=1.0)
    vr = decode_sandbox.SandboxedVideo(_good(), proc)
    os.kill(proc.proc.pid, signal.SIGSTOP)
    with pytest.raises(VideoDecodeError, match=r"stalled for over 1 s"):
        get_frames(vr, range(8))
    assert get_frames(vr, range(8)).shape == (8, 32, 32, 3)  # reopened in a new child
    proc.close()


def test_many_open_readers_outlive_the_childs_lru():
    videos = [encode_mp4(np.full((4, 32, 32, 3), 20 * i, np.uint8), 8.0) for i in range(decode_sandbox.MAX_OPEN + 3)]
    readers = [open_video(v) for v in videos]
    for i, vr in enumerate(readers):  # the first ones were evicted from the child and reopen transparently
        assert abs(float(get_frames(vr, [0]).mean()) - 20 * i) < 3


def test_the_decoder_reports_python_errors_as_decode_errors():
    with pytest.raises(VideoDecodeError, match="cannot open video"):
        open_video(b"not a video")
    with pytest.raises(VideoDecodeError):
        get_frames(open_video(_good()), [100])


def test_a_crashing_clip_in_a_dataloader_worker_is_a_counted_skip(segfault_hook, tmp_path, caplog):
    """The guarantee that matters: a shard holding a decord-killing mp4 is read to the end by a DataLoader worker (a
    forked process, which starts its own decoder), and the clip is skipped and counted with its key and the signal."""
    good = encode_mp4(np.zeros((8, 32, 32, 3), np.uint8), 8.0)
    cap = lambda c: json.dumps({"caption": c}).encode()  # noqa: E731
    path = _tar_with(tmp_path, "s.tar", {"a.mp4": good, "a.json": cap("a"), "b.mp4": segfault_hook, "b.json": cap("b"),
                                         "c.mp4": good, "c.json": cap("c")})
    open_video(good)  # the parent has a decoder child too; the worker must not use it
    stream = ClipStream([path], CLIP, shuffle=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    out = list(loader)
    assert [s["caption"] for s in out] == ["a", "c"]
    assert out[1]["num_skipped"] == 1
    with caplog.at_level(logging.WARNING, logger="gr.data.shards"):
        list(ClipStream([path], CLIP, shuffle=False))  # in-process: the same skip, logged here
    assert any("b.mp4" in r.getMessage() and "SIGSEGV" in r.getMessage() for r in caplog.records)


def test_in_process_decoding_can_be_chosen(monkeypatch):
    monkeypatch.setenv("GR_DECODE_SANDBOX", "0")
    assert not isinstance(open_video(_good()), decode_sandbox.SandboxedVideo)
    monkeypatch.setenv("GR_DECODE_SANDBOX", "1")
    assert isinstance(open_video(_good()), decode_sandbox.SandboxedVideo)
