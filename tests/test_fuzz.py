"""Fuzzed inputs never crash a run: mutated mp4 bytes, clip metadata, pre-tokenized codes, YAML config values,
robomimic HDF5 files and LeRobot metadata each give a clear error naming the file/field, a counted skip, or a valid
result; never a bare traceback.

`make test` runs a bounded, derandomized sample (GR_FUZZ_EXAMPLES, default 12 per target). `tools/fuzz_inputs.py`
runs the same properties with fresh random cases at volume and reports cases tried and crashes found.
"""

from __future__ import annotations

import collections
import copy
import io
import json
import os
import random
import shutil

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import import_hdf5, import_lerobot
from gr.config import ClipSpec, ConfigError, GRModelConfig, ImageTokenizerConfig, OptimConfig, TextEncoderConfig
from gr.config import as_config
from gr.data.shards import SampleError, decode_clip, decode_token_clip, parse_meta
from gr.data.video_io import encode_mp4
from tests.conftest import REPO
from tests.test_importers import make_episodes, write_lerobot_v21, write_robomimic

EXAMPLES = int(os.environ.get("GR_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GR_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                      HealthCheck.data_too_large])
CASES: collections.Counter = collections.Counter()  # cases tried per target (tools/fuzz_inputs.py reports them)


@pytest.fixture(scope="session", autouse=True)
def _report_cases():
    yield
    path = os.environ.get("GR_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(CASES), f)


def _one_line(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert text and "\n" not in text.strip(), text
    for needle in needles:
        assert needle in text, (needle, text)


def mutate_bytes(data: bytes, flips: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    out = bytearray(data)
    for pos, val in flips:
        out[pos % len(out)] = val
    if insert:
        at = len(out) // 2
        out[at:at] = insert
    return bytes(out if cut is None else out[:cut % (len(out) + 1)])


BYTE_MUTATIONS = dict(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=24),
                      cut=st.none() | st.integers(0, 2**20), insert=st.binary(max_size=64))


# ---- text-video samples ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_mp4() -> bytes:
    rng = np.random.default_rng(0)
    return encode_mp4(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 8.0)


DECODE_WORKER = r"""
import struct, sys, random, traceback
from gr.config import ClipSpec
from gr.data.shards import SampleError, decode_clip
clip = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=16)
out = sys.stdout.buffer
while True:
    head = sys.stdin.buffer.read(4)
    if len(head) < 4:
        break
    data = sys.stdin.buffer.read(struct.unpack("<I", head)[0])
    try:
        frames = decode_clip(data, {"caption": "x"}, clip, random.Random(0), "k")
        ok = frames.shape == (3, 16, 16, 3) and str(frames.dtype) == "uint8"
        reply = "ok:" if ok else f"bad:frames {frames.dtype} {frames.shape}"
    except SampleError as exc:
        text = str(exc)
        reply = "ok:" if text.startswith("k.mp4") and "\n" not in text.strip() else f"bad:{text}"
    except Exception as exc:
        reply = f"bad:{type(exc).__name__}: {exc}"
    msg = reply.encode()[:4000]
    out.write(struct.pack("<I", len(msg)) + msg)
    out.flush()
"""


class DecodeWorker:
    """A fresh interpreter that decodes mp4 bytes with gr's clip decoder. A native crash (decord's SIGSEGV) only kills
    the worker, so the case is reported and the next one gets a new worker. Not a fork of the test process: a fork
    of a process with torch/wandb threads can deadlock on a lock one of them held."""

    def __init__(self):
        self.proc = None

    def decode(self, data: bytes, timeout: float = 60.0) -> tuple[str, str]:
        import select
        import struct
        import subprocess
        import sys

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", DECODE_WORKER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        head = self.proc.stdout.read(4) if ready else b""
        if len(head) < 4:
            self.close()
            code = self.proc.returncode
            return ("crash", f"worker died with {code}") if ready else ("hang", f"no answer in {timeout} s")
        kind, _, detail = self.proc.stdout.read(struct.unpack("<I", head)[0]).decode(errors="replace").partition(":")
        return kind, detail

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def decode_worker():
    worker = DecodeWorker()
    yield worker
    worker.close()


@FUZZ
@given(**BYTE_MUTATIONS)
def test_mutated_mp4_bytes_decode_or_raise_a_sample_error(valid_mp4, decode_worker, flips, cut, insert):
    CASES["mp4_bytes"] += 1
    data = mutate_bytes(valid_mp4, flips, cut, insert)
    kind, detail = decode_worker.decode(data)
    assert kind == "ok", f"{kind}: {detail} (input: {len(data)} bytes, flips={flips}, cut={cut})"


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["caption", "start", "end", "fps", "tokens", "x"]), JSON_VALUES,
                            max_size=5) | JSON_VALUES, **BYTE_MUTATIONS)
def test_mutated_clip_metadata_parses_or_raises_a_sample_error(meta, flips, cut, insert):
    CASES["clip_json"] += 1
    raw = json.dumps(meta, allow_nan=True).encode()
    for data in (raw, mutate_bytes(raw or b"{}", flips, cut, insert)):
        try:
            parsed = parse_meta(data, "k")
        except SampleError as exc:
            _one_line(exc, "k.json")
            continue
        assert isinstance(parsed, dict) and isinstance(parsed["caption"], str)


@FUZZ
@given(dtype=st.sampled_from(["uint16", "int32", "float32", "int64"]), shape=st.lists(st.integers(0, 5), max_size=4),
       high=st.integers(1, 70000), tokens=st.fixed_dictionaries({}, optional={
           "grid": st.lists(st.integers(0, 5), max_size=3) | JSON_VALUES, "fps": JSON_VALUES | st.floats(),
           "codebook_size": JSON_VALUES | st.integers(-2, 70000)}), **BYTE_MUTATIONS)
def test_mutated_token_clips_decode_or_raise_a_sample_error(dtype, shape, high, tokens, flips, cut, insert):
    CASES["token_npy"] += 1
    codes = np.random.default_rng(0).integers(0, high, shape, dtype=np.int64).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    expected = {"grid": [4, 4], "codebook_size": 64}
    clip = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=16)
    good = {"grid": [4, 4], "fps": 8.0, "codebook_size": 64, "dtype": "uint16"}
    for npy in (buf.getvalue(), mutate_bytes(buf.getvalue(), flips, cut, insert)):
        for info in ({**good, **tokens}, tokens):
            try:
                out = decode_token_clip(npy, {"caption": "x", "tokens": info}, clip, random.Random(0), "k", expected)
            except SampleError as exc:
                _one_line(exc, "k.")
                continue
            assert out.shape == (3, 4, 4) and out.dtype == np.int64 and 0 <= out.min() and out.max() < 64


