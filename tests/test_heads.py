"""Action heads behind one interface (gr/model/heads/): cvae, flow, diffusion, tokens."""

import copy

import numpy as np
import pytest
import torch

from gr.config import ConfigError, FinetuneLossConfig, GRModelConfig, RobotConfig
from gr.model import GRModel
from gr.model.heads import build_action_head
from gr.policy import GRPolicy
from gr.training.finetune import FinetuneModule
from tests.conftest import ROBOT, TINY_MODEL, module_init_args

KINDS = ["cvae", "flow", "diffusion", "tokens"]
# Robot units: arm dims in [-1, 1] (mean 0, std 0.5), gripper in [-1, 1].
STATS = {"state": {"mean": [0.0] * 4, "std": [0.2] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
         "action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}
STATS_ROWS = torch.tensor([[STATS["action"][k][0]] * 4 for k in ("mean", "std", "min", "max")])


def robot_cfg(kind: str, **head) -> dict:
    return {**ROBOT, "head": {**ROBOT["head"], "kind": kind, "num_steps": 8, "train_timesteps": 50, "num_bins": 32,
                              **head}}


def _head(kind: str, trunk_width: int = 16, **head):
    torch.manual_seed(0)
    h = build_action_head(RobotConfig(**robot_cfg(kind, **head)), trunk_width)
    h.set_statistics(STATS_ROWS)
    return h


def _chunks(b=4, seed=1):
    """A batch of chunks (normalized arm z-scores inside the data range [-2, 2], binary gripper) and readouts."""
    g = torch.Generator().manual_seed(seed)
    batch = {"arm": (torch.rand(b, 4, 3, generator=g) * 3.6 - 1.8), "gripper": (torch.rand(b, 4, 1, generator=g) > 0.5).float(),
             "action_mask": torch.ones(b, 4, dtype=torch.bool)}
    return batch, torch.randn(b, 2, 16, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_head_overfits_one_batch(kind):
    """Training on one batch of chunks drives the loss down >= 10x, and the head then predicts those chunks. The loss
    is measured before and after at the same noise draws (flow / diffusion train on random noise and times)."""
    h = _head(kind)
    batch, readouts = _chunks()
    rep = 8  # each chunk 8 times per step: more noise draws per step for the sampling heads
    big = {k: v.repeat(rep, *[1] * (v.dim() - 1)) for k, v in batch.items()}
    big_r = readouts.repeat(rep, 1, 1)
    cfg = FinetuneLossConfig()

    def measured():
        h.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            return h.losses(big_r, big, cfg, sample=False)["action_loss"].item()

    before = measured()
    h.train()
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range({"tokens": 100, "diffusion": 400}.get(kind, 300)):  # tokens: plain cross-entropy converges fast
        loss = h.losses(big_r, big, cfg)["action_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measured()
    assert after < before / 10, (before, after)
    with torch.no_grad():
        arm, grip = h.predict(readouts, torch.Generator().manual_seed(0))
    assert arm.shape == batch["arm"].shape and grip.shape == batch["gripper"].shape
    assert batch["arm"].abs().mean() > 0.8  # predicting zeros would be this far off
    assert (arm - batch["arm"]).abs().mean() < 0.35
    assert torch.equal((grip > 0).float(), batch["gripper"])


@pytest.mark.parametrize("kind", KINDS)
def test_actions_ignore_future_tokens_for_every_head(kind):
    torch.manual_seed(0)
    m = GRModel(GRModelConfig(**{**TINY_MODEL, "robot": robot_cfg(kind)}), 64, 4, 16).eval()
    m.action_head.set_statistics(STATS_ROWS)
    g = torch.Generator().manual_seed(1)
    text, mask = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool)
    hist, state = torch.randint(0, 64, (2, 2, 2, 4, 4), generator=g), torch.randn(2, 2, 4, generator=g)
    fut = torch.randint(0, 64, (2, 2, 4, 4), generator=g)
    with torch.no_grad():
        _, r1 = m(text, mask, hist, fut, state)
        _, r2 = m(text, mask, hist, torch.randint(0, 64, fut.shape, generator=g), state)
        a1, g1 = m.action_head.predict(r1, torch.Generator().manual_seed(5))
        a2, g2 = m.action_head.predict(r2, torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and torch.equal(a1, a2) and torch.equal(g1, g2)  # bit-identical


@pytest.mark.parametrize("kind", KINDS)
def test_policy_round_trip_for_every_head(kind, tmp_path):
    """Checkpoint -> GRPolicy -> chunks in robot units: the head kind and its bins travel in the checkpoint, a
    reset replays the same chunks, and the gripper lands on its range's ends."""
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model={**TINY_MODEL, "robot": robot_cfg(kind)}))
    module.normalization_stats(STATS)
    path = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    policy = GRPolicy.from_checkpoint(str(path))
    assert policy.model.action_head.kind == kind
    rng = np.random.default_rng(0)
    obs = [{"images": {v: rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for v in ("head", "wrist")},
            "state": rng.normal(size=4).astype(np.float32), "instruction": "press the button"} for _ in range(3)]
    first = [policy.act(o) for o in obs]
    policy.reset()
    again = [policy.act(o) for o in obs]
    for a, b in zip(first, again):
        assert a.shape == (4, 4) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a[:, 3])) <= {-1.0, 1.0}
    direct = GRPolicy(module.eval())  # the in-memory module gives the same chunk as the reloaded one
    np.testing.assert_array_equal(direct.act(obs[0]), first[0])


