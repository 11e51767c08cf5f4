"""Robot finetuning: the one-model layout with views/state/readouts, the CVAE head, windows, transfer, training."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gr.config import ConfigError, GRModelConfig
from gr.data.robot import make_windows, window_indices
from gr.normalization import Normalizer
from gr.data.robot_stream import RobotDataModule
from gr.model import GRModel
from gr.training.finetune import FinetuneModule
from gr.training.pretrain import PretrainModule
from tests.conftest import ROBOT, TINY_MODEL, TINY_ROBOT_MODEL, TINY_TOKENIZER, module_init_args


def _robot_model(seed=0):
    torch.manual_seed(seed)
    return GRModel(GRModelConfig(**TINY_ROBOT_MODEL), 64, 4, 16).eval()


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, 5, 16, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    hist = torch.randint(0, 64, (b, 2, 2, 4, 4), generator=g)
    fut = torch.randint(0, 64, (b, 2, 4, 4), generator=g)
    state = torch.randn(b, 2, 4, generator=g)
    return text, mask, hist, fut, state


def test_readouts_cannot_see_the_future():
    m = _robot_model()
    text, mask, hist, fut, state = _inputs()
    _, r1 = m(text, mask, hist, fut, state)
    _, r2 = m(text, mask, hist, torch.randint(0, 64, fut.shape), state)
    assert torch.equal(r1, r2)
    a1, g1 = m.action_head.predict(r1)
    a2, g2 = m.action_head.predict(r2)
    assert torch.equal(a1, a2) and torch.equal(g1, g2)  # the action chunk is bit-identical
    _, r3 = m(text, mask, hist, fut, state + 1.0)
    assert not torch.equal(r1, r3)  # ... while the state does reach the readouts


def test_action_path_is_one_prefix_pass_matching_training():
    m = _robot_model()
    text, mask, hist, fut, state = _inputs()
    _, r_train = m(text, mask, hist, fut, state)
    r_policy = m.readout_features(text, mask, hist, state)
    torch.testing.assert_close(r_policy, r_train, atol=1e-5, rtol=1e-5)
    prefix, _ = m.embed_prefix(text, mask, hist, state)
    # text + 2 steps x (2 views x 16 codes + state) + 2 readouts: no future-frame token on this path
    assert prefix.shape[1] == 5 + 2 * (2 * 16 + 1) + 2


def test_robot_generation_cached_equals_recomputed():
    m = _robot_model()
    text, mask, hist, _, state = _inputs()
    a = m.generate_future_frame(text, mask, hist, state=state)
    b = m.generate_future_frame(text, mask, hist, state=state, use_cache=False)
    assert a.shape == (2, 2, 4, 4) and torch.equal(a, b)


def test_robot_model_shape_errors():
    m = _robot_model()
    text, mask, hist, fut, state = _inputs()
    with pytest.raises(ValueError, match=r"history_codes must be \(B, Th, 2 views"):
        m(text, mask, hist[:, :, :1], fut, state)
    with pytest.raises(ValueError, match="state must be"):
        m(text, mask, hist, fut, state[..., :3])
    pre = GRModel(GRModelConfig(**TINY_MODEL), 64, 4, 16)
    with pytest.raises(ValueError, match="no readouts"):
        pre.readout_features(text, mask, hist[:, :, 0], state)


def test_windows_clamp_pad_and_normalize():
    hist, fut, chunk, valid = window_indices(num_steps=5, t=0, num_history=3, offset=2, chunk=4)
    assert hist == [0, 0, 0] and fut == 2 and chunk.tolist() == [0, 1, 2, 3] and valid.all()
    hist, fut, chunk, valid = window_indices(num_steps=5, t=4, num_history=3, offset=2, chunk=4)
    assert hist == [2, 3, 4] and fut == 4 and chunk.tolist() == [4, 4, 4, 4] and valid.tolist() == [1, 0, 0, 0]
    stats = {"state": {"mean": [1.0], "std": [2.0], "min": [0.0], "max": [3.0]},
             "action": {"mean": [0.5, 0.0], "std": [0.5, 1.0], "min": [0.0, -1.0], "max": [1.0, 1.0]}}
    norm = Normalizer.from_stats(stats, arm_index=[0], gripper_index=[1])
    frames = {"v": np.arange(5)[:, None]}
    action = np.array([[1.0, -1.0], [0.0, 1.0], [0.5, 1.0], [1.0, -1.0], [0.0, 1.0]], np.float32)
    w = next(make_windows(frames, np.full((5, 1), 3.0, np.float32), action, norm, ["v"], [1], 2, 1, 3))
    assert w["history"][:, 0, 0].tolist() == [0, 1] and w["future"][0, 0] == 2
    assert np.allclose(w["state"], 1.0) and np.allclose(w["arm"][:, 0], [-1.0, 0.0, 1.0])
    assert w["gripper"][:, 0].tolist() == [1.0, 1.0, 0.0]


def _finetune_args(**over):
    args = module_init_args(model=TINY_ROBOT_MODEL, optim={"lr": 3e-3, "warmup_steps": 5, "total_steps": 400,
                                                            "weight_decay": 0.0})
    args.update(over)
    return args


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = PretrainModule(**module_init_args())
    path = tmp_path_factory.mktemp("pre") / "pre.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path), module


def test_every_pretrained_trunk_weight_is_loaded(pretrain_ckpt, tmp_path):
    path, pre = pretrain_ckpt
    ft = FinetuneModule(**_finetune_args(init_from=path))
    pre_sd = pre.model.state_dict()
    report = ft.init_report
    assert sorted(report["loaded"]) == sorted(pre_sd) and not report["dropped"] and not report["missing_required"]
    trunk = [k for k in pre_sd if k.startswith("trunk.")]
    assert len(trunk) > 10 and all(torch.equal(ft.model.state_dict()[k], pre_sd[k]) for k in trunk)
    assert all(k.startswith(("view_emb.", "state_proj.", "readout_emb.", "action_head.")) for k in report["new"])
    wide = dict(TINY_ROBOT_MODEL, trunk=dict(num_layers=2, num_heads=2, width=64))
    with pytest.raises(ConfigError, match=r"required weight .* does not fit"):
        FinetuneModule(**_finetune_args(model=wide, init_from=path))
    ok = FinetuneModule(**_finetune_args(model=wide, init_from=path, init_strict=False))
    assert ok.init_report["dropped"] and ok.init_report["missing_required"]
    with pytest.raises(ConfigError, match="freeze: prefix 'nope.' matches no parameter"):
        FinetuneModule(**_finetune_args(freeze=["nope."]))
    frozen = FinetuneModule(**_finetune_args(freeze=["trunk."]))
    assert not any(p.requires_grad for p in frozen.model.trunk.parameters())


def _attach(module, dm):
    dm.trainer = SimpleNamespace(lightning_module=module, training=False)
    dm.setup("fit")
    return dm


def test_robot_datamodule_windows_and_stats(robot_shards):
    module = FinetuneModule(**_finetune_args())
    dm = _attach(module, RobotDataModule(train_shards=robot_shards["train_shards"], batch_size=4, num_workers=0,
                                         shuffle_buffer=8))
    stats = json.load(open(robot_shards["stats_file"]))
    assert dm.stats["state"] == stats["state"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 * 12 // 4  # every step of every episode is a window
    b = batches[0]
    assert b["history"].shape == (4, 2, 2, 32, 32, 3) and b["future"].shape == (4, 2, 32, 32, 3)
    assert b["state"].shape == (4, 2, 4) and b["arm"].shape == (4, 4, 3) and b["gripper"].shape == (4, 4, 1)
    assert torch.allclose(module.stats_state[0], torch.tensor(stats["state"]["mean"]))  # kept for the checkpoint
    bad = FinetuneModule(**_finetune_args(model=dict(TINY_ROBOT_MODEL, robot=dict(ROBOT, view_names=["head", "top"]))))
    with pytest.raises(ConfigError, match="view 'top' of model.robot.view_names is not among the episode's views"):
        _attach(bad, RobotDataModule(train_shards=robot_shards["train_shards"], num_workers=0))


def test_overfit_one_episode(robot_shards, tmp_path):
    """On one episode, the normalized action L1 (prior latent) falls below 0.05."""
    torch.manual_seed(0)
    model = dict(TINY_ROBOT_MODEL, robot=dict(ROBOT, head=dict(ROBOT["head"], width=64)))
    module = FinetuneModule(**_finetune_args(model=model, loss={"frame_weight": 0.0, "gripper_weight": 1.0,
                                                                "kl_weight": 0.1}))
    dm = _attach(module, RobotDataModule(train_shards=robot_shards["train_shards"].replace("{000000..000001}",
                                                                                          "000000"),
                                         batch_size=12, num_workers=0, shuffle_buffer=1))
    ds = dm._stream(dm.train_urls[:1], train=False)
    windows = [w for w in ds if w["key"].split("@")[0].endswith("train0000")]
    from gr.data.robot_stream import collate_windows

    batch = collate_windows(windows)
    batch["history"], batch["future"] = module.codes(batch)  # tokenize once: the frozen VQGAN is not trained
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    module.train()
    for _ in range(800):
        out = module.robot_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        hist = batch["history"]
        text, mask = module.text_encoder(batch["instruction"])
        arm, grip = module.model.action_head.predict(module.model.readout_features(text, mask, hist, batch["state"]))
    m = batch["action_mask"][..., None].float()
    l1 = float(((arm - batch["arm"]).abs() * m).sum() / (m.sum() * arm.shape[-1]))
    assert l1 < 0.05, l1
    assert (((grip > 0).float() == batch["gripper"]) | (m == 0)).all()  # padded steps are not trained
    # The policy API, fed the episode step by step, reproduces its actions (robot units) within the same tolerance.
    from gr.data.shards import raw_samples
    from gr.policy import GRPolicy

    path = tmp_path / "policy.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    policy = GRPolicy.from_checkpoint(str(path))
    raw = next(r for r in raw_samples(dm.train_urls[:1]) if r["__key__"] == "train0000")
    frames, state, action, instruction = ds.episode(raw, "train0000")
    stats = module.normalization_stats()
    std = np.maximum(np.asarray(stats["action"]["std"], np.float32), 1e-3)
    errors = []
    for t in range(len(state)):
        chunk = policy.act({"images": {v: frames[v][t] for v in frames}, "state": state[t],
                            "instruction": instruction})
        assert chunk.shape == (4, 4)
        true = action[t:t + 4]
        errors.append(np.abs(chunk[: len(true), :3] - true[:, :3]) / std[:3])
        assert np.array_equal(chunk[: len(true), 3], true[:, 3])  # gripper: exactly open / closed
    assert float(np.concatenate(errors).mean()) < 0.05
    with pytest.raises(ValueError, match="lacks view 'wrist'"):
        policy.act({"images": {"head": frames["head"][0]}, "state": state[0], "instruction": instruction})


def _copy_path_model(last_frame_input: bool, seed=0):
    torch.manual_seed(seed)
    return GRModel(GRModelConfig(**TINY_ROBOT_MODEL, last_frame_input=last_frame_input), 64, 4, 16)


def test_copy_path_keeps_readouts_blind_and_generation_exact():
    m = _copy_path_model(True).eval()
    text, mask, hist, fut, state = _inputs()
    _, r1 = m(text, mask, hist, fut, state)
    _, r2 = m(text, mask, hist, torch.randint(0, 64, fut.shape), state)
    assert torch.equal(r1, r2)  # the copy path enters only future slots, after the readouts
    a = m.generate_future_frame(text, mask, hist, state=state)
    b = m.generate_future_frame(text, mask, hist, state=state, use_cache=False)
    assert torch.equal(a, b)
    logits, _ = m(text, mask, hist, fut, state)
    moved = hist.clone()
    moved[:, -1, 1, 2, 1] = (moved[:, -1, 1, 2, 1] + 1) % 64  # last frame, wrist view, position 9
    delta = (m(text, mask, moved, fut, state)[0] - logits).abs().amax(-1)  # (B, Nv, n)
    # position 9 of the wrist's future also gets that code directly: it moves more than any other slot
    assert int(delta[:, 1].argmax(-1).eq(9).sum()) == 2


def test_copy_path_learns_copy_last_frame_faster():
    """Future = last history frame: with the copy path a tiny model copies within 60 steps; without it, it does not."""
    text, mask, hist, _, state = _inputs(b=16, seed=5)
    fut = hist[:, -1]

    def token_acc_after_training(last_frame_input: bool) -> float:
        m = _copy_path_model(last_frame_input).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(60):
            logits, _ = m(text, mask, hist, fut, state)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), fut.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        return m.generate_future_frame(text, mask, hist, state=state).eq(fut).float().mean().item()

    with_copy, without = token_acc_after_training(True), token_acc_after_training(False)
    assert with_copy > 0.95 and with_copy > without + 0.3, (with_copy, without)


def test_normalizer_round_trip_and_temporal_ensemble_expiry():
    from gr.temporal_ensemble import TemporalEnsemble

    stats = {"state": {"mean": [1.0], "std": [0.0], "min": [1.0], "max": [1.0]},
             "action": {"mean": [0.5, 0.0], "std": [2.0, 1.0], "min": [-3.0, -1.0], "max": [4.0, 1.0]}}
    norm = Normalizer.from_stats(stats, arm_index=[0], gripper_index=[1])
    assert norm.state(np.array([1.002]))[0] == pytest.approx(2.0, rel=1e-4)  # the std is floored at 1e-3
    action = np.array([[3.5, 1.0], [-1.5, -1.0]], np.float32)
    np.testing.assert_allclose(norm.arm(action)[:, 0], [1.5, -1.0])
    np.testing.assert_array_equal(norm.gripper(action)[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(norm.to_robot(norm.arm(action), norm.gripper(action) * 2 - 1), action)
    ens = TemporalEnsemble(0.0, norm.snap_gripper)
    chunks = [np.array([[t, 1.0], [t + 10, 1.0]], np.float32) for t in (0.0, 1.0, 2.0)]
    assert ens(chunks[0])[0] == 0.0
    assert ens(chunks[1])[0] == pytest.approx((10 + 1) / 2)  # step 1: chunk 0's 2nd entry and chunk 1's 1st
    third = ens(chunks[2])
    assert third[0] == pytest.approx((11 + 2) / 2)  # chunk 0 (2 long) no longer covers step 2
    assert third[1] == 1.0
    with pytest.raises(ValueError, match="temporal_ensemble"):
        TemporalEnsemble(-1.0)


def test_history_stride_spaces_training_windows_and_policy_history(tmp_path):
    """A history stride of s control steps: windows take frames t - s, t (clamped at the start), and the policy feeds
    the model the same frames from its observation history."""
    hist, fut, _, _ = window_indices(20, 7, 3, 2, 4, stride=3)
    assert hist == [1, 4, 7] and fut == 9
    assert window_indices(20, 2, 3, 2, 4, stride=3)[0] == [0, 0, 2]  # clamped at the episode start
    with pytest.raises(ConfigError, match="model.robot.history_stride"):
        GRModelConfig(**dict(TINY_ROBOT_MODEL, robot=dict(ROBOT, history_stride=0)))
    from gr.policy import GRPolicy

    module = FinetuneModule(**_finetune_args(model=dict(TINY_ROBOT_MODEL, robot=dict(ROBOT, history_stride=3))))
    module.normalization_stats({k: {s: [0.0 if s != "std" else 1.0] * 4 for s in ("mean", "std", "min", "max")}
                                for k in ("state", "action")})
    policy = GRPolicy(module)
    h = policy.new_history()
    for t in range(8):
        policy.push_entry(h, t)
        window = policy.model_window(h)
        assert window == [max(0, t - 3), t] if t else window == [0, 0]  # the windows training cuts, at every step
