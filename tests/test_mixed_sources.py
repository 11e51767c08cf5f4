"""Pretraining on several text-video sources mixed by weight (data.train_sources): the mix, mid-epoch resume, the
split by rank, skipped samples, pre-tokenized sources, config errors, and a CLI run killed and resumed."""

import io
import itertools
import json
import logging
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from gr.config import ClipSpec, ConfigError
from gr.data.datamodule import ClipStreamLoader, VideoDataModule
from gr.data.shards import ClipStream, MixedClipStream, expand_urls, raw_samples
from gr.data.video_io import encode_mp4
from tests.conftest import write_config
from tests.test_data import _tar_with
from tests.kill_chain import start
from tests.test_training import _losses

CLIP = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=32)


def _two_sources(shards) -> tuple[list[str], list[str]]:
    """The 6 synthetic train shards as two sources: 4 shards (32 clips) and 2 shards (16 clips)."""
    urls = expand_urls(shards["train_shards"], "train")
    return urls[:4], urls[4:]


def _url(key: str) -> str:
    return key.rsplit(":", 1)[0]  # sample keys are "<shard url>:<key in the shard>"


def _all_keys(urls: list[str]) -> set[str]:
    return {f"{raw['__url__']}:{raw['__key__']}" for raw in raw_samples(urls)}


def test_mix_follows_the_weights_is_seeded_and_tags_each_sample(synthetic_shards, monkeypatch):
    big, small = _two_sources(synthetic_shards)
    # Reading and decoding tars is tested elsewhere and would take seconds here: the mix is made between the two, so
    # every shard drawn stands for 8 samples named after it, and decoding returns a placeholder.
    monkeypatch.setattr(MixedClipStream, "_raw_samples", lambda self, urls: (
        {"__url__": u, "__key__": f"k{j}"} for u in urls for j in range(8)))
    monkeypatch.setattr(MixedClipStream, "decode", lambda self, raw, key, rng: {"frames": torch.zeros(1),
                                                                                "caption": ""})

    def draws(seed: int, n: int = 10_000) -> list[tuple[int, str]]:
        ds = MixedClipStream([(big, 1.0), (small, 3.0)], CLIP, shuffle_buffer=16, seed=seed, resampled=True)
        return [(s["source"], s["key"]) for s in itertools.islice(ds, n)]

    first = draws(0)
    assert draws(0) == first  # a restart draws the same mix
    assert draws(1) != first
    assert all(_url(key) in (big, small)[source] for source, key in first)
    fraction_small = sum(source for source, _ in first) / len(first)
    # Draws are independent with p = 3/4 (the shuffle buffer only reorders them), so the fraction has a standard
    # deviation of sqrt(p (1 - p) / n) = 0.0043 at n = 10000; 0.02 is over 4 of them, and still far from 1/2 (the
    # weights ignored) and 1/3 (drawn in proportion to the shard counts).
    assert abs(fraction_small - 0.75) < 0.02


@pytest.mark.parametrize("num_workers,resampled", [(0, False), (2, False), (0, True)])
def test_mixed_loader_resumes_mid_epoch_exactly(synthetic_shards, num_workers, resampled):
    big, small = _two_sources(synthetic_shards)

    def loader() -> ClipStreamLoader:
        ds = MixedClipStream([(big, 1.0), (small, 3.0)], CLIP, shuffle_buffer=8, seed=5, resampled=resampled)
        return ClipStreamLoader(ds, batches_per_epoch=10 if resampled else None, batch_size=4,
                                num_workers=num_workers)

    full = list(loader())
    for batch in full:  # each sample says which source it came from
        assert [_url(k) in (big, small)[s] for k, s in zip(batch["key"], batch["source"].tolist())] == [True] * 4
    keys = [k for batch in full for k in batch["key"]]
    if resampled:
        assert len(full) == 10
    else:  # the epoch ends when both sources are exhausted, each clip used once
        assert len(keys) == len(set(keys)) == 48
        # The small source (weight 3) runs out first and drops out of the mix: the last batch is the big one's.
        assert full[-1]["source"].tolist() == [0] * 4 and full[0]["source"].sum() > 0
    k = 4  # a multiple of num_workers: torch restarts its round robin at worker 0 (see test_data.py)
    a = loader()
    it = iter(a)
    for _ in range(k):
        a.mark_consumed(next(it)["position"])
    next(it)  # prefetched by the trainer but never trained on: must not count
    b = loader()
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert [batch["key"] for batch in rest] == [batch["key"] for batch in full[k:]]
    assert [batch["source"].tolist() for batch in rest] == [batch["source"].tolist() for batch in full[k:]]


