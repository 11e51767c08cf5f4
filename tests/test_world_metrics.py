"""World-model metrics: known answers for `world_model_metrics`, the VQGAN wrapper, and `gr rollout` / RolloutVideos
reporting them (prediction vs copy-last raw and through the VQGAN, the recon ceiling, token accuracies)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gr.metrics import PSNR_CAP, world_model_metrics
from gr.rollout import main, mean_metrics, vq_world_metrics
from gr.training.callbacks import RolloutVideos, headline_scalars
from gr.training.finetune import FinetuneModule
from gr.training.pretrain import PretrainModule
from tests.conftest import TINY_MODEL, TINY_ROBOT_MODEL, module_init_args

S, SQUARE = 16, 8  # frame side, bright square side


def _square(shift: int = 0) -> np.ndarray:
    """(S, S, 3) black frame with a white SQUARE x SQUARE block, moved `shift` columns right."""
    f = np.zeros((S, S, 3), np.uint8)
    f[4:4 + SQUARE, 2 + shift:2 + shift + SQUARE] = 255
    return f


def _shift_psnr(shift: int) -> float:
    """A white block moved by `shift` columns changes 2 * SQUARE * shift pixels by 255 (in every channel)."""
    return 10 * math.log10(S * S / (2 * SQUARE * shift))


def _metrics(true, pred, last, true_codes, pred_codes, last_codes, **kw):
    """The prediction and the true frame decode exactly (an ideal VQGAN), so recon = true and last_vq = last."""
    return world_model_metrics(true=true, pred=pred, recon=true, last=last, last_vq=last, true_codes=true_codes,
                               pred_codes=pred_codes, last_codes=last_codes, **kw)


def test_identical_frames_and_codes_score_perfectly():
    frames = np.broadcast_to(_square(), (2, 3, 1, S, S, 3)).copy()  # (B, N, Nv, S, S, 3)
    codes = torch.randint(0, 64, (2, 1, 1, 4, 4)).repeat(1, 3, 1, 1, 1)
    m = _metrics(frames, frames, frames[:, 0], codes, codes, codes[:, 0])
    assert m["reference"] == "raw" and "per_view" not in m
    for key in ("psnr", "psnr_copy_last", "psnr_copy_last_vq", "psnr_recon"):
        assert m[key] == [PSNR_CAP] * 3, key
    for key in ("ssim", "ssim_copy_last", "ssim_copy_last_vq", "ssim_recon", "token_acc", "token_acc_copy_last",
                "token_agree_copy_last"):
        assert m[key] == pytest.approx([1.0] * 3), key


def test_shifted_frame_copy_last_loses_to_a_correct_prediction():
    # Step i's true frame is the block moved i + 1 columns on; a model that gets it right beats copying, more so the
    # further ahead it is.
    last = _square()[None, None]  # (B, Nv, S, S, 3): one last frame for all steps
    true = np.stack([_square(i + 1) for i in range(3)])[None, :, None]
    true_codes = torch.arange(16).reshape(1, 1, 1, 4, 4).repeat(1, 3, 1, 1, 1)
    last_codes = (true_codes[:, 0] + 1) % 64  # every code differs from the true ones
    m = _metrics(true, true, last, true_codes, true_codes, last_codes)
    assert m["psnr"] == [PSNR_CAP] * 3 and m["token_acc"] == [1.0] * 3
    assert m["psnr_copy_last"] == pytest.approx([_shift_psnr(s) for s in (1, 2, 3)])
    assert m["psnr_copy_last"][0] > m["psnr_copy_last"][1] > m["psnr_copy_last"][2]
    assert max(m["ssim_copy_last"]) < 1.0
    assert m["token_acc_copy_last"] == [0.0] * 3 and m["token_agree_copy_last"] == [0.0] * 3


def test_a_model_that_copies_agrees_with_copy_last():
    last, true = _square()[None, None], _square(2)[None, None, None]
    true_codes = torch.zeros(1, 1, 1, 4, 4, dtype=torch.long)
    last_codes = true_codes[:, 0].clone()
    last_codes[..., 0, :] = 1  # the top row of codes changed: a quarter of the grid
    m = _metrics(true, np.broadcast_to(last[:, None], true.shape), last, true_codes, last_codes[:, None], last_codes)
    assert m["token_agree_copy_last"] == [1.0]
    assert m["token_acc"] == m["token_acc_copy_last"] == [0.75]
    assert m["psnr"] == m["psnr_copy_last"] == pytest.approx([_shift_psnr(2)])


def test_two_views_report_per_view_and_their_mean():
    # head: nothing moves (copying is perfect); wrist: the block moves 2 columns and every code changes.
    last = np.stack([_square(), _square()])[None, None]  # (B, N, Nv, ...) per step
    true = np.stack([_square(), _square(2)])[None, None]
    true_codes = torch.zeros(1, 1, 2, 4, 4, dtype=torch.long)
    last_codes = true_codes.clone()
    last_codes[:, :, 1] = 5
    m = _metrics(true, true, last, true_codes, true_codes, last_codes, view_names=["head", "wrist"])
    head, wrist = m["per_view"]["head"], m["per_view"]["wrist"]
    assert head["psnr_copy_last"] == [PSNR_CAP] and head["token_acc_copy_last"] == [1.0]
    assert wrist["psnr_copy_last"] == pytest.approx([_shift_psnr(2)]) and wrist["token_acc_copy_last"] == [0.0]
    assert wrist["token_agree_copy_last"] == [0.0] and head["token_agree_copy_last"] == [1.0]
    assert m["psnr_copy_last"] == pytest.approx([(PSNR_CAP + _shift_psnr(2)) / 2])
    assert m["token_acc_copy_last"] == [0.5] and m["token_acc"] == [1.0]
    assert set(head) == set(m) - {"reference", "per_view"}
    scalars = headline_scalars(m)
    assert scalars["val/rollout_psnr_copy_last/head"] == PSNR_CAP
    assert scalars["val/rollout_token_acc_copy_last/wrist"] == 0.0 and scalars["val/rollout_token_acc"] == 1.0
    with pytest.raises(ValueError, match="view_names has 1 names for 2 views"):
        _metrics(true, true, last, true_codes, true_codes, last_codes, view_names=["head"])


def test_mean_metrics_averages_nested_per_view_dicts():
    a = {"reference": "raw", "psnr": [10.0, 20.0], "per_view": {"head": {"psnr": [0.0, 2.0]}}}
    b = {"reference": "raw", "psnr": [20.0, 40.0], "per_view": {"head": {"psnr": [2.0, 4.0]}}}
    want = {"reference": "raw", "psnr": [15.0, 30.0], "per_view": {"head": {"psnr": [1.0, 3.0]}}}
    assert mean_metrics([a, b]) == want


@pytest.fixture(scope="module")
def tokenizer():
    from gr.config import ImageTokenizerConfig
    from gr.encoders.vqgan import FrozenVQGAN
    from tests.conftest import TINY_TOKENIZER

    return FrozenVQGAN(ImageTokenizerConfig(**TINY_TOKENIZER))


def test_vq_wrapper_uses_raw_frames_or_says_decodes_stand_in(tokenizer):
    frames = torch.randint(0, 256, (2, 3, 1, 32, 32, 3), dtype=torch.uint8)
    codes = tokenizer.encode(frames)
    pred_codes = torch.randint(0, 64, codes.shape)
    raw, pred = vq_world_metrics(tokenizer, pred_codes, true=frames, last=frames[:, 0])
    assert len(raw) == 2 and pred.shape == frames.shape and raw[0]["reference"] == "raw"
    assert np.array_equal(pred, tokenizer.decode(pred_codes).numpy())
    assert raw[1]["token_acc_copy_last"][0] == 1.0 and raw[1]["psnr_copy_last"][0] == PSNR_CAP  # step 1 = last
    assert raw[1]["psnr_copy_last_vq"][0] == pytest.approx(raw[1]["psnr_recon"][0])  # same codes, same decode
    dec, _ = vq_world_metrics(tokenizer, pred_codes, codes, codes[:, 0])
    assert dec[0]["reference"] == "vqgan_decode" and dec[0]["psnr_recon"] == [PSNR_CAP] * 3
    assert dec[0]["psnr_copy_last"] == dec[0]["psnr_copy_last_vq"]
    assert dec[0]["token_acc"] == raw[0]["token_acc"]  # codes are the same either way
    with pytest.raises(ValueError, match="both raw frames"):
        vq_world_metrics(tokenizer, pred_codes, true=frames)


def _check_sane(m: dict) -> None:
    """What must hold whatever the weights: finite values, accuracies in [0, 1], and a prediction that agrees with
    copy-last on a fraction f of codes can differ from copy-last's token accuracy by at most 1 - f."""
    for key, values in m.items():
        if key not in ("reference", "per_view"):
            assert all(math.isfinite(v) for v in values), key
    for acc, copy, agree in zip(m["token_acc"], m["token_acc_copy_last"], m["token_agree_copy_last"]):
        assert 0 <= min(acc, copy, agree) and max(acc, copy, agree) <= 1
        assert abs(acc - copy) <= 1 - agree + 1e-4
    assert max(m["psnr_copy_last"]) <= PSNR_CAP and max(m["psnr_recon"]) <= PSNR_CAP


