"""Rollouts for inspection: generate future frames with the KV cache and show them beside the ground truth.

- Text-video checkpoints: from the first `num_history` frames of a clip and its caption, imagine N future frames
  autoregressively (each generated frame joins the history), and compare with the clip's real frames.
- Robot checkpoints: along an episode, predict every view's frame `future_frame_offset` steps ahead from the true
  history and state (one-step predictions), and the action chunk, against what happened.

Outputs per sample: an MP4 and a GIF (one row per view: ground truth | prediction, with the frame index and the
caption/instruction overlaid), and for robots `actions.png` (predicted vs true chunk per dimension). `metrics.json`
holds, per horizon step, per sample and averaged (`gr.metrics.world_model_metrics`; robots also `per_view`): PSNR/SSIM
of the prediction, of copy-last-frame raw and through the VQGAN, and of the VQGAN's reconstruction of the true frame
(the tokenizer's ceiling: about the best a model that outputs VQGAN decodes can reach), and token accuracies against
the true frame's codes and the copy-last codes. `metrics.png` plots them.

Legend: B samples, N generated frames, Nv views, S frame side, h/w code grid.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import torch

from gr.expected_frame import future_code_probs
from gr.metrics import world_model_metrics


def module_from_checkpoint(path: str, map_location: str = "cpu"):
    """A gr module that can generate frames, rebuilt from its checkpoint."""
    from gr.export import load_any

    module = load_any(path, map_location)  # a .ckpt, a sharded folder or a `gr export` folder
    if not hasattr(getattr(module, "model", None), "frame_head"):
        raise ValueError(f"{path!r}: a {type(module).__name__} checkpoint has no frame head to generate frames with")
    return module


@torch.no_grad()
def imagine(module, history_codes: torch.Tensor, captions: list[str], num_frames: int, temperature: float = 0.0,
            top_k: Optional[int] = None, seed: int = 0, use_cache: bool = True, return_probs: bool = False):
    """Text-video: history codes (B, Th, h, w) -> N generated frames' codes (B, N, h, w), each joining the history;
    with `return_probs` also the code distributions along them (B, N, h, w, V) (`gr.expected_frame`)."""
    text, mask = module.text_encoder(captions)
    gen = torch.Generator().manual_seed(seed)
    hist, outs, probs = history_codes, [], []
    for _ in range(num_frames):
        nxt = module.model.generate_future_frame(text, mask, hist, temperature, top_k, gen, use_cache)
        outs.append(nxt)
        if return_probs:
            probs.append(future_code_probs(module.model, text, mask, hist, nxt))
        hist = torch.cat([hist[:, 1:], nxt[:, None]], dim=1)
    codes = torch.stack(outs, dim=1)
    return (codes, torch.stack(probs, dim=1)) if return_probs else codes


def vq_world_metrics(tokenizer, pred_codes, true_codes=None, last_codes=None, true=None, last=None,
                     view_names: Optional[list[str]] = None,
                     pred_probs=None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """`world_model_metrics` per sample, with the VQGAN doing the encodes and decodes; also the decoded prediction.

    With raw frames (`true`, `last`) they are the reference, and their codes are encoded here unless given. Codes-only
    data (pre-tokenized batches) has no raw frames: the decodes of `true_codes` and `last_codes` stand in for them
    (reference "vqgan_decode"), so the recon ceiling sits at the cap and copy-last raw equals copy-last VQ.

    Args:
        tokenizer: the frozen VQGAN (`encode`, `decode`).
        pred_codes: (B, N, Nv, h, w) predicted codes.
        true_codes: (B, N, Nv, h, w) codes of the true frames; None to encode `true`.
        last_codes: codes of the last seen frame, (B, Nv, h, w) or (B, N, Nv, h, w); None to encode `last`.
        true: uint8 raw true frames (B, N, Nv, S, S, 3), or None for codes-only data.
        last: uint8 raw last seen frame, (B, Nv, S, S, 3) or (B, N, Nv, S, S, 3), or None with `true`.
        view_names: names of the Nv views for the per-view breakdown (robots); None for none.
        pred_probs: (B, N, Nv, h, w, V) code probabilities along the prediction (`gr.expected_frame`): adds the
            expected-code frame's `*_expected` metrics. None for none.

    Returns:
        B per-sample metric dicts, and the decoded prediction uint8 (B, N, Nv, S, S, 3).
    """
    if (true is None) != (last is None):
        raise ValueError("vq_world_metrics: give both raw frames (true, last) or neither")
    if true is None and (true_codes is None or last_codes is None):
        raise ValueError("vq_world_metrics: without raw frames, true_codes and last_codes are required")
    device = next(tokenizer.parameters()).device
    run = lambda fn, x: fn(torch.as_tensor(x).to(device)).cpu()  # noqa: E731 - batches may live on the accelerator
    true_codes = run(tokenizer.encode, true) if true_codes is None else torch.as_tensor(true_codes).cpu()
    last_codes = run(tokenizer.encode, last) if last_codes is None else torch.as_tensor(last_codes).cpu()
    pred_codes = torch.as_tensor(pred_codes).cpu()
    pred, recon, last_vq = (run(tokenizer.decode, c) for c in (pred_codes, true_codes, last_codes))
    expected = None if pred_probs is None else run(tokenizer.decode_expected, pred_probs)
    reference = "vqgan_decode" if true is None else "raw"
    true = recon if true is None else torch.as_tensor(true).cpu()
    last = last_vq if last is None else torch.as_tensor(last).cpu()
    per_sample = [world_model_metrics(true=true[b:b + 1], pred=pred[b:b + 1], recon=recon[b:b + 1],
                                      last=last[b:b + 1], last_vq=last_vq[b:b + 1], true_codes=true_codes[b:b + 1],
                                      pred_codes=pred_codes[b:b + 1], last_codes=last_codes[b:b + 1],
                                      view_names=view_names, reference=reference,
                                      pred_expected=None if expected is None else expected[b:b + 1])
                  for b in range(len(pred))]
    return per_sample, pred.numpy()


def mean_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Average metric dicts key by key: per-step lists elementwise, nested dicts (`per_view`) recursively; strings
    (`reference`) are kept."""
    out: dict[str, Any] = {}
    for key, value in items[0].items():
        values = [m[key] for m in items]
        if isinstance(value, dict):
            out[key] = mean_metrics(values)
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = np.mean(values, axis=0).round(4).tolist()
    return out