def test_each_source_is_split_by_rank_on_its_own(synthetic_shards, monkeypatch):
    import gr.data.shards as shards

    big = _two_sources(synthetic_shards)[0]  # 4 shards: 2 whole shards per rank
    one = expand_urls(synthetic_shards["val_shards"], "val")[:1]  # 1 shard for 2 ranks: every other clip each
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(shards, "reader_ids", lambda worker_offset=0, rank=rank: (rank, 2, 0, 1))
        stream = MixedClipStream([(big, 1.0), (one, 1.0)], CLIP, shuffle=True, shuffle_buffer=8, seed=2)
        per_rank.append([(s["source"], s["key"]) for s in stream])
    keys0, keys1 = ({k for _, k in r} for r in per_rank)
    assert not keys0 & keys1 and keys0 | keys1 == _all_keys(big) | _all_keys(one)
    for samples in per_rank:
        assert len({_url(k) for s, k in samples if s == 0}) == 2  # whole shards of the big source
        assert len([k for s, k in samples if s == 1]) == 4  # half the clips of the one-shard source


def test_a_corrupt_sample_in_one_source_is_skipped_logged_and_counted(synthetic_shards, tmp_path, caplog):
    good = expand_urls(synthetic_shards["val_shards"], "val")[:1]
    mp4, caption = encode_mp4(np.zeros((8, 32, 32, 3), np.uint8), 8.0), json.dumps({"caption": "fine"}).encode()
    bad = _tar_with(tmp_path, "bad-000000.tar", {"x.mp4": b"not a video", "x.json": caption,
                                                 "y.mp4": mp4, "y.json": b"{not json", "z.mp4": mp4, "z.json": caption})
    with caplog.at_level(logging.WARNING, logger="gr.data.shards"):
        out = list(MixedClipStream([(good, 1.0), ([bad], 1.0)], CLIP, shuffle=False))
    assert {s["key"] for s in out} == _all_keys(good) | {f"{bad}:z"}
    assert sum(s["num_skipped"] for s in out) == 2
    assert f"{bad}:x.mp4" in caplog.text and f"{bad}:y.json" in caplog.text and "source 1" in caplog.text


@pytest.mark.parametrize("resampled", [False, True])
def test_one_source_is_the_train_shards_stream(synthetic_shards, resampled):
    """The stream data.train_shards always gave (a plain ClipStream), so a run may switch to data.train_sources
    and resume from its checkpoint."""
    shards = synthetic_shards["train_shards"]
    ds = ClipStream(expand_urls(shards, "train"), CLIP, shuffle=True, shuffle_buffer=8, seed=3, resampled=resampled)
    plain = [batch["key"] for batch in ClipStreamLoader(ds, batches_per_epoch=5, batch_size=4, num_workers=0)]
    dm = VideoDataModule(train_sources=[{"shards": shards, "weight": 2.0}], batch_size=4, num_workers=0,
                         shuffle_buffer=8, seed=3, clip=CLIP, resampled=resampled, batches_per_epoch=5)
    assert [batch["key"] for batch in dm.train_dataloader()] == plain


SPEC = {"codebook_size": 64, "image_size": 32, "grid": [4, 4], "fingerprint": "f00d"}  # what the model states


def _token_shard(path: str, num_clips: int = 8) -> str:
    """A pre-tokenized shard as data_prep/tokenize_shards.py writes it (codes for SPEC); no VQGAN needed."""
    rng = np.random.default_rng(0)
    with wds.TarWriter(path) as w:
        for i in range(num_clips):
            codes = rng.integers(0, 64, (8, 4, 4)).astype(np.uint16)
            buf = io.BytesIO()
            np.save(buf, codes)
            meta = {"caption": f"clip {i}", "tokens": {**SPEC, "fps": 8.0}}
            w.write({"__key__": f"c{i:03d}", "tokens.npy": buf.getvalue(), "json": json.dumps(meta).encode()})
    return path


def test_every_pretokenized_source_is_checked(synthetic_shards, tmp_path):
    def datamodule(*sources) -> VideoDataModule:
        dm = VideoDataModule(train_sources=[{"shards": s} for s in sources], shard_format="tokens", batch_size=4,
                             num_workers=0)
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(clip_spec=CLIP, tokens_spec=SPEC),
                                     training=False)
        dm.setup("fit")
        return dm

    a, b = (_token_shard(str(tmp_path / f"{name}-000000.tar")) for name in ("a", "b"))
    batches = list(datamodule(a, b).train_dataloader())
    assert len(batches) == 4 and batches[0]["codes"].shape == (4, 3, 4, 4)
    assert {s for batch in batches for s in batch["source"].tolist()} == {0, 1}
    with pytest.raises(ConfigError, match=r"^data\.train_sources\[1\]: .*val-000000\.tar:.* has no tokens\.npy"):
        datamodule(a, synthetic_shards["val_shards"])
    with wds.TarWriter(str(tmp_path / "empty-000000.tar")):
        pass
    with pytest.raises(ConfigError, match=r"^data\.train_sources\[2\]: shard .*empty-000000\.tar' holds no samples"):
        datamodule(a, b, str(tmp_path / "empty-000000.tar"))