def test_tokens_round_trip_within_half_a_bin():
    h = _head("tokens", num_bins=256)
    low, high = h.low.clone(), h.high.clone()
    torch.testing.assert_close(low, torch.full((3,), -2.0))  # (min - mean) / std in normalized units
    torch.testing.assert_close(high, torch.full((3,), 2.0))
    g = torch.Generator().manual_seed(0)
    arm = low + (high - low) * torch.rand(64, 4, 3, generator=g)
    grip = torch.where(torch.rand(64, 4, 1, generator=g) > 0.5, 1.0, -1.0)
    tokens = h.tokenize(torch.cat([arm, grip], -1))
    assert tokens.min() >= 0 and tokens.max() <= 255
    back, back_grip = h.detokenize(tokens)
    half_bin = (high - low) / 256 / 2
    assert ((back - arm).abs() <= half_bin + 1e-6).all()
    assert torch.equal(back_grip, grip)
    assert set(tokens[..., 3].unique().tolist()) <= {0, 255}  # gripper: the end bins only
    outside = h.tokenize(torch.tensor([[[9.0, -9.0, 0.0, 1.0]]]))
    assert outside[0, 0, :2].tolist() == [255, 0]  # beyond the data range: clamped to the end bins


def test_tokens_constrained_decoding_never_emits_a_non_action_token():
    h = _head("tokens").eval()
    with torch.no_grad():
        h.out.bias[h.bos] = 1e4  # the network wants BOS everywhere ...
        h.out.bias[5] = 1e3  # ... and then bin 5, which is not a legal gripper token
    readouts = torch.randn(3, 2, 16)
    seen = []
    h.detokenize = lambda tokens: seen.append(tokens) or (tokens[..., :3].float(), tokens[..., 3:].float())
    h.predict(readouts)
    tokens = seen[0]
    assert (tokens != h.bos).all()
    assert (tokens[..., :3] == 5).all()  # arm dims: the best legal token
    assert set(tokens[..., 3].unique().tolist()) <= {0, h.num_bins - 1}


def test_tokens_cached_decoding_equals_recomputation():
    """The key/value-cached greedy decoder (eval mode) emits the reference decoder's tokens, chunk for chunk."""
    h = _head("tokens", num_bins=256).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so the tokens differ across positions
        for p in h.parameters():
            p.mul_(4.0)
    readouts = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, cached = h._greedy_recompute(readouts), h._greedy_cached(readouts)
    assert ref.shape == (5, h.seq_len) and ref.unique().numel() > 10
    assert torch.equal(cached, ref)
    h._greedy_recompute = None  # eval-mode predict goes through the cache
    arm, _ = h.predict(readouts)
    assert torch.equal(h.tokenize(torch.cat([arm, torch.zeros_like(arm[..., :1])], -1))[..., :3],
                       ref.reshape(5, 4, 4)[..., :3])


def test_tokens_without_statistics_fail_with_a_clear_error():
    h = build_action_head(RobotConfig(**robot_cfg("tokens")), 16)
    with pytest.raises(ValueError, match="no action statistics"):
        h.predict(torch.randn(1, 2, 16))


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_sampler_is_deterministic_under_a_seed(kind):
    h = _head(kind).eval()
    readouts = torch.randn(2, 2, 16)
    with torch.no_grad():
        a = h.predict(readouts, torch.Generator().manual_seed(7))
        b = h.predict(readouts, torch.Generator().manual_seed(7))
        c = h.predict(readouts, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])  # the seed matters: the chunk is sampled, not fixed


