"""Pre-tokenized shards: data_prep/tokenize_shards.py, and the loader giving the same batches as decoding mp4s."""

import io
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from data_prep.tokenize_shards import main as tokenize_main
from data_prep.tokenize_shards import run as tokenize
from gr.config import ConfigError, ImageTokenizerConfig
from gr.data.datamodule import VideoDataModule
from gr.data.shards import ClipStream, expand_urls
from gr.encoders import save_taming_vqgan
from gr.encoders.vqgan import VQGAN, ddconfig_from
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_MODEL, TINY_TOKENIZER, module_init_args, write_config
from tests.test_tokenizer import write_robot_shard


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    torch.manual_seed(3)
    model = VQGAN(ddconfig_from(ImageTokenizerConfig(**TINY_TOKENIZER)), 64, 32)
    save_taming_vqgan(model, str(root / "vq.ckpt"), str(root / "vq.yaml"))
    return str(root / "vq.ckpt"), str(root / "vq.yaml")


@pytest.fixture(scope="module")
def token_shards(synthetic_shards, tiny_vqgan, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokens"))
    train = tokenize([synthetic_shards["train_shards"]], out, tiny_vqgan[0], image_size=32)
    val = tokenize([synthetic_shards["val_shards"]], out, tiny_vqgan[0], image_size=32)
    return {"train_shards": train["pattern"], "val_shards": val["pattern"], "out": out, "report": train}


def _module(tiny_vqgan, **tokenizer):
    tok = {**TINY_TOKENIZER, "checkpoint": tiny_vqgan[0], "yaml": tiny_vqgan[1], **tokenizer}
    return PretrainModule(**module_init_args(image_tokenizer=tok))


def _datamodule(module, shards, shard_format):
    dm = VideoDataModule(train_shards=shards, batch_size=4, num_workers=0, shuffle_buffer=16, seed=7,
                         shard_format=shard_format)
    dm.trainer = SimpleNamespace(lightning_module=module, training=False)
    dm.setup("fit")
    return dm


def test_pretokenized_batches_equal_decoded_and_tokenized_batches(synthetic_shards, token_shards, tiny_vqgan):
    report = token_shards["report"]
    assert report["shards_written"] == 6 and report["samples"] == 48 and not report["skipped"]
    assert report["frames"] == 48 * 8  # every native frame of every clip
    module = _module(tiny_vqgan)
    video = list(_datamodule(module, synthetic_shards["train_shards"], "video").train_dataloader())
    tokens = list(_datamodule(module, token_shards["train_shards"], "tokens").train_dataloader())
    assert len(video) == len(tokens) == 12
    for bv, bt in zip(video, tokens):
        assert bt["codes"].dtype == torch.int64 and bt["codes"].shape == (4, 3, 4, 4)
        assert bv["caption"] == bt["caption"]
        assert [k.rsplit("/", 1)[-1] for k in bv["key"]] == [k.rsplit("/", 1)[-1] for k in bt["key"]]
        hist_v, fut_v, _, _ = module.tokenize(bv)
        hist_t, fut_t, _, _ = module.tokenize(bt)
        assert torch.equal(hist_v, hist_t) and torch.equal(fut_v, fut_t)


def test_tokenize_shards_resumes_and_reports(synthetic_shards, tiny_vqgan, tmp_path):
    out = str(tmp_path / "tok")
    first = tokenize([synthetic_shards["val_shards"]], out, tiny_vqgan[0], image_size=32)
    assert first["shards_written"] == 2
    again = tokenize([synthetic_shards["val_shards"]], out, tiny_vqgan[0], image_size=32)
    assert again["shards_written"] == 0 and again["shards_already_done"] == 2
    os.remove(os.path.join(out, "val-000001.tar"))
    open(os.path.join(out, "val-000001.tar.tmp"), "wb").write(b"partial")  # an interrupted write
    third = tokenize([synthetic_shards["val_shards"]], out, tiny_vqgan[0], image_size=32)
    assert third["shards_written"] == 1 and os.path.isfile(os.path.join(out, "val-000001.tar"))
    assert json.load(open(os.path.join(out, "tokenize-report.json")))["shards_written"] == 1


def test_robot_shards_are_tokenized_per_view(tiny_vqgan, tmp_path):
    src = write_robot_shard(tmp_path / "robot-000000.tar", num_episodes=2, num_frames=5)
    report = tokenize([src], str(tmp_path / "tok"), tiny_vqgan[0], image_size=32, dtype="int32")
    assert report["samples"] == 2 and report["frames"] == 2 * 2 * 5
    with tarfile.open(tmp_path / "tok" / "robot-000000.tar") as tar:
        names = sorted(tar.getnames())
        assert "ep0000.head.tokens.npy" in names and "ep0000.wrist.tokens.npy" in names
        assert not any(n.endswith(".mp4") for n in names)
        codes = np.load(io.BytesIO(tar.extractfile("ep0000.wrist.tokens.npy").read()))
        meta = json.loads(tar.extractfile("ep0000.json").read())
        state = tar.extractfile("ep0000.state.npy").read()
    with tarfile.open(src) as tar:
        assert tar.extractfile("ep0000.state.npy").read() == state  # other members travel unchanged
    assert codes.dtype == np.int32 and codes.shape == (5, 4, 4)
    assert meta["instruction"] == "push the block" and set(meta["tokens"]["views"]) == {"head", "wrist"}


def test_tokens_from_another_tokenizer_or_format_are_clear_errors(synthetic_shards, token_shards, tiny_vqgan):
    other = PretrainModule(**module_init_args(image_tokenizer={**TINY_TOKENIZER, "random_init_seed": 5}))
    with pytest.raises(ConfigError, match="tokens.fingerprint.*different VQGAN"):
        _datamodule(other, token_shards["train_shards"], "tokens")
    bigger = PretrainModule(**module_init_args(image_tokenizer={**TINY_TOKENIZER, "codebook_size": 128}))
    with pytest.raises(ConfigError, match="tokens.codebook_size' is 64 but the model's tokenizer has 128"):
        _datamodule(bigger, token_shards["train_shards"], "tokens")
    with pytest.raises(ConfigError, match="no tokens.npy member"):
        _datamodule(_module(tiny_vqgan), synthetic_shards["train_shards"], "tokens")
    with pytest.raises(ConfigError, match="shard_format must be 'video' or 'tokens'"):
        VideoDataModule(train_shards=token_shards["train_shards"], shard_format="npy")


def test_corrupt_tokens_are_skipped_and_counted(token_shards, tiny_vqgan, tmp_path, caplog):
    src = expand_urls(token_shards["train_shards"], "x")[0]
    bad = str(tmp_path / "bad-000000.tar")
    with wds.TarWriter(bad) as w:
        for i, raw in enumerate(wds.tarfile_to_samples()(iter([{"url": src}]))):
            sample = {k: v for k, v in raw.items() if not k.startswith("__")}
            if i == 1:
                sample["tokens.npy"] = sample["tokens.npy"][:40]  # truncated array
            w.write({"__key__": raw["__key__"], **sample})
    spec = _module(tiny_vqgan).tokens_spec
    clip = _module(tiny_vqgan).clip_spec
    items = list(ClipStream([bad], clip, shuffle=False, tokens=spec))
    assert len(items) == 7 and sum(int(i["num_skipped"]) for i in items) == 1
    assert "tokens.npy" in caplog.text


def test_tokenize_shards_cli_errors(synthetic_shards, tiny_vqgan, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tokenize_main(["--shards", synthetic_shards["val_shards"], "--out", str(tmp_path), "--image-size", "32",
                       "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert exc.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tokenize_main(["--shards", synthetic_shards["val_shards"], "--out", str(tmp_path), "--image-size", "30",
                       "--checkpoint", tiny_vqgan[0]])
    assert "image_size 30 is not a multiple" in capsys.readouterr().err
    with wds.TarWriter(str(tmp_path / "small-000000.tar")) as w:
        from gr.data.video_io import encode_mp4

        w.write({"__key__": "a", "mp4": encode_mp4(np.zeros((3, 6, 6, 3), np.uint8), 8.0), "json": b'{"caption": "x"}'})
    with pytest.raises(ValueError, match="no sample could be tokenized .*6x6 px frames are smaller than the tokenizer's downsampling factor 8"):
        tokenize([str(tmp_path / "small-000000.tar")], str(tmp_path / "o"), tiny_vqgan[0], image_size=32)
    assert not os.path.exists(tmp_path / "o" / "small-000000.tar")  # no empty shard left behind


def test_pretraining_fits_on_pretokenized_shards(token_shards, tiny_vqgan, tmp_path):
    from gr.cli import run_lightning_cli

    cfg_path = write_config(tmp_path / "c.yaml", token_shards, str(tmp_path / "run"), max_steps=3, every_n_steps=3)
    cfg = yaml.safe_load(open(cfg_path))
    cfg["data"]["init_args"]["shard_format"] = "tokens"
    cfg["model"]["init_args"]["image_tokenizer"].update(checkpoint=tiny_vqgan[0], yaml=tiny_vqgan[1])
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    cli = run_lightning_cli(["fit", "--config", cfg_path])
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert TINY_MODEL["clip"]["image_size"] == 32