@pytest.mark.parametrize("data,message", [
    ({}, r"^data\.train_shards / data\.train_sources: give exactly one of them .*got neither$"),
    ({"train_shards": "A", "train_sources": [{"shards": "A"}]}, r"give exactly one of them .*got both$"),
    ({"train_sources": []}, r"^data\.train_sources: the list is empty"),
    ({"train_sources": [{"shards": "A"}, {"shards": "A", "weight": 0}]},
     r"^data\.train_sources\[1\]\.weight must be a finite number > 0, got 0$"),
    ({"train_sources": [{"shards": "A", "weight": float("nan")}]},
     r"^data\.train_sources\[0\]\.weight: expected a finite number, got float nan$"),  # as_config's type check
    ({"train_sources": [{"shards": "A"}, {"weight": 2.0}]}, r"^data\.train_sources\[1\]\.shards is required"),
    ({"train_sources": [{"shards": "A"}, {"shards": "/no/such-{0..1}.tar"}]},
     r"^data\.train_sources\[1\]\.shards: shard file not found: '/no/such-0\.tar'$"),
    ({"train_sources": [{"shards": "A", "wieght": 2.0}]}, r"^data\.train_sources\[0\]: unknown field\(s\) \['wieght'\]"),
])
def test_source_config_errors_name_the_source_and_field(synthetic_shards, data, message):
    shards = synthetic_shards["train_shards"]
    data = {k: shards if v == "A" else [{f: shards if x == "A" else x for f, x in s.items()} for s in v]
            for k, v in data.items()}
    with pytest.raises(ConfigError, match=message) as exc:
        VideoDataModule(**data)
    assert "\n" not in str(exc.value)


def _mixed_config(tmp_path, name: str, shards: dict, root: str, max_steps: int) -> str:
    """conftest's tiny pretraining config with its data as two sources, weighted 1:3."""
    big, small = (shards["train_shards"].replace("{000000..000005}", r) for r in ("{000000..000003}",
                                                                                  "{000004..000005}"))
    path = write_config(tmp_path / name, shards, root, max_steps=max_steps, every_n_steps=3, num_workers=1,
                        val=False, optim={"lr": 3e-3, "warmup_steps": 2, "total_steps": 12})
    cfg = yaml.safe_load(open(path))
    data = cfg["data"]["init_args"]
    del data["train_shards"]
    data["train_sources"] = [{"shards": big, "weight": 1.0}, {"shards": small, "weight": 3.0}]
    yaml.safe_dump(cfg, open(path, "w"))
    return path


def _last_step(root: str) -> int:
    try:
        return max(_losses(root))
    except (OSError, ValueError):  # no log yet, or a line half written
        return 0


def test_two_source_pretraining_resumes_after_sigkill(synthetic_shards, tmp_path):
    assert synthetic_shards["train_shards"].endswith("train-{000000..000005}.tar")
    kill_root = str(tmp_path / "killed")
    # The run to be killed goes on past its step-3 checkpoint: its own losses after it are the uninterrupted
    # sequence that the resumed run must repeat (the schedule does not depend on max_steps).
    killed = start("train.py", _mixed_config(tmp_path, "kill.yaml", synthetic_shards, kill_root, max_steps=10_000))
    ckpt = os.path.join(kill_root, "checkpoints", "step000003.ckpt")
    deadline = time.time() + 240
    while not (os.path.exists(ckpt) and _last_step(kill_root) >= 6) and killed.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # its DataLoader worker too
    killed.wait()
    assert os.path.exists(ckpt) and _last_step(kill_root) >= 6, killed.stderr.read().decode()[-3000:]
    resume_root = str(tmp_path / "resumed")
    resumed = start("train.py", _mixed_config(tmp_path, "res.yaml", synthetic_shards, resume_root, max_steps=6),
                   "--ckpt_path", ckpt)
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-3000:]
    want, got = _losses(kill_root), _losses(resume_root)
    assert all(np.isfinite(want[s]) for s in range(1, 7))
    assert sorted(got) == [4, 5, 6]  # the epoch holds 12 batches: the resume is mid-epoch
    # As in test_training.py: exact when idle; under load oneDNN/BLAS may differ in the last float32 bit.
    assert [got[s] for s in range(4, 7)] == pytest.approx([want[s] for s in range(4, 7)], rel=1e-5, abs=0)