# ---- YAML config values ----------------------------------------------------------------------------------------------
def _demo_model_args() -> dict:
    with open(os.path.join(REPO, "configs", "demo", "finetune.yaml")) as f:
        args = yaml.safe_load(f)["model"]["init_args"]
    args["image_tokenizer"] = {k: v for k, v in args["image_tokenizer"].items() if k not in ("checkpoint", "yaml")}
    args["text_encoder"].pop("pretrained", None)
    return {k: args[k] for k in ("model", "text_encoder", "image_tokenizer", "optim") if k in args}


def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, val in tree.items():
        out += _leaves(val, prefix + (key,)) if isinstance(val, dict) and val else [prefix + (key,)]
    return out


BASE = _demo_model_args()
SECTIONS = {"model": GRModelConfig, "text_encoder": TextEncoderConfig, "image_tokenizer": ImageTokenizerConfig,
            "optim": OptimConfig}
BAD_VALUES = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([10**12, -10**9])
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
              | st.lists(st.integers(-2, 3) | st.text(max_size=3), max_size=3) | st.just({}) | st.just({"x": 1}))


@FUZZ
@given(leaf=st.sampled_from(_leaves(BASE)), value=BAD_VALUES)
def test_mutated_config_values_build_or_name_the_field(leaf, value):
    CASES["config_value"] += 1
    cfg = copy.deepcopy(BASE)
    node = cfg
    for key in leaf[:-1]:
        node = node[key]
    node[leaf[-1]] = value
    section = leaf[0]
    try:
        as_config(SECTIONS[section], cfg[section], section)
    except ConfigError as exc:
        # the mutated field, or (for a value that breaks a relation) its section, is named
        _one_line(exc, ".".join(leaf[:-1]))  # the sub-config path, e.g. model.trunk, and ...
        assert leaf[-1] in str(exc), (leaf, str(exc))  # ... the field


# ---- robot datasets --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def robomimic_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("robomimic") / "demo.hdf5")
    write_robomimic(path, make_episodes(views=("agentview", "robot0_eye_in_hand"), state_dim=9, action_dim=7))
    return path


