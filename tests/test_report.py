"""`gr report RUN_DIR`: a real tiny run (training with validation rollouts, `gr rollout`, `gr eval`) becomes one
self-contained report.html, which headless Chromium loads with every image, plot and video and no console error."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from gr.report import main as report_main
from tests.conftest import REPO, TINY_ROBOT_MODEL, module_init_args, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(synthetic_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "run"
    pre = root / "pretrain"
    root.mkdir()
    cfg = write_config(root.parent / "c.yaml", synthetic_shards, str(pre), max_steps=4, every_n_steps=4)
    spec = yaml.safe_load(open(cfg))
    spec["trainer"]["log_every_n_steps"] = 1
    spec["trainer"]["callbacks"].append({"class_path": "gr.training.callbacks.RolloutVideos",
                                         "init_args": {"num_samples": 1}})
    yaml.safe_dump(spec, open(cfg, "w"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", cfg], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pre / "config.yaml").write_text(open(cfg).read())  # what LightningCLI saves beside a logged run

    from gr.evaluate import evaluate
    from gr.rollout import main as rollout_main
    from gr.training.finetune import FinetuneModule

    rollout_main(["--checkpoint", str(pre / "checkpoints" / "last.ckpt"), "--source", synthetic_shards["val_shards"],
                  "--out", str(root / "rollout"), "--num-frames", "2"])
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
    module.normalization_stats({k: {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}
                                for k in ("state", "action")})
    ckpt = root / "robot.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    evaluate(str(ckpt), ["drawer-open-v3"], episodes=1, max_steps=4, out=str(root / "eval"))
    return root


def test_run_logs_every_metric_for_the_report(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "pretrain" / "summary" / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # log_every_n_steps = 1
    assert all("data/skipped_total" in r for r in train)  # every logged metric, not only the loss
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [4] and "val/token_acc" in val[0]
    assert os.path.isfile(next((run_dir / "pretrain" / "rollouts").iterdir()) / "metrics.json")


def test_report_holds_curves_rollouts_eval_and_config_inline(run_dir, capsys):
    result = report_main([str(run_dir)])
    assert result["stages"] == 1 and result["rollouts"] == 2 and result["evals"] == 1 and result["configs"] == 1
    page = open(run_dir / "report.html").read()
    assert not result["linked"] and "data:image/gif;base64," in page and "data:video/mp4;base64," in page
    assert page.count('class="plot"') == result["plots"] == 3  # curves + two rollout metric plots
    assert "drawer-open-v3" in page and "psnr_copy_last" in page and "seed_everything" in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:") for s in srcs)  # self-contained: nothing outside the file
    small = report_main([str(run_dir), "--out", str(run_dir / "small.html"), "--max-embed-mib", "0"])
    assert small["linked"] and "linked, not embedded" in open(run_dir / "small.html").read()


def test_report_refuses_an_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report_main([str(tmp_path)])
    assert "nothing to report" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "report.html")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make install's apt step installs it)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    report_main([str(run_dir), "--out", str(tmp_path / "report.html")])
    url = "file://" + str(tmp_path / "report.html")
    # Root needs --no-sandbox; the network flags keep Chromium from calling out on a machine with no internet.
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
             "--no-first-run", "--disable-quic", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--virtual-time-budget=15000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True,
                         text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    assert data.get("checked") == "yes", body
    assert int(data["images-total"]) > 3 and data["images-loaded"] == data["images-total"], data
    assert int(data["plots-total"]) == 3 and data["plots-loaded"] == data["plots-total"], data
    assert int(data["videos-total"]) >= 2 and data["videos-ready"] == data["videos-total"], data
    assert json.loads(data["errors"].replace("&quot;", '"')) == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console, console
    shot = tmp_path / "shot.png"
    proc = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # a rendered page, not a blank one


def test_report_embeds_only_files_inside_the_run(tmp_path):
    outside = tmp_path / "secret.gif"
    outside.write_bytes(b"GIF89a-not-for-the-report")
    run = tmp_path / "run" / "rollout"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"metrics": {"psnr": [20.0]},
                                                  "samples": [{"name": "s", "caption": "c", "gif": str(outside)}]}))
    result = report_main([str(tmp_path / "run")])
    page = open(result["report"]).read()
    import base64

    assert base64.b64encode(outside.read_bytes()).decode()[:20] not in page and "<img alt=" not in page
