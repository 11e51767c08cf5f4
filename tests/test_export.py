"""`gr export`: model.safetensors + config.json + card, loaded back without Lightning to the same actions, used by
rollout / eval / init_from, and refusing what it cannot export. Sharded inputs: tests/test_deepspeed.py (ZeRO-2/3)
and tests/test_strategies.py (FSDP2 distributed checkpoint)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gr.encoders.vqgan import VQGAN, ddconfig_from, save_taming_vqgan
from gr.config import ImageTokenizerConfig
from gr.export import export, load_export, main as export_main, read_export_config
from gr.policy import GRPolicy
from gr.training.finetune import FinetuneModule
from gr.training.pretrain import PretrainModule
from tests.conftest import REPO, TINY_ROBOT_MODEL, TINY_TOKENIZER, module_init_args

STATS = {"state": {"mean": [0.1, -0.2, 0.0, 0.3], "std": [0.2, 0.3, 0.25, 0.5], "min": [-1.0] * 4, "max": [1.0] * 4},
         "action": {"mean": [0.0, 0.1, -0.1, 0.0], "std": [0.5, 0.4, 0.3, 1.0], "min": [-1.0] * 4, "max": [1.0] * 4}}


def _observations(n=5, size=40, seed=0):
    """Observations at another resolution than the model's (the policy resizes), changing over the episode."""
    rng = np.random.default_rng(seed)
    return [{"images": {v: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for v in ("head", "wrist")},
             "state": rng.normal(size=4).astype(np.float32), "instruction": ["open the drawer", "push it"][i % 2]}
            for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finetuned checkpoint whose VQGAN is a taming .ckpt + yaml file (not seeded random), in a run-like folder
    with the run's config.yaml and an eval.json naming the checkpoint."""
    root = tmp_path_factory.mktemp("exp")
    torch.manual_seed(3)
    vq = VQGAN(ddconfig_from(ImageTokenizerConfig(**TINY_TOKENIZER)), 64, 32)
    save_taming_vqgan(vq, str(root / "vqgan.ckpt"), str(root / "vqgan.yaml"))
    tok = {"checkpoint": str(root / "vqgan.ckpt"), "yaml": str(root / "vqgan.yaml"), "codebook_size": 64}
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL, image_tokenizer=tok))
    with torch.no_grad():  # weights that differ from any seeded init
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    module.normalization_stats(STATS)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7,
                "epoch": 1}, ckpt)
    (run / "config.yaml").write_text("data:\n  class_path: gr.data.robot_stream.RobotDataModule\n  init_args:\n"
                                     "    train_shards: lab/teleop-{000000..000003}.tar\n    batch_size: 8\n"
                                     "trainer:\n  max_steps: 7\n")
    (run / "eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "episodes_per_task": 2,
                                               "mean_success_rate": 0.25,
                                               "tasks": {"drawer-open-v3": {"success_rate": 0.5},
                                                         "button-press-v3": {"success_rate": 0.0}}}))
    out = root / "export"
    config = export(str(ckpt), str(out))
    return {"ckpt": str(ckpt), "out": str(out), "config": config, "root": root, "vqgan": str(root / "vqgan.ckpt")}


def test_export_folder_holds_weights_config_card_and_bundled_encoders(trained):
    out, config = trained["out"], trained["config"]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "encoders", "model.safetensors"]
    assert sorted(os.listdir(os.path.join(out, "encoders"))) == ["vqgan.safetensors", "vqgan.yaml"]
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any(k.startswith(("text_encoder.", "image_tokenizer.")) for k in weights)  # frozen: referenced
    assert any(k.startswith("model.action_head.") for k in weights) and "stats_action" in weights
    on_disk = read_export_config(out)
    assert on_disk == json.loads(json.dumps(config))
    for name in ("state", "action"):
        for row in ("mean", "std"):
            np.testing.assert_allclose(on_disk["normalization_stats"][name][row], STATS[name][row], rtol=1e-6)
    assert on_disk["encoders"]["image_tokenizer"]["source"] == "bundled"
    assert on_disk["encoders"]["text_encoder"]["source"] == "random"
    assert on_disk["hyper_parameters"]["image_tokenizer"]["checkpoint"] == "encoders/vqgan.safetensors"
    assert on_disk["source"]["global_step"] == 7 and on_disk["source"]["checkpoint_kind"] == "lightning"
    assert on_disk["data"]["train_shards"] == "lab/teleop-{000000..000003}.tar"
    assert on_disk["eval"]["mean_success_rate"] == 0.25 and on_disk["eval"]["of_this_checkpoint"]
    card = open(os.path.join(out, "README.md")).read()
    assert f"{on_disk['sizes']['parameters']:,}" in card and "| drawer-open-v3 | 50% |" in card
    assert "lab/teleop-" in card and "views head, wrist" in card
    assert str(trained["root"]) not in json.dumps(on_disk)  # bundled: no path of the training machine


