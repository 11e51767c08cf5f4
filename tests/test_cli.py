"""CLI surfaces: every YAML parses, bad configs give one clear line, the `lightning` and `gr` scripts are ours."""

import glob
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from gr.cli import run_lightning_cli
from tests.conftest import REPO, write_config

CONFIGS = sorted(c for c in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "strategy" + os.sep not in c)  # strategy overlays: tests/test_strategies.py


def test_there_are_configs():
    rel = {os.path.relpath(c, REPO) for c in CONFIGS}
    assert {"configs/pretrain.yaml", "configs/demo/pretrain.yaml", "configs/tokenizer.yaml", "configs/finetune.yaml",
            "configs/demo/tokenizer.yaml", "configs/demo/finetune.yaml"} <= rel


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_parses_through_the_cli(path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli(["fit", "--config", path, "--print_config"])
    assert exc.value.code in (0, None)
    assert "class_path: gr.training" in capsys.readouterr().out


def _fit_error(cfg: str, *overrides: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", cfg, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("override,message", [
    ("--model.init_args.image_tokenizer.checkpoint=/no/such/vqgan.ckpt",
     "image_tokenizer.checkpoint: file not found: '/no/such/vqgan.ckpt'"),
    ("--model.init_args.text_encoder.model_name=ViT-Nope", "unknown open_clip model 'ViT-Nope'"),
    ("--data.init_args.train_shards=/no/such/train-{0..3}.tar", "data.train_shards: shard file not found"),
])
def test_bad_config_gives_a_clear_error(synthetic_shards, tmp_path, override, message):
    cfg = write_config(tmp_path / "c.yaml", synthetic_shards, str(tmp_path / "run"))
    assert message in _fit_error(cfg, override)


def test_lightning_console_script_is_ours():
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "lightning"]
    assert [e.value for e in scripts] == ["gr.cli:lightning_main"]  # lightning itself ships none: no clash
    gr = [e for e in entry_points(group="console_scripts") if e.name == "gr"]
    assert [e.value for e in gr] == ["gr.cli:main"]


def test_gr_presets_command(capsys):
    from gr.cli import main

    main(["presets"])
    out = capsys.readouterr().out
    assert '"B"' in out and '"ratio"' in out


@pytest.mark.parametrize("cmd, usage", [("export", "gr export [-h]"), ("serve", "gr serve [-h] --checkpoint"),
                                        ("report", "gr report [-h]")])
def test_new_subcommands_have_help(cmd, usage, capsys):
    from gr.cli import main

    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {usage}")
