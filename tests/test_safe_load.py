"""Checkpoints load without running code from them: inert placeholders for pickled objects, allow-listed classes."""

import argparse
import builtins
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gr.config import ImageTokenizerConfig
from gr.encoders import load_taming_vqgan, save_taming_vqgan
from gr.encoders.vqgan import VQGAN, ddconfig_from
from gr.safe_load import Inert, load_checkpoint, resolve_class_path
from gr.training.checkpoint_io import AtomicCheckpointIO, module_from_checkpoint
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_TOKENIZER, module_init_args


class WritesFile:
    """Unpickling this with the stock pickle creates `path` (its __reduce__ calls builtins.open)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class ModelCheckpoint:  # a Lightning-1 callback as pickled into public .ckpt files, keyed by its class
    def __init__(self):
        self.best_model_path = "epoch=3.ckpt"


def _legacy_ckpt(tmp_path, model, marker):
    """A taming/Lightning-1 style .ckpt: weights plus pickled objects, two of which would write `marker`."""
    path = str(tmp_path / "legacy.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=4.5e-6, embed_dim=32),
                "callbacks": {ModelCheckpoint: ModelCheckpoint().__dict__}, "optimizer_states": [WritesFile(marker)],
                "hook": RunsShell(f"touch {marker}.sh"), "pytorch-lightning_version": "1.0.8"}, path)
    return path


def test_legacy_taming_ckpt_loads_and_runs_nothing(tmp_path):
    torch.manual_seed(1)
    model = VQGAN(ddconfig_from(ImageTokenizerConfig(**TINY_TOKENIZER)), 64, 32)
    save_taming_vqgan(model, str(tmp_path / "vq.ckpt"), str(tmp_path / "vq.yaml"))
    marker = str(tmp_path / "pwned")
    legacy = _legacy_ckpt(tmp_path, model, marker)
    with pytest.raises(Exception):  # the file really needs pickle: torch's weights_only loader refuses it
        torch.load(legacy, weights_only=True)
    loaded = load_taming_vqgan(legacy, str(tmp_path / "vq.yaml"))
    assert not os.path.exists(marker) and not os.path.exists(marker + ".sh")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # The foreign objects are inert records of what the file held.
    raw = load_checkpoint(legacy)
    assert not os.path.exists(marker)
    hp = raw["hyper_parameters"]
    assert isinstance(hp, Inert) and hp.target == "argparse.Namespace" and hp.state == {"lr": 4.5e-6, "embed_dim": 32}
    assert raw["optimizer_states"][0].target in ("io.open", "builtins.open")
    assert raw["optimizer_states"][0].args == (marker, "w")
    assert raw["hook"].target in ("posix.system", "os.system", "nt.system")
    (cb_key, cb_state), = raw["callbacks"].items()
    assert issubclass(cb_key, Inert) and cb_key.target.endswith("ModelCheckpoint")
    assert cb_state == {"best_model_path": "epoch=3.ckpt"}
    assert raw["pytorch-lightning_version"] == "1.0.8"
    # The same loader serves Lightning's --ckpt_path (the checkpoint IO plugin).
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(legacy)["state_dict"]["quantize.embedding.weight"],
                       model.state_dict()["quantize.embedding.weight"])
    assert not os.path.exists(marker)


def test_allow_pickle_is_a_deprecated_noop():
    with pytest.warns(DeprecationWarning, match="allow_pickle is deprecated"):
        ImageTokenizerConfig(**TINY_TOKENIZER, allow_pickle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageTokenizerConfig(**TINY_TOKENIZER)


def _gr_ckpt(tmp_path, name, **hparams_update):
    module = PretrainModule(**module_init_args())
    hp = {**dict(module.hparams), **hparams_update}
    path = str(tmp_path / name)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp}, path)
    return path


def test_checkpoint_naming_os_system_is_refused(tmp_path):
    from gr.policy import GRPolicy

    marker = tmp_path / "shell-ran"
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system", "command": f"touch {marker}"}},
               evil)
    for load in (module_from_checkpoint, GRPolicy.from_checkpoint):
        with pytest.raises(ValueError) as err:
            load(evil)
        msg = str(err.value)
        assert "\n" not in msg and "evil.ckpt" in msg and "'os.system'" in msg
    assert not marker.exists()


def test_class_path_module_is_never_imported(tmp_path, monkeypatch):
    """A class path in a module that is not imported yet is refused before importing it (imports run code)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Module:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="evil_module.Module"):
        resolve_class_path("evil_module.Module", "x.ckpt")
    assert not marker.exists() and "evil_module" not in sys.modules


def test_gr_classes_and_imported_subclasses_are_accepted(tmp_path):
    assert resolve_class_path("gr.training.pretrain.PretrainModule", "x.ckpt") is PretrainModule
    module = module_from_checkpoint(_gr_ckpt(tmp_path, "pre.ckpt"))
    assert isinstance(module, PretrainModule)
    # A user's subclass loads once its module is imported (here: this test module); a non-module class does not.
    global MyPretrain

    class MyPretrain(PretrainModule):
        pass

    assert resolve_class_path(f"{__name__}.MyPretrain", "x.ckpt") is MyPretrain
    with pytest.raises(ValueError, match="WritesFile"):
        resolve_class_path(f"{__name__}.WritesFile", "x.ckpt")


def test_cli_ckpt_path_refuses_foreign_class(tmp_path):
    """`gr`'s LightningCLI reads --ckpt_path's class path: a foreign one is refused in one line, nothing runs."""
    marker = tmp_path / "shell-ran"
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system", "command": f"touch {marker}"}},
               evil)
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                          "pretrain.yaml")
    proc = subprocess.run([sys.executable, "-m", "gr.cli", "pretrain", "fit", "--config", config, "--ckpt_path", evil],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "refusing _class_path 'os.system'" in proc.stderr
    assert not marker.exists()