def _label(img: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, im.width, 10], fill=(0, 0, 0))
    draw.text((2, -1), text, fill=(255, 255, 255))
    return np.asarray(im)


def grid_frames(true: np.ndarray, pred: np.ndarray, caption: str, indices: list[int], scale: int = 2,
                truth: str = "true") -> np.ndarray:
    """(N, Nv, S, S, 3) x 2 -> (N, H, W, 3) video frames: one row per view, ground truth | prediction, a header with
    the frame index, `truth` (what the left column is: "true", or "VQGAN(true)" for pre-tokenized data) and caption."""
    n, nv, s = true.shape[:3]
    rows = np.concatenate([np.concatenate([true[:, v], pred[:, v]], axis=2) for v in range(nv)], axis=1)
    rows = rows.repeat(scale, axis=1).repeat(scale, axis=2)  # small frames are unreadable otherwise
    header = np.zeros((n, 24, rows.shape[2], 3), np.uint8)
    out = np.concatenate([header, rows], axis=1)
    return np.stack([_label(f, f"t={i}  {truth} | pred  {caption}"[:60]) for f, i in zip(out, indices)])


def write_video(frames: np.ndarray, path_stem: str, fps: float = 4.0) -> dict[str, str]:
    """Write `<stem>.mp4` (H.264) and `<stem>.gif`; returns their paths."""
    from PIL import Image

    from gr.data.video_io import encode_mp4

    h, w = frames.shape[1:3]
    even = frames[:, : h - h % 2, : w - w % 2]
    with open(path_stem + ".mp4", "wb") as f:
        f.write(encode_mp4(even, fps))
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(path_stem + ".gif", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return {"mp4": path_stem + ".mp4", "gif": path_stem + ".gif"}


_CURVES = (("", "o-", "prediction"), ("_copy_last", "s--", "copy last frame (raw)"),
           ("_copy_last_vq", "^--", "copy last frame (VQGAN)"), ("_recon", ":", "VQGAN recon (ceiling)"))


def plot_metrics(metrics: dict[str, Any], path: str) -> str:
    """PSNR and SSIM per horizon step of the prediction and its baselines, and the token accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    steps = np.arange(1, len(metrics["psnr"]) + 1)
    for ax, name in zip(axes, ("psnr", "ssim")):
        for suffix, style, label in _CURVES:
            ax.plot(steps, metrics[name + suffix], style, label=label)
        ax.set_ylabel(name.upper())
    for key, style in (("token_acc", "o-"), ("token_acc_copy_last", "s--"), ("token_agree_copy_last", ":")):
        axes[2].plot(steps, metrics[key], style, label=key)
    axes[2].set_ylabel("token accuracy")
    for ax in axes:
        ax.set_xlabel("horizon step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_actions(pred: np.ndarray, true: np.ndarray, path: str) -> str:
    """pred/true: (T, A) first actions of each predicted chunk vs what was executed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = pred.shape[1]
    fig, axes = plt.subplots(a, 1, figsize=(6, 1.6 * a), sharex=True)
    for d, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(true[:, d], label="true")
        ax.plot(pred[:, d], "--", label="predicted")
        ax.set_ylabel(f"a[{d}]")
    np.atleast_1d(axes)[0].legend(loc="upper right")
    np.atleast_1d(axes)[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_rollout(out_dir: str, name: str, true: np.ndarray, pred: np.ndarray, caption: str, indices: list[int],
                 fps: float, metrics: dict[str, Any], truth: str = "true") -> dict[str, Any]:
    """Write one sample's video files; true/pred (N, Nv, S, S, 3), metrics from `vq_world_metrics`."""
    os.makedirs(out_dir, exist_ok=True)
    files = write_video(grid_frames(true, pred, caption, indices, truth=truth), os.path.join(out_dir, name), fps)
    return {"name": name, "caption": caption, **files, "metrics": metrics}


def summarize(samples: list[dict[str, Any]], out_dir: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Average per-sample metrics over samples, write metrics.json and metrics.png."""
    mean = mean_metrics([s["metrics"] for s in samples])
    report = {**extra, "metrics": mean, "samples": samples,
              "plot": plot_metrics(mean, os.path.join(out_dir, "metrics.png"))}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def rollout_text_video(module, source: str, out_dir: str, caption: Optional[str] = None, num_samples: int = 1,
                       num_frames: int = 8, temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0,
                       use_cache: bool = True) -> dict[str, Any]:
    """Imagine `num_frames` frames for each of `num_samples` clips (one batched generation) and write the results.
    `source`: a video file, a folder of them, or text-video shards, mp4 or pre-tokenized (gr/rollout_sources.py)."""
    from gr.rollout_sources import clip_sources

    clip = module.clip_spec
    th, step = clip.num_history, clip.future_frame_offset
    sources = clip_sources(source, caption, clip, num_samples, module.tokens_spec)
    need = th + num_frames * step
    for s in sources:
        if len(s) < th:
            raise ValueError(f"--source {s.key}: {len(s)} frames at {clip.fps} fps, fewer than the model's "
                             f"history ({th})")
        if len(s) < need:
            raise ValueError(f"--source {s.key}: {len(s)} frames at {clip.fps} fps; {num_frames} future frames at "
                             f"offset {step} need {need}")
    idx = [th - 1 + (i + 1) * step for i in range(num_frames)]
    tok = module.image_tokenizer
    if sources[0].pretokenized:  # no raw frames: the VQGAN decode of the true codes is the ground truth
        all_codes = torch.from_numpy(np.stack([s.codes[:need] for s in sources]))  # (B, need, h, w)
        codes = all_codes[:, :th]
        true_codes = all_codes[:, idx][:, :, None]  # (B, N, 1, h, w)
        with torch.no_grad():
            true = tok.decode(true_codes).numpy()
        raw = {"true_codes": true_codes, "last_codes": codes[:, th - 1, None]}
    else:
        frames = torch.from_numpy(np.stack([s.frames[:need] for s in sources]))  # (B, need, S, S, 3)
        codes = tok.encode(frames[:, :th])
        true = frames[:, idx].numpy()[:, :, None]  # (B, N, 1, S, S, 3)
        raw = {"last_codes": codes[:, th - 1, None], "true": true, "last": frames[:, th - 1, None]}
    gen, probs = imagine(module, codes, [s.caption for s in sources], num_frames, temperature, top_k, seed, use_cache,
                         return_probs=True)
    # Every imagined frame is judged against copying the last frame the model saw, the same for all steps.
    metrics, pred = vq_world_metrics(tok, gen[:, :, None], **raw, pred_probs=probs[:, :, None])
    truth = "VQGAN(true)" if sources[0].pretokenized else "true"
    samples = [save_rollout(out_dir, f"sample{b:02d}", true[b], pred[b], sources[b].caption, idx, clip.fps,
                            metrics[b], truth) | {"key": sources[b].key} for b in range(len(sources))]
    return summarize(samples, out_dir, {"kind": "text-video", "ground_truth": metrics[0]["reference"],
                                        "num_frames": num_frames, "temperature": temperature, "top_k": top_k,
                                        "seed": seed})


def rollout_robot(module, source: str, out_dir: str, num_samples: int = 1, num_frames: int = 8,
                  temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0,
                  views: Optional[list[str]] = None) -> dict[str, Any]:
    """Along each of `num_samples` episodes: one-step frame predictions at N steps, plus action chunks."""
    from gr.data.robot import make_windows
    from gr.normalization import Normalizer
    from gr.data.robot_stream import RobotWindowStream
    from gr.data.shards import SampleError, expand_urls, raw_samples

    robot, clip = module.robot_spec, module.clip_spec
    shown = views or robot.view_names
    unknown = [v for v in shown if v not in robot.view_names]
    if unknown:
        raise ValueError(f"--views: unknown view {unknown[0]!r}; this model's views are {robot.view_names}")
    norm = Normalizer.from_stats(module.normalization_stats(), robot.arm_index, robot.gripper_index)
    # episode shards with mp4 views, or pre-tokenized ones (`{view}.tokens.npy`, codes of the model's own VQGAN)
    streams = {False: RobotWindowStream([], robot, clip, norm),
               True: RobotWindowStream([], robot, clip, norm, tokens=module.tokens_spec)}
    samples, kinds = [], set()
    for raw in raw_samples(expand_urls(source, "--source")):
        key = f"{os.path.basename(raw.get('__url__', '?'))}:{raw.get('__key__', '?')}"
        pretokenized = any(k.endswith(".tokens.npy") for k in raw)
        kinds.add(pretokenized)
        if len(kinds) > 1:
            raise ValueError(f"--source {source!r}: mixes pre-tokenized and mp4 episodes; roll out one kind at a time")
        try:
            frames, state, action, instruction = streams[pretokenized].episode(raw, key)
        except SampleError as exc:
            raise ValueError(f"--source: {exc}") from None
        samples.append(_robot_episode(module, out_dir, f"sample{len(samples):02d}", key, frames, state, action,
                                      instruction, norm, num_frames, temperature, top_k, seed, shown, make_windows,
                                      pretokenized))
        if len(samples) == num_samples:
            break
    if not samples:
        raise ValueError(f"--source {source!r}: no robot episode found")
    return summarize(samples, out_dir, {"kind": "robot", "ground_truth": samples[0]["metrics"]["reference"],
                                        "num_frames": num_frames, "temperature": temperature,
                                        "top_k": top_k, "seed": seed, "views": shown})


@torch.no_grad()
def _robot_episode(module, out_dir, name, key, frames, state, action, instruction, norm, num_frames, temperature,
                   top_k, seed, shown, make_windows, pretokenized=False) -> dict[str, Any]:
    """`frames`: per view, uint8 frames (T, S, S, 3), or int64 codes (T, h, w) when `pretokenized`."""
    robot, clip = module.robot_spec, module.clip_spec
    th, step = clip.num_history, clip.future_frame_offset
    t_steps = list(range(th - 1, len(state) - step, step))[:num_frames]
    if not t_steps:
        raise ValueError(f"--source {key}: {len(state)} steps, fewer than the model's history ({th}) plus the "
                         f"future offset ({step})")
    if pretokenized:  # the ground truth shown and scored is the VQGAN decode of the true codes
        codes = {v: torch.from_numpy(frames[v]) for v in robot.view_names}
        frames = {v: module.image_tokenizer.decode(c).numpy() for v, c in codes.items()}
    else:
        codes = {v: module.image_tokenizer.encode(torch.from_numpy(frames[v])) for v in robot.view_names}
    ws = list(make_windows({v: c.numpy() for v, c in codes.items()}, state, action, norm, robot.view_names,
                           list(range(len(state))), th, step, robot.action_chunk, robot.history_stride))
    hist = torch.from_numpy(np.stack([w["history"] for w in ws]))
    st = torch.from_numpy(np.stack([w["state"] for w in ws]))
    text, mask = module.text_encoder([instruction] * len(ws))
    sel = torch.tensor(t_steps)
    gen = module.model.generate_future_frame(text[sel], mask[sel], hist[sel], temperature, top_k,
                                             torch.Generator().manual_seed(seed), state=st[sel])
    probs = future_code_probs(module.model, text[sel], mask[sel], hist[sel], gen, st[sel])
    true, pred, metrics = _robot_frames(module, codes, frames, gen, t_steps, shown, pretokenized, probs)
    result = save_rollout(out_dir, name, true, pred, instruction, [t + step for t in t_steps], 4.0, metrics,
                          "VQGAN(true)" if pretokenized else "true")
    arm, grip = module.model.action_head.predict(module.model.readout_features(text, mask, hist, st),
                                                 torch.Generator().manual_seed(seed))
    first = norm.to_robot(arm[:, 0].numpy(), None if grip is None else grip[:, 0].numpy())
    result["actions_plot"] = plot_actions(first, action, os.path.join(out_dir, f"{name}_actions.png"))
    result["action_l1"] = float(np.abs(first - action).mean())
    return result | {"key": key}


def _robot_frames(module, codes, frames, gen, t_steps, shown, pretokenized=False, probs=None):
    """True frames and decoded predictions (N, Nv', S, S, 3) of the shown views, and their metrics per view; the
    baseline copies each view's frame at t, the last the model saw, to predict t + future_frame_offset. Pre-tokenized
    episodes are scored against the decodes of their codes (`reference` "vqgan_decode")."""
    step, names = module.clip_spec.future_frame_offset, module.robot_spec.view_names
    pick = lambda per_view, off: np.stack([np.stack([per_view[v][t + off] for v in shown])  # noqa: E731
                                           for t in t_steps])
    codes = {v: c.numpy() for v, c in codes.items()}
    true, last, true_codes, last_codes = pick(frames, step), pick(frames, 0), pick(codes, step), pick(codes, 0)
    vi = [names.index(v) for v in shown]
    raw = (None, None) if pretokenized else (true[None], last[None])
    metrics, pred = vq_world_metrics(module.image_tokenizer, gen[None, :, vi], true_codes[None], last_codes[None],
                                     *raw, view_names=shown, pred_probs=None if probs is None else probs[None, :, vi])
    return true, pred[0], metrics[0]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import argparse

    p = argparse.ArgumentParser(prog="gr rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pretraining or finetuning checkpoint: Lightning .ckpt, sharded folder or gr export folder")
    p.add_argument("--source", required=True,
                   help="a video file (mp4, avi, mpg, mov, mkv, webm, ...; captioned by --caption or a sidecar "
                        "<stem>.txt/.json), a folder of them, text-video shard(s) (brace pattern; mp4 or "
                        "pre-tokenized), or robot episode shard(s) (mp4 or pre-tokenized)")
    p.add_argument("--caption", default=None, help="caption for video files (overrides sidecars and shard captions)")
    p.add_argument("--num-samples", type=int, default=1, help="samples/episodes rolled out in one batched call")
    p.add_argument("--num-frames", type=int, default=8, help="future frames to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", nargs="+", default=None, help="robot views to show (default: all)")
    p.add_argument("--out", default="outputs/rollout")
    args = p.parse_args(argv)
    try:
        module = module_from_checkpoint(args.checkpoint)
        if getattr(module, "robot_spec", None) is not None:
            report = rollout_robot(module, args.source, args.out, args.num_samples, args.num_frames,
                                   args.temperature, args.top_k, args.seed, args.views)
        else:
            if args.views:
                raise ValueError("--views: a text-video checkpoint has a single, unnamed view")
            report = rollout_text_video(module, args.source, args.out, args.caption, args.num_samples,
                                        args.num_frames, args.temperature, args.top_k, args.seed)
    except ValueError as exc:
        p.error(str(exc))
    print(json.dumps(report["metrics"], indent=2))
    return report