def _h5_paths(path: str) -> list[str]:
    out: list[str] = []
    with h5py.File(path, "r") as f:
        f.visit(out.append)
    return sorted(out)


HDF5_KINDS = ["delete", "strings", "flatten", "empty", "nan", "scalar", "attr_garbage", "attr_list", "transpose"]


def _mutate_hdf5(path: str, target: str, kind: str) -> None:
    with h5py.File(path, "a") as f:
        obj = f[target]
        if kind.startswith("attr"):
            obj.attrs["env_args"] = "{not json" if kind == "attr_garbage" else json.dumps([1, 2])
            obj.attrs["problem_info"] = obj.attrs["env_args"]
            return
        if kind == "delete" or not isinstance(obj, h5py.Dataset):
            del f[target]
            return
        data = obj[()]
        del f[target]
        if kind == "strings":
            f.create_dataset(target, data=np.array([b"x"] * max(1, len(np.atleast_1d(data)))))
        elif kind == "flatten":
            f.create_dataset(target, data=np.ravel(data))
        elif kind == "empty":
            f.create_dataset(target, data=np.zeros((0,) + np.shape(data)[1:], dtype=np.asarray(data).dtype))
        elif kind == "nan":
            f.create_dataset(target, data=np.full(np.shape(data), np.nan, dtype=np.float32))
        elif kind == "scalar":
            f.create_dataset(target, data=3)
        elif kind == "transpose":
            f.create_dataset(target, data=np.asarray(data).T)


def _run_importer(main, argv: list[str], capsys, must_name: str) -> None:
    """An importer returns its summary, or exits with status 2 and one message naming the input."""
    try:
        summary = main(argv)
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert must_name in err, err
        return
    assert summary["episodes"] >= 1 and summary["frames"] >= summary["episodes"]


@FUZZ
@given(data=st.data())
def test_mutated_robomimic_files_import_or_name_the_file(robomimic_file, tmp_path_factory, capsys, data):
    CASES["hdf5"] += 1
    target = data.draw(st.sampled_from(_h5_paths(robomimic_file)), label="target")
    kind = data.draw(st.sampled_from(HDF5_KINDS), label="kind")
    work = tmp_path_factory.mktemp("h5")
    path = str(work / "demo.hdf5")
    shutil.copy(robomimic_file, path)
    _mutate_hdf5(path, target, kind)
    _run_importer(import_hdf5.main, ["--input", path, "--out", str(work / "out")], capsys, "demo.hdf5")


@pytest.fixture(scope="module")
def lerobot_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lerobot") / "ds")
    write_lerobot_v21(root, make_episodes())
    return root


def _mutate_json_tree(tree, path: list, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    if value == "<delete>":
        del node[path[-1]]
    else:
        node[path[-1]] = value


@FUZZ
@given(data=st.data())
def test_mutated_lerobot_metadata_imports_or_names_the_file(lerobot_root, tmp_path_factory, capsys, data):
    CASES["lerobot"] += 1
    work = tmp_path_factory.mktemp("lr")
    root = str(work / "ds")
    shutil.copytree(lerobot_root, root)
    which = data.draw(st.sampled_from(["info.json", "episodes.jsonl", "tasks.jsonl", "parquet"]), label="file")
    if which == "info.json":
        path = os.path.join(root, "meta", "info.json")
        info = json.load(open(path))
        leaf = list(data.draw(st.sampled_from(_leaves(info)), label="leaf"))
        _mutate_json_tree(info, leaf, data.draw(st.just("<delete>") | BAD_VALUES, label="value"))
        with open(path, "w") as f:
            json.dump(info, f)
        name = os.path.join("meta", "info.json")
    elif which in ("episodes.jsonl", "tasks.jsonl"):
        path = os.path.join(root, "meta", which)
        rows = [json.loads(line) for line in open(path)]
        row = data.draw(st.integers(0, len(rows) - 1), label="row")
        key = data.draw(st.sampled_from(sorted(rows[row])), label="key")
        _mutate_json_tree(rows[row], [key], data.draw(st.just("<delete>") | BAD_VALUES, label="value"))
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        name = which
    else:
        path = os.path.join(root, "data", "chunk-000", "episode_000000.parquet")
        raw = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(mutate_bytes(raw, data.draw(BYTE_MUTATIONS["flips"]), data.draw(BYTE_MUTATIONS["cut"]), b""))
        name = "episode_000000.parquet"
    _run_importer(import_lerobot.main, ["--root", root, "--out", str(work / "out")], capsys, name)