def test_integration_steps_are_the_configured_count():
    times = {}
    for kind, steps in (("flow", 3), ("diffusion", 5)):
        h = _head(kind, num_steps=steps).eval()
        seen = times[kind] = []
        h.net.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(float(args[1][0])))
        with torch.no_grad():
            h.predict(torch.randn(1, 2, 16))
    assert times["flow"] == pytest.approx([0.0, 1 / 3, 2 / 3])  # Euler steps at t = 0, 1/3, 2/3
    d = times["diffusion"]
    assert len(d) == 5 and d == sorted(d, reverse=True) and d[-1] == 0.0  # DDIM: 5 steps from noisy to clean


@pytest.mark.parametrize("field, value, match", [
    ("kind", "vq-bet", "model.robot.head.kind"),
    ("num_steps", 0, "model.robot.head.num_steps"),
    ("num_bins", 1, "model.robot.head.num_bins"),
    ("train_timesteps", 4, "model.robot.head.num_steps"),  # fewer training timesteps than sampling steps
])
def test_bad_head_config_names_the_field(field, value, match):
    bad = copy.deepcopy(robot_cfg("flow"))
    bad["head"][field] = value
    with pytest.raises(ConfigError, match=match):
        RobotConfig(**bad)


def test_old_head_config_without_kind_is_a_cvae():
    head = {k: v for k, v in ROBOT["head"].items()}
    assert "kind" not in head
    m = GRModel(GRModelConfig(**{**TINY_MODEL, "robot": {**ROBOT, "head": head}}), 64, 4, 16)
    assert m.action_head.kind == "cvae"
    assert any(k.startswith("action_head.encoder.") for k in m.state_dict())  # the same tensor names as before


@pytest.mark.parametrize("kind", ["flow", "diffusion", "tokens"])  # cvae: tests/test_finetune.py
def test_finetune_steps_with_every_head(kind, robot_shards):
    """FinetuneModule's training and validation steps on real robot windows: the head's terms enter the loss, the
    tokens head takes its bins from the data's statistics, and one optimizer step changes only trainable weights."""
    from types import SimpleNamespace

    from gr.data.robot_stream import RobotDataModule

    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model={**TINY_MODEL, "robot": robot_cfg(kind)}))
    dm = RobotDataModule(train_shards=robot_shards["train_shards"], batch_size=4, num_workers=0, shuffle_buffer=4)
    dm.trainer = SimpleNamespace(lightning_module=module, training=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = module.robot_losses(batch)
    terms = {"cvae": "kl", "flow": "flow_mse_arm", "diffusion": "diffusion_mse_gripper", "tokens": "token_ce_arm"}
    assert terms[kind] in out and torch.isfinite(out["loss"]) and "action_loss" not in out
    if kind == "tokens":
        stats = module.normalization_stats()["action"]
        std = max(stats["std"][0], 1e-3)
        assert float(module.model.action_head.low[0]) == pytest.approx((stats["min"][0] - stats["mean"][0]) / std, rel=1e-5)
    before = module.model.action_head.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    out["loss"].backward()
    opt.step()
    after = module.model.action_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the head trained
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(module.validation_step(batch, 0))


@pytest.mark.parametrize("kind", ["cvae", "flow", "tokens"])  # diffusion shares flow's chunk layout
def test_continuous_gripper_is_an_ordinary_arm_dim(kind):
    """gripper_dims: [] (ALOHA / SO-100 style grippers): every dim is z-scored and continuous; no binary snapping."""
    torch.manual_seed(0)
    model = {**TINY_MODEL, "robot": {**robot_cfg(kind), "gripper_dims": []}}
    module = FinetuneModule(**module_init_args(model=model))
    module.normalization_stats(STATS)
    head = module.model.action_head
    assert head.num_arm == 4 and head.num_gripper == 0
    g = torch.Generator().manual_seed(0)
    batch = {"arm": torch.randn(2, 4, 4, generator=g), "gripper": torch.zeros(2, 4, 0),
             "action_mask": torch.ones(2, 4, dtype=torch.bool)}
    assert torch.isfinite(head.losses(torch.randn(2, 2, 32, generator=g), batch, FinetuneLossConfig())["action_loss"])
    policy = GRPolicy(module.eval())
    rng = np.random.default_rng(0)
    chunk = policy.act({"images": {v: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for v in ("head", "wrist")},
                        "state": np.zeros(4, np.float32), "instruction": "grasp"})
    assert chunk.shape == (4, 4) and not set(np.unique(chunk[:, 3])) <= {-1.0, 1.0}  # not snapped to the ends