NEW_KEYS = ("psnr_copy_last_vq", "ssim_copy_last_vq", "psnr_recon", "ssim_recon", "token_acc", "token_acc_copy_last",
            "token_agree_copy_last")


def _save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def test_text_video_rollout_on_a_still_clip(tmp_path):
    """Nothing moves, so copy-last is exact in raw pixels, and through the VQGAN it is the recon ceiling itself."""
    from gr.data.video_io import encode_mp4

    still = tmp_path / "still.mp4"
    still.write_bytes(encode_mp4(np.tile(_square(), (2, 2, 1))[None].repeat(8, 0), 8.0))  # 32 px, 8 frames
    torch.manual_seed(0)
    ckpt = _save(PretrainModule(**module_init_args()), tmp_path / "pre.ckpt")
    report = main(["--checkpoint", ckpt, "--source", str(still), "--caption", "a still square", "--num-frames", "3",
                   "--out", str(tmp_path / "ro")])
    m = json.load(open(tmp_path / "ro" / "metrics.json"))["metrics"]
    assert m == report["metrics"] and m["reference"] == "raw" and "per_view" not in m
    assert all(len(m[k]) == 3 for k in NEW_KEYS + ("psnr", "ssim_copy_last", "psnr_expected"))
    _check_sane(m)
    assert m["token_acc_copy_last"] == [1.0] * 3 and m["psnr_copy_last"] == [PSNR_CAP] * 3
    assert m["psnr_copy_last_vq"] == m["psnr_recon"] and m["token_acc"] == m["token_agree_copy_last"]