def test_from_pretrained_gives_the_checkpoints_actions_exactly(trained):
    a, b = GRPolicy.from_checkpoint(trained["ckpt"]), GRPolicy.from_pretrained(trained["out"])
    for obs in _observations():
        np.testing.assert_array_equal(a.act(obs), b.act(obs))
    a.reset(), b.reset()
    for obs in _observations(seed=1):
        np.testing.assert_array_equal(a.step(obs), b.step(obs))


def test_from_pretrained_runs_without_lightning(trained, tmp_path):
    """In a fresh interpreter: load the export, act, and never import Lightning."""
    obs = _observations(2)
    np.savez(tmp_path / "obs.npz", **{f"{i}_{v}": o["images"][v] for i, o in enumerate(obs) for v in o["images"]},
             **{f"{i}_state": o["state"] for i, o in enumerate(obs)})
    expected = [GRPolicy.from_checkpoint(trained["ckpt"]).act(o) for o in obs[:1]]
    code = (
        "import sys, numpy as np\n"
        "from gr.policy import GRPolicy\n"
        f"p = GRPolicy.from_pretrained({trained['out']!r})\n"
        f"d = np.load({str(tmp_path / 'obs.npz')!r})\n"
        "a = p.act({'images': {'head': d['0_head'], 'wrist': d['0_wrist']}, 'state': d['0_state'],"
        f" 'instruction': {obs[0]['instruction']!r}}})\n"
        f"np.save({str(tmp_path / 'a.npy')!r}, a)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), expected[0])


def test_export_folder_checks_its_encoders(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained["out"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["encoders"]["image_tokenizer"]["codebook_fingerprint"] = "0" * 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoders.image_tokenizer: the VQGAN loaded has codebook fingerprint"):
        load_export(str(bad))
    cfg["encoders"]["image_tokenizer"]["codebook_fingerprint"] = trained["config"]["encoders"]["image_tokenizer"][
        "codebook_fingerprint"]
    cfg["encoders"]["text_encoder"]["fingerprint"] = "f" * 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoders.text_encoder: the text tower loaded has fingerprint"):
        load_export(str(bad))
    os.remove(bad / "encoders" / "vqgan.safetensors")
    with pytest.raises(ValueError, match=r"hyper_parameters.image_tokenizer.checkpoint: file not found"):
        load_export(str(bad))
    (bad / "config.json").write_text("{\"format\": \"something-else\"}")
    with pytest.raises(ValueError, match="format is 'something-else'"):
        load_export(str(bad))


def test_reference_encoders_point_at_the_run_files(trained, tmp_path):
    config = export(trained["ckpt"], str(tmp_path / "ref"), bundle_encoders=False)
    assert config["encoders"]["image_tokenizer"]["source"] == "reference"
    assert config["hyper_parameters"]["image_tokenizer"]["checkpoint"] == os.path.abspath(trained["vqgan"])
    assert not os.path.exists(tmp_path / "ref" / "encoders")
    obs = _observations(1)[0]
    np.testing.assert_array_equal(GRPolicy.from_pretrained(str(tmp_path / "ref")).act(obs),
                                  GRPolicy.from_checkpoint(trained["ckpt"]).act(obs))


def test_export_cli_refuses_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(SystemExit):
        export_main([trained["ckpt"], str(taken)])
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert os.listdir(taken) == ["x"]
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system", "command": "touch pwned"}}, evil)
    with pytest.raises(SystemExit):
        export_main([str(evil), str(tmp_path / "e")])
    assert "refusing _class_path 'os.system'" in capsys.readouterr().err
    fake = tmp_path / "tok.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "gr.training.tokenizer.TokenizerModule"}}, fake)
    with pytest.raises(SystemExit):
        export_main([str(fake), str(tmp_path / "t")])
    assert "TokenizerModule checkpoint is not exported" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["evil.ckpt", "taken", "tok.ckpt"]  # no folder made for the refused
    import gr.export

    def broken_card(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gr.export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):  # a failure mid-write leaves no folder, not even a temp one
        export(trained["ckpt"], str(tmp_path / "half"))
    assert sorted(os.listdir(tmp_path)) == ["evil.ckpt", "taken", "tok.ckpt"]
    monkeypatch.undo()
    with pytest.raises(SystemExit):  # --overwrite replaces an earlier export only, never another folder
        export_main([trained["ckpt"], str(taken), "--overwrite"])
    assert "is not a gr export folder" in capsys.readouterr().err and os.listdir(taken) == ["x"]
    with pytest.raises(SystemExit):  # nor the run folder the checkpoint is in
        export_main([trained["ckpt"], os.path.dirname(trained["ckpt"]), "--overwrite"])
    assert "not a gr export folder" in capsys.readouterr().err and os.path.isfile(trained["ckpt"])
    again = tmp_path / "again"
    export_main([trained["ckpt"], str(again)])
    (again / "stale.txt").write_text("from the earlier export")
    export_main([trained["ckpt"], str(again), "--overwrite"])
    assert "model.safetensors" in os.listdir(again) and "stale.txt" not in os.listdir(again)


def test_rollout_eval_and_init_from_take_an_export_folder(trained, robot_shards, tmp_path):
    from gr.evaluate import evaluate
    from gr.rollout import main as rollout_main

    report = rollout_main(["--checkpoint", trained["out"], "--source", robot_shards["val_shards"], "--out",
                           str(tmp_path / "ro"), "--num-samples", "1"])
    assert report and os.listdir(tmp_path / "ro")
    result = evaluate(trained["out"], ["drawer-open-v3"], episodes=1, max_steps=3, workers=1, video=False)
    assert result["tasks"]["drawer-open-v3"]["num_episodes"] == 1

    torch.manual_seed(1)
    pre = PretrainModule(**module_init_args())
    pre_ckpt = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, pre_ckpt)
    export(str(pre_ckpt), str(tmp_path / "pre_export"))
    assert read_export_config(str(tmp_path / "pre_export"))["normalization_stats"] is None
    ft = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL), init_from=str(tmp_path / "pre_export"))
    assert ft.init_report["loaded"] and not ft.init_report["missing_required"]
    torch.testing.assert_close(ft.model.trunk.state_dict(), pre.model.trunk.state_dict(), rtol=0, atol=0)


class _WritesAFile:
    """Unpickling this runs `open(path, 'w')`: the file appearing means a loader ran code from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_sharded_folders_never_run_code_from_their_files(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps({"planner": _WritesAFile(str(marker))}))
    with pytest.raises(ValueError, match=r"\.metadata'?: refusing the checkpoint metadata: names (builtins|io).open"):
        export(str(dcp), str(tmp_path / "a"))
    # A class that DCP's modules merely import is not metadata either (a thread pool, a TCP store...).
    (dcp / ".metadata").write_bytes(b"\x80\x04ctorch.distributed.checkpoint.filesystem\nThreadPoolExecutor\n)R.")
    with pytest.raises(ValueError, match="names torch.distributed.checkpoint.filesystem.ThreadPoolExecutor"):
        export(str(dcp), str(tmp_path / "a"))
    ds = tmp_path / "ds" / "checkpoint"
    ds.mkdir(parents=True)
    torch.save({"module": {}, "hyper_parameters": _WritesAFile(str(marker))}, ds / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError):
        export(str(tmp_path / "ds"), str(tmp_path / "b"))
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["dcp", "ds"]
