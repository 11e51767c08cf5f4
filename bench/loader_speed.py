"""Pretraining loader throughput: pre-tokenized shards vs decoding mp4 + running the frozen VQGAN encoder.

Prints one JSON object. All numbers come from one run on one machine, so compare the ratios, not absolute values.

    python bench/loader_speed.py                    # synthetic 64 px clips, the demo tokenizer architecture
    python bench/loader_speed.py --num-clips 512 --num-workers 2

Measured paths, over the same clips with the same batch size and workers:
- `bare_decord`: decoding every frame of every mp4 with decord in this process (reference for the decoder alone);
- `bare_decord_sandboxed`: the same through gr's crash-isolating decoder child (gr/data/decode_sandbox.py, the default);
- `video`: VideoDataModule(shard_format="video") batches, then FrozenVQGAN.encode on them (what training does);
- `video_in_process`: the same with GR_DECODE_SANDBOX=0;
- `tokens`: VideoDataModule(shard_format="tokens") batches of codes (no decoding, no encoder);
- `h264_decord` / `av1_pyav`: every frame of the same clips, in this process, once as the shards' H.264 (decord) and
  once re-encoded as AV1 (LeRobot's default), which decord cannot open and gr reads with PyAV (gr/data/pyav_reader.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pass(loader, encode=None) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        if encode is not None:
            encode(batch["frames"])
        n += len(batch["caption"])
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    from data_prep.make_synthetic_video import main as make_synthetic
    from data_prep.tokenize_shards import run as tokenize
    from gr.config import ClipSpec, ImageTokenizerConfig
    from gr.data.datamodule import VideoDataModule
    from gr.data.shards import expand_urls
    from gr.data.video_io import encode_video, get_frames, open_video
    from gr.encoders import FrozenVQGAN, save_taming_vqgan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clips", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="passes per path; the fastest is reported")
    p.add_argument("--checkpoint", default=None, help="taming VQGAN .ckpt (default: random, demo architecture)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(["--out", os.path.join(tmp, "video"), "--num-train", str(args.num_clips),
                               "--num-val", "0", "--size", str(args.image_size), "--per-shard", "64"])
        ckpt = args.checkpoint
        if ckpt is None:  # the demo tokenizer's architecture, random weights: same encoder cost as a trained one
            cfg = ImageTokenizerConfig(codebook_size=256, embed_dim=32, ch=32, ch_mult=[1, 2, 2, 4], z_channels=64,
                                       resolution=args.image_size)
            ckpt = os.path.join(tmp, "vqgan.ckpt")
            save_taming_vqgan(FrozenVQGAN(cfg).vq, ckpt, os.path.join(tmp, "vqgan.yaml"))
        t0 = time.perf_counter()
        report = tokenize([data["train_shards"]], os.path.join(tmp, "tokens"), ckpt, image_size=args.image_size)
        tokenize_s = time.perf_counter() - t0
        vq = FrozenVQGAN.from_taming(ckpt)
        grid = vq.grid_size(args.image_size)
        clip = ClipSpec(num_history=2, future_frame_offset=1, fps=8.0, image_size=args.image_size)
        module = SimpleNamespace(clip_spec=clip, tokens_spec={
            "codebook_size": vq.codebook_size, "image_size": args.image_size, "grid": [grid, grid],
            "fingerprint": vq.vq.codebook_fingerprint()})

        def loader(shards: str, fmt: str):
            dm = VideoDataModule(train_shards=shards, batch_size=args.batch_size, num_workers=args.num_workers,
                                 shuffle_buffer=64, shard_format=fmt)
            dm.trainer = SimpleNamespace(lightning_module=module, training=False)
            dm.setup("fit")
            return dm.train_dataloader()

        def in_process(fn, *a):
            os.environ["GR_DECODE_SANDBOX"] = "0"  # read at every open_video, also by forked DataLoader workers
            try:
                return fn(*a)
            finally:
                os.environ.pop("GR_DECODE_SANDBOX")

        def bare() -> tuple[int, float]:
            import tarfile

            t, frames = time.perf_counter(), 0
            for url in expand_urls(data["train_shards"], "shards"):
                with tarfile.open(url) as tar:
                    for m in tar.getmembers():
                        if m.name.endswith(".mp4"):
                            vr = open_video(tar.extractfile(m).read())
                            frames += len(vr.get_batch(list(range(len(vr)))).asnumpy())
            return frames, time.perf_counter() - t

        def blobs() -> list[bytes]:
            import tarfile

            out = []
            for url in expand_urls(data["train_shards"], "shards"):
                with tarfile.open(url) as tar:
                    out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
            return out

        h264 = blobs()
        av1 = []
        for b in h264:
            vr = open_video(b, sandbox=False)
            av1.append(encode_video(get_frames(vr, range(len(vr))), vr.get_avg_fps(), "libsvtav1"))
        assert type(open_video(av1[0], sandbox=False)).__name__ == "PyAVVideo"

        def decode_all(videos: list[bytes]) -> tuple[int, float]:
            t, frames = time.perf_counter(), 0
            for b in videos:
                vr = open_video(b, sandbox=False)
                frames += len(get_frames(vr, range(len(vr))))
            return frames, time.perf_counter() - t

        timings = {k: [] for k in ("bare_decord", "bare_decord_sandboxed", "video", "video_in_process", "tokens",
                                   "h264_decord", "av1_pyav")}
        for _ in range(args.repeats):
            timings["bare_decord"].append(in_process(bare))
            timings["bare_decord_sandboxed"].append(bare())
            timings["video"].append(_pass(loader(data["train_shards"], "video"), vq.encode))
            timings["video_in_process"].append(in_process(lambda: _pass(loader(data["train_shards"], "video"),
                                                                        vq.encode)))
            timings["tokens"].append(_pass(loader(report["pattern"], "tokens")))
            timings["h264_decord"].append(decode_all(h264))
            timings["av1_pyav"].append(decode_all(av1))
    best = {k: max(n / s for n, s in v) for k, v in timings.items()}
    result = {
        "benchmark": "loader_speed",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"num_clips": args.num_clips, "image_size": args.image_size, "batch_size": args.batch_size,
                     "num_workers": args.num_workers, "clip_frames": clip.span, "grid": grid,
                     "codebook_size": vq.codebook_size, "repeats": args.repeats},
        "bare_decord_frames_per_s": round(best["bare_decord"], 1),
        "bare_decord_sandboxed_frames_per_s": round(best["bare_decord_sandboxed"], 1),
        "sandbox_decode_slowdown": round(best["bare_decord"] / best["bare_decord_sandboxed"], 3),
        "h264_decord_frames_per_s": round(best["h264_decord"], 1),
        "av1_pyav_frames_per_s": round(best["av1_pyav"], 1),
        "av1_pyav_slowdown_vs_h264_decord": round(best["h264_decord"] / best["av1_pyav"], 3),
        "video_decode_and_tokenize_samples_per_s": round(best["video"], 2),
        "video_in_process_samples_per_s": round(best["video_in_process"], 2),
        "sandbox_loader_slowdown": round(best["video_in_process"] / best["video"], 3),
        "pretokenized_samples_per_s": round(best["tokens"], 2),
        "speedup_pretokenized_vs_video": round(best["tokens"] / best["video"], 2),
        "pretokenize_once_seconds": round(tokenize_s, 2),
        "pretokenize_frames_per_s": round(report["frames"] / tokenize_s, 1),
        "target_speedup": 5.0,
    }
    result["meets_target"] = result["speedup_pretokenized_vs_video"] >= result["target_speedup"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