def test_robot_rollout_judges_each_view_offset_steps_ahead(robot_shards, tmp_path):
    from gr.normalization import Normalizer
    from gr.data.robot_stream import RobotWindowStream
    from gr.data.shards import expand_urls, raw_samples
    from gr.metrics import psnr

    offset = 3  # several control steps ahead, where copying the last frame degrades
    model = {**TINY_ROBOT_MODEL, "clip": {**TINY_MODEL["clip"], "future_frame_offset": offset}}
    torch.manual_seed(0)
    module = FinetuneModule(**module_init_args(model=model))
    stats = json.load(open(robot_shards["stats_file"]))
    module.normalization_stats(stats)
    report = main(["--checkpoint", _save(module, tmp_path / "robot.ckpt"), "--source", robot_shards["val_shards"],
                   "--num-frames", "3", "--out", str(tmp_path / "ro")])
    m = report["metrics"]
    assert set(m["per_view"]) == {"head", "wrist"}
    for view in ("head", "wrist"):
        assert all(len(m["per_view"][view][k]) == 3 for k in NEW_KEYS + ("psnr_expected", "ssim_expected"))
        _check_sane(m["per_view"][view])
    assert m["psnr_recon"] == pytest.approx(np.mean([m["per_view"][v]["psnr_recon"] for v in ("head", "wrist")], 0),
                                            abs=1e-3)
    # The copy-last baseline compares frame t with frame t + offset, at t = 1, 4, 7 (history 2).
    raw = next(iter(raw_samples(expand_urls(robot_shards["val_shards"], "val"))))
    robot = module.robot_spec
    stream = RobotWindowStream([], robot, module.clip_spec, Normalizer.from_stats(stats, robot.arm_index, robot.gripper_index))
    frames = stream.episode(raw, "val")[0]
    for view in ("head", "wrist"):
        f = torch.from_numpy(frames[view])
        want = psnr(f[[1, 4, 7]], f[[1 + offset, 4 + offset, 7 + offset]]).clamp(max=PSNR_CAP)
        assert report["samples"][0]["metrics"]["per_view"][view]["psnr_copy_last"] == pytest.approx(want.tolist())


def _robot_batch(module, robot_shards, n: int = 2):
    from gr.normalization import Normalizer
    from gr.data.robot_stream import RobotWindowStream, collate_windows
    from gr.data.shards import expand_urls

    stats = json.load(open(robot_shards["stats_file"]))
    module.normalization_stats(stats)
    robot = module.robot_spec
    stream = RobotWindowStream(expand_urls(robot_shards["val_shards"], "val"), robot, module.clip_spec,
                               Normalizer.from_stats(stats, robot.arm_index, robot.gripper_index), shuffle=False)
    it = iter(stream)
    return collate_windows([next(it) for _ in range(n)])


