"""`gr experiment` end to end at a tiny size: both arms train and run closed loop, results resume, and bad input
gives one line.

One real Meta-World task (coffee-button-v3, 2 + 2 demos at 32 px) made by the experiment itself, a 2-layer model,
2 finetuning steps per arm, 1 eval episode of at most 12 steps per task.
"""

import json
import os
import sys

import pytest
import torch
import yaml

from gr.cli import main as gr_main
from gr.experiment import newcombe, wilson
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_ROBOT_MODEL, TINY_TOKENIZER, module_init_args, write_config
from tests.test_pretokenized import tiny_vqgan  # noqa: F401 - a fixture, used by name

TASK, ZERO_SHOT = "coffee-button-v3", "drawer-close-v3"


def save_pretrained(path, image_tokenizer: dict, seed: int = 0) -> str:
    torch.manual_seed(seed)
    module = PretrainModule(**module_init_args(image_tokenizer=image_tokenizer))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tiny_vqgan, tmp_path_factory):  # noqa: F811
    """A pretraining checkpoint tokenizing with a saved taming VQGAN, and a tiny finetune config."""
    root = tmp_path_factory.mktemp("experiment")
    ckpt = save_pretrained(root / "pre.ckpt", {**TINY_TOKENIZER, "checkpoint": tiny_vqgan[0], "yaml": tiny_vqgan[1]})
    cfg = yaml.safe_load(open(write_config(root / "base.yaml", {"train_shards": "x", "val_shards": "x"},
                                           str(root / "unused"), max_steps=2, every_n_steps=2)))
    cfg["model"] = {"class_path": "gr.training.finetune.FinetuneModule",
                    "init_args": module_init_args(model=TINY_ROBOT_MODEL)}
    cfg["data"] = {"class_path": "gr.data.robot_stream.RobotDataModule",
                   "init_args": {"train_shards": "x", "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8}}
    config = root / "finetune.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "pretrained": ckpt, "config": str(config)}


def experiment_args(setup, out, *extra) -> list[str]:
    return ["--pretrained", setup["pretrained"], "--pretrain-includes-target-tasks", "no", "--config",
            setup["config"], "--steps", "2", "--tasks", TASK, "--eval-only-tasks", ZERO_SHOT, "--demos", "2",
            "--seeds", "0", "--eval-episodes", "1", "--eval-max-steps", "12", "--workers", "1", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def finished(tiny_setup):
    out = tiny_setup["root"] / "out"
    gr_main(["experiment", *experiment_args(tiny_setup, out)])  # through the `gr` dispatch
    return out, json.load(open(out / "experiment.json"))


def test_experiment_json_schema_and_plot(finished, tiny_setup):
    out, res = finished
    assert res["pretrain_includes_target_tasks"] is False and res["command"] == sys.argv
    assert res["sessions"][0]["arguments"][:2] == ["--pretrained", tiny_setup["pretrained"]]
    assert res["options"]["steps"] == 2 and res["options"]["tasks"] == [TASK] and res["wall_seconds"] > 0
    assert set(res["arms"]) == {"pretrained_d2_s0", "scratch_d2_s0"}
    pre, scratch = res["arms"]["pretrained_d2_s0"], res["arms"]["scratch_d2_s0"]
    assert pre["init_from"] == os.path.abspath(tiny_setup["pretrained"]) and scratch["init_from"] is None
    assert pre["transfer"]["loaded"] > 0 and scratch["transfer"]["loaded"] == 0
    for arm in (pre, scratch):
        assert arm["global_step"] == 2 and arm["train_seconds"] > 0 and arm["eval_seconds"] > 0
        assert arm["final_train_loss"] > 0 and "val/loss" in arm["val"]
        assert set(arm["success"]) == {TASK, ZERO_SHOT}  # the zero-shot task ran too
        assert arm["success"][TASK] == sum(e["success"] for e in arm["episodes"][TASK])
    # Same layouts for both arms.
    assert [e["seed"] for e in pre["episodes"][TASK]] == [e["seed"] for e in scratch["episodes"][TASK]]
    hp = torch.load(pre["checkpoint"], weights_only=True)["hyper_parameters"]
    assert hp["image_tokenizer"]["checkpoint"] == res["pretrained"]["image_tokenizer"]["checkpoint"]
    assert res["data"]["subsets"]["2"]["shards"].endswith("train-000000.tar")
    stats = json.load(open(res["data"]["subsets"]["2"]["stats_file"]))
    assert stats["num_episodes"] == 2
    summary = res["summary"]
    cell = summary["by_arm"]["pretrained"]["2"]["mean"]
    k = sum(e["success"] for e in pre["episodes"][TASK])
    assert (cell["successes"], cell["episodes"]) == (k, 1) and cell["ci95"] == pytest.approx(list(wilson(k, 1)))
    assert set(summary["by_arm"]["scratch"]["2"]) >= {"mean", TASK, ZERO_SHOT, "eval_only_mean", "seeds"}
    diff = summary["pretrained_minus_scratch"]["2"]["mean"]
    assert diff["difference"] == cell["success"] - summary["by_arm"]["scratch"]["2"]["mean"]["success"]
    assert sum(diff["paired"].values()) == 1
    assert os.path.getsize(out / "experiment.png") > 1000 and res["plot"] == str(out / "experiment.png")


def test_interval_formulas():
    """Worked examples of Newcombe (1998): Wilson score intervals (Stat Med 17:857) and the hybrid score interval
    of a difference, method 10 (Stat Med 17:873)."""
    rounded = lambda ci: tuple(round(x, 4) for x in ci)  # noqa: E731
    assert rounded(wilson(81, 263)) == (0.2553, 0.3662) and rounded(wilson(15, 148)) == (0.0624, 0.1605)
    assert rounded(wilson(0, 20)) == (0.0, 0.1611)
    assert rounded(newcombe(56, 70, 48, 80)) == (0.0524, 0.3339) and rounded(newcombe(9, 10, 3, 10)) == (0.1705, 0.809)


def test_all_or_no_success_intervals_and_plot(tmp_path):
    """0% and 100% cells: the Wilson bounds are exactly 0 and 1 (the float formula gave 1 - 1e-16 at n = 10, which
    made matplotlib refuse a negative error bar and killed an experiment after its arm had finished)."""
    from gr.experiment import plot, summarize

    assert all(wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0 for n in range(1, 200))
    episodes = lambda ok: {TASK: [{"success": ok, "seed": i} for i in range(10)]}  # noqa: E731
    arms = {f"{arm}_d5_s0": {"arm": arm, "demos": 5, "seed": 0, "episodes": episodes(arm == "pretrained")}
            for arm in ("pretrained", "scratch")}
    summary = summarize(arms, [TASK], [])
    plot(summary, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 1000


def test_resume_skips_finished_arms(finished, tiny_setup, monkeypatch):
    import gr.experiment as experiment

    out, res = finished
    ckpt = res["arms"]["scratch_d2_s0"]["checkpoint"]
    mtime = os.path.getmtime(ckpt)
    monkeypatch.setattr(experiment, "run_arm", lambda *a, **k: pytest.fail("a finished arm was run again"))
    again = experiment.main(experiment_args(tiny_setup, out))
    assert again["arms"] == res["arms"] and os.path.getmtime(ckpt) == mtime
    assert len(again["sessions"]) == len(res["sessions"]) + 1


def test_resume_compares_file_options_by_content_not_path(finished, tiny_setup, tmp_path, monkeypatch, capsys):
    """The same pretraining checkpoint and config at other paths (a moved experiment, another machine) resume; another
    checkpoint at any path is refused."""
    import shutil

    import gr.experiment as experiment

    out, res = finished
    moved = {"pretrained": str(tmp_path / "moved.ckpt"), "config": str(tmp_path / "moved.yaml")}
    shutil.copy(tiny_setup["pretrained"], moved["pretrained"])
    shutil.copy(tiny_setup["config"], moved["config"])
    monkeypatch.setattr(experiment, "run_arm", lambda *a, **k: pytest.fail("a finished arm was run again"))
    again = experiment.main(experiment_args(moved, out))
    assert again["arms"] == res["arms"] and again["options"]["fingerprints"] == res["options"]["fingerprints"]
    other = save_pretrained(tmp_path / "other.ckpt", TINY_TOKENIZER)
    with pytest.raises(SystemExit):
        experiment.main(experiment_args({**moved, "pretrained": other}, out))
    assert "holds runs made with another pretrained" in capsys.readouterr().err


def test_bad_input_is_one_line_naming_the_field(finished, tiny_setup, tmp_path, capsys):
    from gr.experiment import main

    other = save_pretrained(tmp_path / "other.ckpt", TINY_TOKENIZER)  # random VQGAN: another codebook
    tokens = str(finished[0] / "data" / "tokens")
    cases = [(["--tasks", "fly-v3"], "--tasks: unknown Meta-World task 'fly-v3'"),
             (["--demos", "0"], "--demos: must be >= 1, got 0"),
             (["--pretrained", str(tmp_path / "none.ckpt")], "--pretrained: file not found"),
             (["--pretrained", other, "--robot-data", tokens], "--robot-data: "),
             (["--eval-only-tasks", TASK], "--eval-only-tasks: ")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(experiment_args(tiny_setup, tmp_path / "bad", *extra))
        assert exc.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(lines) == 1 and lines[0].startswith("gr experiment: error: " + message), lines
        if "--robot-data" in extra:
            assert "tokens.fingerprint" in lines[0] and "different VQGAN" in lines[0]
    assert not (tmp_path / "bad" / "arms").exists()  # nothing trained


def test_reuse_scratch_takes_matching_arms_only(finished, tiny_setup, tmp_path, monkeypatch, capsys):
    """A second experiment from other pretrained weights (same tokenizer, sizes and demos) takes the first one's
    scratch arm and trains only its pretrained arm; any difference in steps, config or data files is refused."""
    import shutil

    import gr.experiment as experiment

    first_out, first = finished
    tok = first["pretrained"]["image_tokenizer"]
    other = save_pretrained(tmp_path / "other.ckpt", {**TINY_TOKENIZER, "checkpoint": tok["checkpoint"],
                                                      "yaml": tok["yaml"]}, seed=1)
    trained = []

    def fake_run_arm(args, spec, data, arm, demos, seed):
        trained.append(arm)  # the pretrained arm's result is not what this test checks
        return {**first["arms"]["pretrained_d2_s0"], "init_from": spec["checkpoint"]}

    monkeypatch.setattr(experiment, "run_arm", fake_run_arm)
    base = experiment_args({**tiny_setup, "pretrained": other}, tmp_path / "ood", "--robot-data",
                           str(first_out / "data" / "tokens"))
    res = experiment.main(base + ["--reuse-scratch", str(first_out)])
    assert trained == ["pretrained"]
    scratch = res["arms"]["scratch_d2_s0"]
    assert scratch["reused_from"] == {"experiment": str(first_out / "experiment.json"), "arm": "scratch_d2_s0"}
    assert scratch["episodes"] == first["arms"]["scratch_d2_s0"]["episodes"]
    assert res["summary"]["by_arm"]["scratch"] == first["summary"]["by_arm"]["scratch"]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from experiment_compare import compare  # the README's comparison table of corpora sharing scratch arms

    rows = compare([("first", first), ("other", res)]).splitlines()
    assert len(rows) == 2 + 3 and rows[2].startswith("| none (scratch) | 2 |") and rows[4].startswith("| other | 2 |")
    changed = json.loads(json.dumps(first))
    changed["arms"]["scratch_d2_s0"]["episodes"][TASK][0]["success"] ^= True
    with pytest.raises(SystemExit, match="other scratch arms"):
        compare([("first", first), ("changed", changed)])

    copy = tmp_path / "copy"
    shutil.copytree(first_out, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints", "eval"))
    with open(copy / "data" / "subsets" / "d2" / "train-stats.json", "a") as f:
        f.write(" ")  # one byte more: not the same data file
    lr_cfg = yaml.safe_load(open(tiny_setup["config"]))
    lr_cfg["model"]["init_args"].setdefault("optim", {})["lr"] = 0.5
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump(lr_cfg))
    cases = [(["--steps", "3", "--reuse-scratch", str(first_out)], "steps is 2, this run's is 3"),
             (["--config", str(tmp_path / "lr.yaml"), "--reuse-scratch", str(first_out)], "arm config differs"),
             (["--reuse-scratch", str(copy)], "train stats data differ"),
             (["--reuse-scratch", str(tmp_path / "nowhere")], "no experiment.json")]
    for n, (extra, message) in enumerate(cases):
        argv = experiment_args({**tiny_setup, "pretrained": other}, tmp_path / f"bad{n}", "--robot-data",
                               str(first_out / "data" / "tokens"), *extra)
        with pytest.raises(SystemExit) as exc:
            experiment.main(argv)
        assert exc.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(lines) == 1 and lines[0].startswith("gr experiment: error: --reuse-scratch: ") and message in lines[0]
    assert trained == ["pretrained"]  # no refused run trained anything


def test_experiment_grid_two_cells_end_to_end(finished, tiny_setup, tmp_path, monkeypatch, capsys):
    """Two cells of the grid (the tokens head, fully finetuned and with LoRA, both with code-shift augmentation) on
    the experiment's data: both train, run closed loop, and report success, latency and trainable parameters; a
    second invocation adds an evaluation seed to both from their checkpoints, without retraining."""
    out = tmp_path / "grid"
    grid_args = ["--pretrained", tiny_setup["pretrained"], "--pretrain-includes-target-tasks", "no", "--config",
                 tiny_setup["config"], "--steps", "2", "--tasks", TASK, "--eval-only-tasks", ZERO_SHOT, "--demos",
                 "2", "--seeds", "0", "--eval-episodes", "1", "--eval-max-steps", "12", "--workers", "1",
                 "--robot-data", finished[1]["data"]["folder"], "--out", str(out), "--latency-repeats", "2"]
    gr_main(["experiment-grid", *grid_args, "--heads", "tokens", "--adapt", "full", "lora", "--augment", "on"])
    grid = json.load(open(out / "grid.json"))
    assert sorted(grid["runs"]) == ["tokens-full-cotrain_off-aug_on_s0", "tokens-lora-cotrain_off-aug_on_s0"]
    lora = grid["runs"]["tokens-lora-cotrain_off-aug_on_s0"]
    full = grid["runs"]["tokens-full-cotrain_off-aug_on_s0"]
    assert lora["trainable_params"] < full["trainable_params"]
    assert grid["sessions"][0]["cells"] == ["tokens-full-cotrain_off-aug_on", "tokens-lora-cotrain_off-aug_on"]
    assert grid["sessions"][0]["arguments"][-7:] == ["--heads", "tokens", "--adapt", "full", "lora", "--augment", "on"]
    assert lora["session"] == full["session"] == 0
    hp = torch.load(lora["checkpoint"], weights_only=False)["hyper_parameters"]
    assert hp["model"]["robot"]["head"]["kind"] == "tokens" and hp["lora"]["rank"] == 8
    assert hp["augment"]["code_shift"] == 1
    for run in (lora, full):
        assert run["act_ms"] > 0 and run["global_step"] == 2 and len(run["episodes"][TASK]) == 1
    s = grid["summary"]["tokens-lora-cotrain_off-aug_on"]
    assert s["episodes"] == 1 and 0 <= s["ci95"][0] <= s["success"] <= s["ci95"][1] <= 1
    assert "| tokens | lora | off | on |" in (out / "grid.md").read_text()
    assert (out / "grid.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        gr_main(["experiment-grid", *grid_args, "--cotrain", "on"])  # no --cotrain-shards
    steps = grid_args.index("--steps") + 1
    with pytest.raises(SystemExit):  # more cells in the same folder must keep the budget the runs had
        gr_main(["experiment-grid", *grid_args[:steps], "3", *grid_args[steps + 1:], "--heads", "cvae"])

    import gr.experiment_grid

    cells = ["--heads", "tokens", "--adapt", "full", "lora", "--augment", "on"]
    monkeypatch.setattr(gr.experiment_grid, "train_arm", lambda *a, **k: pytest.fail("retrained a finished cell"))
    gr_main(["experiment-grid", *grid_args, *cells, "--eval-seeds", "0", "3"])
    again = json.load(open(out / "grid.json"))
    for name, run in again["runs"].items():
        first, extra = run["episodes"][TASK], run["extra_evals"]["3"]["episodes"][TASK]
        assert first == grid["runs"][name]["episodes"][TASK] and len(extra) == 1
        assert {e["seed"] for e in extra}.isdisjoint({e["seed"] for e in first})  # other layouts
    s = again["summary"]["tokens-lora-cotrain_off-aug_on"]
    assert s["episodes"] == 2 and list(s["by_eval_seed"]) == ["0", "3"]
    capsys.readouterr()
    for seeds, message in ((["3"], "--eval-seeds: must list 0"), (["0", "5"], "checkpoint is missing: ")):
        if seeds == ["0", "5"]:
            os.rename(lora["checkpoint"], lora["checkpoint"] + ".moved")
        with pytest.raises(SystemExit) as exc:
            gr_main(["experiment-grid", *grid_args, *cells, "--eval-seeds", *seeds])
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert exc.value.code == 2 and len(lines) == 1 and message in lines[0]
    assert lora["checkpoint"] in lines[0]


def test_grid_summary_covers_runs_of_earlier_invocations(tmp_path):
    """Cells that an earlier invocation (other --heads/--adapt values) wrote to the same --out stay in the summary and
    the table, in axis order, each with its own episodes."""
    from types import SimpleNamespace

    from gr.experiment_grid import plot, summarize, table

    def run(head, adapt, successes):
        return {"head": head, "adapt": adapt, "cotrain": "off", "augment": "off", "seed": 0,
                "episodes": {TASK: [{"success": s} for s in successes]}, "success": {ZERO_SHOT: 0.0},
                "act_ms": 2.0, "train_seconds": 10.0, "trainable_params": 5}

    runs = {"flow-lora": run("flow", "lora", [1, 1, 0, 0]), "cvae-full": run("cvae", "full", [1, 0, 0, 0]),
            "tokens-full": run("tokens", "full", [1, 1, 1, 0]), "flow-full": run("flow", "full", [0, 0, 0, 1])}
    # a second evaluation seed for the reference and flow, not for tokens (compared on the layouts both have)
    for name, successes in (("cvae-full", [1, 1, 0, 0]), ("flow-lora", [1, 1, 1, 0])):
        runs[name]["extra_evals"] = {"1": {k: v for k, v in run("", "", successes).items()
                                           if k in ("success", "episodes")}}
    args = SimpleNamespace(heads=["tokens"], adapt=["full"], cotrain=["off"], augment=["off"], tasks=[TASK],
                           eval_only_tasks=[ZERO_SHOT])  # the latest invocation asked for one cell only
    summary = summarize(runs, args)
    assert list(summary) == ["cvae-full-cotrain_off-aug_off", "flow-full-cotrain_off-aug_off",
                             "flow-lora-cotrain_off-aug_off", "tokens-full-cotrain_off-aug_off"]
    assert [s["successes"] for s in summary.values()] == [3, 1, 5, 3]
    assert [s["episodes"] for s in summary.values()] == [8, 4, 8, 4]
    assert summary["flow-lora-cotrain_off-aug_off"]["by_eval_seed"] == {"0": {"successes": 2, "episodes": 4},
                                                                        "1": {"successes": 3, "episodes": 4}}
    # against the reference cell (cvae, full, off, off), episode by episode on the same layouts
    assert "vs_reference" not in summary["cvae-full-cotrain_off-aug_off"]
    flow = summary["flow-lora-cotrain_off-aug_off"]["vs_reference"]
    assert (flow["difference"], flow["only_this"], flow["only_reference"], flow["eval_seeds"]) == (0.25, 2, 0, [0, 1])
    assert flow["ci95"][0] < 0.25 < flow["ci95"][1]
    tokens = summary["tokens-full-cotrain_off-aug_off"]["vs_reference"]  # evaluation seed 0 only
    assert (tokens["difference"], tokens["only_this"], tokens["only_reference"]) == (0.5, 2, 0)
    assert "| +25 [" in table(summary) and "; 2 / 0 |" in table(summary) and "| reference |" in table(summary)
    assert "| 2/4, 3/4 |" in table(summary) and "| 3/4 |" in table(summary)
    # and against its own head's base cell (full finetune, off, off): flow + LoRA vs flow, on seed 0 (flow's only one)
    base = summary["flow-lora-cotrain_off-aug_off"]["vs_head_base"]
    assert (base["reference"], base["difference"], base["only_this"], base["only_reference"], base["eval_seeds"]) == (
        "flow-full-cotrain_off-aug_off", 0.25, 2, 1, [0])
    assert not any("vs_head_base" in summary[n] for n in ("flow-full-cotrain_off-aug_off",
                                                          "tokens-full-cotrain_off-aug_off"))
    assert "; 2 / 1 |" in table(summary)
    assert table(summary).count("\n") == 2 + 4
    plot(summary, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_reeval_on_fresh_layouts(finished, tmp_path):
    """bench/experiment_reeval.py: the same arms on another evaluation seed's layouts, summarized like the experiment."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import experiment_reeval

    out, results = finished
    with pytest.raises(SystemExit, match="--seed: 0 is the experiment's own"):
        experiment_reeval.main([str(out / "experiment.json"), "--seed", "0", "--out", str(tmp_path / "x.json")])
    got = experiment_reeval.main([str(out / "experiment.json"), "--seed", "3", "--workers", "1",
                                  "--out", str(tmp_path / "reeval.json")])
    assert sorted(got["arms"]) == sorted(results["arms"])
    theirs = {e["seed"] for run in results["arms"].values() for e in run["episodes"][TASK]}
    ours = {e["seed"] for run in got["arms"].values() for e in run["episodes"][TASK]}
    assert ours.isdisjoint(theirs)  # fresh layouts
    assert set(got["summary"]["pretrained_minus_scratch"]) == set(results["summary"]["pretrained_minus_scratch"])
    assert json.load(open(tmp_path / "reeval.json"))["eval_seed"] == 3