@pytest.mark.parametrize("robot", [False, True], ids=["text-video", "robot"])
def test_rollout_videos_metrics_raw_or_vqgan_decode(robot, robot_shards, tmp_path):
    torch.manual_seed(0)
    if robot:
        module = FinetuneModule(**module_init_args(model=TINY_ROBOT_MODEL))
        raw = _robot_batch(module, robot_shards)
        hist, fut = module.codes(raw)
        codes = {**raw, "history": hist, "future": fut}
    else:
        module = PretrainModule(**module_init_args())
        frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)  # (B, Th + 1, S, S, 3)
        raw = {"frames": frames, "caption": ["a red circle", "a blue square"]}
        codes = {"codes": module.image_tokenizer.encode(frames), "caption": raw["caption"]}
    cb = RolloutVideos(num_samples=2, dirpath=str(tmp_path))
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=0)
    with torch.no_grad():
        from_raw = cb._rollout(module, module.model, raw, trainer)
        from_codes = cb._rollout(module, module.model, codes, trainer)
    a, b = from_raw[0]["metrics"], from_codes[0]["metrics"]
    assert a["reference"] == "raw" and b["reference"] == "vqgan_decode"
    assert b["psnr_recon"] == [PSNR_CAP] and a["psnr_recon"][0] < PSNR_CAP  # a random VQGAN is far from exact
    assert a["token_acc"] == b["token_acc"] and len(a["psnr"]) == 1  # one future frame, the same predicted codes
    scalars = headline_scalars(mean_metrics([s["metrics"] for s in from_raw]))
    views = ["/head", "/wrist"] if robot else []
    for key in ("psnr", "psnr_expected", "psnr_copy_last", "token_acc", "token_acc_copy_last"):
        for suffix in [""] + views:
            assert math.isfinite(scalars[f"val/rollout_{key}{suffix}"])
    assert ("per_view" in a) == robot
    assert a["psnr_expected"] != a["psnr"]  # a random model is unsure: the expected frame is not the greedy one


def test_expected_metrics_known_answers():
    """The expected-code frame is scored like the prediction: exact gives the cap, a shifted block the shift's PSNR."""
    last = _square()[None, None]
    true = np.stack([_square(i + 1) for i in range(3)])[None, :, None]
    codes = torch.zeros(1, 3, 1, 4, 4, dtype=torch.long)
    m = _metrics(true, true, last, codes, codes, codes[:, 0], pred_expected=np.repeat(last[:, None], 3, 1))
    assert m["psnr"] == [PSNR_CAP] * 3 and m["psnr_expected"] == pytest.approx(m["psnr_copy_last"])
    assert m["psnr_expected"] == pytest.approx([_shift_psnr(s) for s in (1, 2, 3)]) and "ssim_expected" in m
    assert "psnr_expected" not in _metrics(true, true, last, codes, codes, codes[:, 0])


def test_decode_expected_of_one_hot_is_decode_and_blends_otherwise(tokenizer):
    codes = torch.randint(0, 64, (2, 3, 4, 4))
    one_hot = torch.nn.functional.one_hot(codes, 64).float()
    assert torch.equal(tokenizer.decode_expected(one_hot), tokenizer.decode(codes))
    blend = tokenizer.decode_expected(0.5 * one_hot + 0.5 / 64)
    assert blend.shape == (2, 3, 32, 32, 3) and not torch.equal(blend, tokenizer.decode(codes))
    with pytest.raises(ValueError, match="63 probabilities per position for 64 codes"):
        tokenizer.decode_expected(one_hot[..., :63])


@pytest.mark.parametrize("robot", [False, True], ids=["text-video", "robot"])
def test_probs_along_generated_codes_are_the_generations_own(robot):
    """Greedy codes are the argmax of the distributions a teacher-forced pass over them gives (the KV-cache
    generation and the full pass agree), and every distribution sums to 1."""
    from gr.config import GRModelConfig
    from gr.expected_frame import future_code_probs
    from gr.model import GRModel

    torch.manual_seed(0)
    m = GRModel(GRModelConfig(**(TINY_ROBOT_MODEL if robot else TINY_MODEL), last_frame_input=True), 64, 4, 16).eval()
    g = torch.Generator().manual_seed(2)
    nv = (2,) if robot else ()
    text, mask = torch.randn(3, 5, 16, generator=g), torch.ones(3, 5, dtype=torch.bool)
    hist = torch.randint(0, 64, (3, 2, *nv, 4, 4), generator=g)
    state = torch.randn(3, 2, 4, generator=g) if robot else None
    codes = m.generate_future_frame(text, mask, hist, state=state)
    probs = future_code_probs(m, text, mask, hist, codes, state)
    assert probs.shape == (*codes.shape, 64)
    torch.testing.assert_close(probs.sum(-1), torch.ones(codes.shape))
    assert torch.equal(probs.argmax(-1), codes)
