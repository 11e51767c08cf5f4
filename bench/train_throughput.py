"""Training throughput: tokens/s and MFU of GR pretraining, and our trunk against a nanoGPT-style block stack.

Prints one JSON object. Two sections:

- `trunk_vs_reference` (default on the CPU): training steps (forward, backward, AdamW) of the GR model as it is
  trained (projected CLIP text tokens with a padding mask, 2 history frames, teacher-forced future frame, cross-entropy
  on the future frame) against a plain nanoGPT-style model of the same depth, width, heads, sequence length and
  vocabulary (token + position embeddings, blocks with is_causal attention, LM head and cross-entropy on every
  position, as nanoGPT trains). Steps alternate between the two in one run and the median step time of each gives
  tokens/s; the ratio is ours / reference (target >= 1.0). Where ours differs by design: its loss reads only the
  future frame, so the last block and the head run for those rows only (`GPTTrunk(num_outputs=...)`), and it masks
  padded text keys.
- `decode_sandbox` (on request): per-step time of training from raw mp4 shards with the crash-isolating decoder
  child against decoding in-process (`decode_sandbox_run`; target ratio <= 1.05).
- `lightning` (default on a GPU): `PretrainModule` under the Lightning Trainer with a strategy from
  configs/strategy/*.yaml (or `auto`), a precision and optional activation checkpointing / torch.compile, on
  pre-tokenized synthetic batches (codes + captions; the frozen CLIP text tower runs online, as in real pretraining
  from token shards). Reports tokens/s, MFU and peak memory.

FLOPs per token (DESIGN.md) = 6 N + 12 L d T for the trainable part (N: trainable parameters without embedding
tables; L layers, d width, T sequence length) + 2 per frozen-encoder parameter per token that encoder processes,
spread over the T tokens of the sample (the CLIP text tower runs on 77 token positions per caption).
MFU = FLOPs per token x tokens/s / (peak FLOP/s x GPUs). Peaks are dense bf16 (TF32 for fp32) tensor-core figures.
`mfu_executed` uses the FLOPs a step really runs instead (torch's FlopCounterMode over one step, text tower included):
the formula also charges the rows our last block and head skip, so `mfu` reads a few percent higher.
Captions are all distinct, so the text tower's feature cache never hits and the tower really runs in every step.

    .venv/bin/python bench/train_throughput.py                                  # CPU: trunk vs reference, preset S
    python bench/train_throughput.py --device cuda --presets S B --strategy deepspeed_stage_2 \\
        --precision bf16-mixed --out bench/results/train_throughput-gpu.json     # the GPU run (one command)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Dense peak TFLOP/s by GPU name fragment: (bf16, tf32).
PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0), "L40S": (362.1, 183.0),
               "A10G": (125.0, 62.5), "4090": (165.2, 82.6)}
TEXT_CONTEXT = 77  # open_clip text towers always run their full context


# ---------------------------------------------------------------- the nanoGPT-style reference
class RefBlock(nn.Module):
    """nanoGPT's Block: LayerNorm, fused qkv Linear, SDPA with is_causal, exact GELU MLP."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    """nanoGPT's GPT: token + position embeddings, blocks, final LayerNorm, LM head (tied to the token embedding)."""

    def __init__(self, num_layers: int, num_heads: int, width: int, seq_len: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.h = nn.ModuleList(RefBlock(width, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def trunk_spec(name: str) -> dict:
    """A preset name (S/B/L/XL) or LAYERSxWIDTHxHEADS (e.g. 2x32x2 for tests) -> TrunkConfig fields."""
    if "x" in name:
        layers, width, heads = (int(v) for v in name.split("x"))
        return {"num_layers": layers, "width": width, "num_heads": heads}
    return {"preset": name}


# ---------------------------------------------------------------- FLOPs
def non_embedding_params(module: nn.Module, trainable_only: bool = True) -> int:
    """Parameters that enter matmuls: everything but nn.Embedding tables."""
    emb = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in emb and (p.requires_grad or not trainable_only))


def flops_per_token(n_trainable: int, num_layers: int, width: int, seq_len: int,
                    frozen_online: dict[str, tuple[int, int]] | None = None) -> dict:
    """6N + 12 L d T, plus 2 FLOPs per frozen parameter per token it processes ({name: (params, tokens/sample)})."""
    trainable = 6 * n_trainable + 12 * num_layers * width * seq_len
    frozen = {name: 2 * p * tokens / seq_len for name, (p, tokens) in (frozen_online or {}).items()}
    return {"trainable": trainable, "frozen_online": frozen, "total": trainable + sum(frozen.values())}


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None  # no meaningful CPU peak: MFU is reported on GPUs (or with --peak-tflops)
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if "16" in precision else tf32) * 1e12
    return None


# ---------------------------------------------------------------- section 1: our trunk vs the reference
def _gr_model(preset: str, grid: int, vocab: int, text_tokens: int, act_ckpt: bool = False):
    from gr.config import ClipSpec, GRModelConfig
    from gr.model import GRModel

    cfg = GRModelConfig(trunk={**trunk_spec(preset), "activation_checkpointing": act_ckpt},
                        clip=ClipSpec(num_history=2, image_size=grid * 16), max_text_tokens=text_tokens)
    return GRModel(cfg, vocab, grid, 512)


def trunk_vs_reference(preset: str, grid: int, vocab: int, batch: int, steps: int, device: torch.device,
                       text_tokens: int = 32) -> dict:
    torch.manual_seed(0)
    ours = _gr_model(preset, grid, vocab, text_tokens).to(device).train()
    tc = ours.cfg.trunk
    seq_len = text_tokens + 3 * grid * grid
    ref = RefGPT(tc.num_layers, tc.num_heads, tc.width, seq_len, vocab).to(device).train()
    text = torch.randn(batch, text_tokens, 512, device=device)
    text_mask = torch.arange(text_tokens, device=device)[None] < torch.randint(4, text_tokens, (batch, 1), device=device)
    hist = torch.randint(0, vocab, (batch, 2, grid, grid), device=device)
    future = torch.randint(0, vocab, (batch, grid, grid), device=device)
    idx = torch.randint(0, vocab, (batch, seq_len), device=device)
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "ref": torch.optim.AdamW(ref.parameters(), lr=1e-4)}

    def step_ours():
        logits = ours(text, text_mask, hist, future)  # (B, n, V): the future frame only, as pretraining trains
        F.cross_entropy(logits.reshape(-1, vocab), future.reshape(-1)).backward()

    def step_ref():
        logits = ref(idx[:, :-1])  # (B, T-1, V) next-token prediction on every position, as nanoGPT trains
        F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1)).backward()

    fns = {"ours": step_ours, "ref": step_ref}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(steps + 1):  # the first pair warms up allocators and kernels
        for name, fn in (fns.items() if i % 2 == 0 else reversed(fns.items())):  # alternate order against drift
            _sync(device)
            t0 = time.perf_counter()
            fn()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            _sync(device)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    tokens = {"ours": batch * seq_len, "ref": batch * (seq_len - 1)}
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens[k] / med[k] for k in fns}
    return {"preset": preset, "trunk": {"num_layers": tc.num_layers, "num_heads": tc.num_heads, "width": tc.width},
            "grid": grid, "vocab": vocab, "batch": batch, "seq_len": seq_len, "steps": steps,
            "params": {"ours": sum(p.numel() for p in ours.parameters()),
                       "ref": sum(p.numel() for p in ref.parameters())},
            "step_seconds_median": {k: round(v, 4) for k, v in med.items()},
            "step_seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_ours_over_ref": round(tps["ours"] / tps["ref"], 3)}


# ---------------------------------------------------------------- section 2: Lightning training with a strategy
WORDS = ["pick", "the", "red", "block", "open", "drawer", "push", "button", "close", "window", "robot", "arm"]


def synthetic_captions(start: int, count: int) -> list[str]:
    """Distinct captions (a few words + a running number): the text tower's feature cache never hits, as with
    millions of real captions, so the frozen encoder really runs online."""
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 5)) + f" take {i}"
            for i in range(start, start + count)]


class _SyntheticTokenBatches(torch.utils.data.IterableDataset):
    """Endless pre-tokenized batches (codes + captions), like VideoDataModule(shard_format: tokens) yields."""

    def __init__(self, batch: int, grid: int, vocab: int, num_history: int = 2, distinct: int = 8):
        g = torch.Generator().manual_seed(0)
        self.batch = batch
        self.codes = [torch.randint(0, vocab, (batch, num_history + 1, grid, grid), generator=g) for _ in range(distinct)]

    def __iter__(self):
        i = 0
        while True:
            yield {"codes": self.codes[i % len(self.codes)], "caption": synthetic_captions(i * self.batch, self.batch),
                   "key": [f"synthetic-{i}-{j}" for j in range(self.batch)], "num_skipped": 0}
            i += 1


class _StepTimer:
    """Lightning callback: wall time of every training step (synchronized on GPUs)."""

    def __init__(self):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self, outer):
                self.outer = outer

            def on_train_start(self, trainer, pl_module):
                if pl_module.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(pl_module.device)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(pl_module.device)
                self.outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(pl_module.device)
                self.outer.times.append(time.perf_counter() - self.outer.t0)

        self.times: list[float] = []
        self.t0 = 0.0
        self.callback = Timer(self)


def _strategy(name: str, batch: int = 1):
    """"auto", or the strategy of configs/strategy/<name>.yaml, built from its class_path and init_args."""
    if name in ("auto", "single"):
        return "auto"
    import importlib

    import yaml

    path = os.path.join(REPO, "configs", "strategy", f"{name}.yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"--strategy: no configs/strategy/{name}.yaml")
    spec = yaml.safe_load(open(path))["trainer"]["strategy"]
    mod, cls = spec["class_path"].rsplit(".", 1)
    kwargs = dict(spec.get("init_args", {}))
    if cls == "DeepSpeedStrategy":  # it reads the batch size off the loader's batch_sampler, which ours lacks
        kwargs["logging_batch_size_per_gpu"] = batch
    return getattr(importlib.import_module(mod), cls)(**kwargs)


def executed_flops_per_token(module, grid: int, vocab: int, samples: int = 2) -> float:
    """FLOPs one training step really executes per token (forward + backward of the GR model, the text tower's
    forward), counted by torch's FlopCounterMode on the CPU before training. Unlike 6N + 12LdT it sees that the last
    block and the head run only for the future frame's rows."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {"codes": torch.randint(0, vocab, (samples, 3, grid, grid)),
             "caption": synthetic_captions(10 ** 9, samples)}  # not in the feature cache
    with FlopCounterMode(display=False) as counter:
        module._loss(batch)[0].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (samples * (32 + 3 * grid * grid))


def lightning_run(preset: str, strategy: str, precision: str, batch: int, steps: int, warmup: int, grid: int,
                  vocab: int, device: torch.device, devices: int, act_ckpt: bool, compile_blocks: bool,
                  text_model: str, peak_tflops: float | None) -> dict:
    import lightning as L

    from gr.training.pretrain import PretrainModule

    torch.manual_seed(0)
    image_size = grid * 16
    module = PretrainModule(
        model={"trunk": {**trunk_spec(preset), "activation_checkpointing": act_ckpt},
               "clip": {"num_history": 2, "image_size": image_size}, "max_text_tokens": 32},
        text_encoder={"model_name": text_model},
        image_tokenizer={"codebook_size": vocab, "ch_mult": [1, 1, 2, 2, 4], "resolution": image_size},  # f16
        optim={"lr": 3e-4, "warmup_steps": 10, "total_steps": 10_000}, compile=compile_blocks)
    # Counted before the strategy wraps the model (ZeRO-3 would leave 0-element parameters behind).
    model = module.model
    tc = model.cfg.trunk
    seq_len = 32 + 3 * model.tokens_per_frame
    params_trainable = sum(p.numel() for p in model.parameters())
    params_non_embedding = non_embedding_params(model)
    text_params = sum(p.numel() for p in module.text_encoder.parameters())
    flops = flops_per_token(params_non_embedding, tc.num_layers, tc.width, seq_len,
                            {"text_encoder": (text_params, TEXT_CONTEXT)})
    executed = executed_flops_per_token(module, grid, vocab)
    loader = torch.utils.data.DataLoader(_SyntheticTokenBatches(batch, grid, vocab), batch_size=None)
    timer = _StepTimer()
    trainer = L.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=devices,
                        strategy=_strategy(strategy, batch), precision=precision, max_steps=warmup + steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer.callback], limit_val_batches=0,
                        gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=loader)
    step_s = statistics.median(timer.times[warmup:])
    world = trainer.world_size
    tokens_per_s = world * batch * seq_len / step_s
    peak = peak_flops(device, precision, peak_tflops)
    out = {"preset": preset, "strategy": strategy, "precision": precision, "activation_checkpointing": act_ckpt,
           "compile": compile_blocks, "world_size": world, "batch_per_device": batch, "grid": grid,
           "seq_len": seq_len, "params_trainable": params_trainable,
           "params_trainable_non_embedding": params_non_embedding, "params_text_encoder": text_params,
           "steps_timed": len(timer.times[warmup:]), "step_seconds_median": round(step_s, 4),
           "tokens_per_s": round(tokens_per_s, 1), "flops_per_token": flops,
           "flops_per_token_executed": round(executed, 1),
           "achieved_tflops": round(flops["total"] * tokens_per_s / 1e12, 3),
           "mfu": round(flops["total"] * tokens_per_s / (peak * world), 4) if peak else None,
           "mfu_executed": round(executed * tokens_per_s / (peak * world), 4) if peak else None,
           "peak_tflops_per_device": peak / 1e12 if peak else None}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    return out


def decode_sandbox_run(steps: int, warmup: int, batch: int, num_workers: int, repeats: int = 2,
                       num_clips: int = 256) -> dict:
    """Per-step cost of the crash-isolating decoder child (gr/data/decode_sandbox.py, on by default): the demo's
    pretraining model trained from raw mp4 shards (decode + frozen VQGAN online, the path that decodes every step),
    with GR_DECODE_SANDBOX=0 and =1 alternately in one run. A step is the wall time from one batch's start to the
    next one's, so it includes fetching the batch. Target: sandboxed / in-process <= 1.05."""
    import tempfile

    import lightning as L
    import yaml

    from data_prep.make_synthetic_video import main as make_synthetic
    from gr.data.datamodule import VideoDataModule
    from gr.training.pretrain import PretrainModule

    with open(os.path.join(REPO, "configs", "demo", "pretrain.yaml")) as f:
        init = yaml.safe_load(f)["model"]["init_args"]
    size = init["model"]["clip"]["image_size"]
    init["image_tokenizer"] = {"codebook_size": 1024, "embed_dim": 32, "ch": 32, "ch_mult": [1, 2, 2, 4],
                               "z_channels": 64, "resolution": size}  # the demo tokenizer's architecture
    times: dict[str, list[float]] = {"in_process": [], "sandboxed": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(["--out", tmp, "--num-train", str(num_clips), "--num-val", "0", "--size", str(size),
                               "--per-shard", "64", "--fps", str(init["model"]["clip"].get("fps", 10.0))])
        for _ in range(repeats):
            for mode in ("in_process", "sandboxed"):
                os.environ["GR_DECODE_SANDBOX"] = "0" if mode == "in_process" else "1"
                starts: list[float] = []

                class Iter(L.Callback):
                    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                        starts.append(time.perf_counter())

                torch.manual_seed(0)
                module = PretrainModule(**init)
                dm = VideoDataModule(train_shards=data["train_shards"], batch_size=batch, num_workers=num_workers,
                                     shuffle_buffer=64, resampled=True)
                trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps + 1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, callbacks=[Iter()], limit_val_batches=0)
                trainer.fit(module, datamodule=dm)
                gaps = [b - a for a, b in zip(starts, starts[1:])][warmup:]
                times[mode].append(statistics.median(gaps))
        os.environ.pop("GR_DECODE_SANDBOX", None)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"num_workers": num_workers, "batch": batch, "steps_timed": steps, "repeats": repeats,
            "image_size": size, "step_seconds": {m: round(v, 4) for m, v in med.items()},
            "per_run_step_seconds": {m: [round(x, 4) for x in v] for m, v in times.items()},
            "ratio_sandboxed_over_in_process": round(med["sandboxed"] / med["in_process"], 4),
            "target_ratio": 1.05, "meets_target": med["sandboxed"] / med["in_process"] <= 1.05}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("lightning", "deepspeed", "xformers"):
        try:  # metadata only: importing deepspeed would print to stdout and spoil the JSON
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=["trunk_vs_reference", "lightning", "decode_sandbox"],
                   default=None,
                   help="default: trunk_vs_reference on the CPU, both on a GPU")
    p.add_argument("--presets", nargs="+", default=None,
                   help="presets or LAYERSxWIDTHxHEADS trunks (default: S on the CPU, S B on a GPU)")
    p.add_argument("--grid", type=int, default=None, help="codes per frame side (default 8 on the CPU, 16 on a GPU)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 8 on the CPU, 32 on a GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6 on the CPU, 30 on a GPU)")
    p.add_argument("--warmup-steps", type=int, default=10, help="lightning section: untimed first steps")
    p.add_argument("--strategy", default="auto", help="auto or a configs/strategy/*.yaml name (lightning section)")
    p.add_argument("--precision", default=None, help="default 32-true on the CPU, bf16-mixed on a GPU")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--text-model", default="ViT-B-32", help="open_clip text tower run online (random weights)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the per-device peak used for MFU")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2],
                   help="decode_sandbox section: DataLoader workers, one measurement each")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sections = args.sections or (["trunk_vs_reference", "lightning"] if gpu else ["trunk_vs_reference"])
    presets = args.presets or (["S", "B"] if gpu else ["S"])
    grid = args.grid or (16 if gpu else 8)
    batch = args.batch_size or (32 if gpu else 8)
    steps = args.steps or (30 if gpu else 6)
    precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    # Lightning re-runs this script for ranks 1.. of a multi-GPU run: only the launching process reports.
    child = int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("RANK", "0")) > 0
    result = {"benchmark": "train_throughput", "machine": machine_info(device)}
    if "trunk_vs_reference" in sections and not child:
        runs = {pr: trunk_vs_reference(pr, grid, args.vocab, batch, steps, device) for pr in presets}
        result["trunk_vs_reference"] = runs
        result["ratio_target"] = 1.0
        result["meets_ratio_target"] = all(r["ratio_ours_over_ref"] >= 1.0 for r in runs.values())
    if "lightning" in sections:
        result["lightning"] = {pr: lightning_run(pr, args.strategy, precision, batch, steps, args.warmup_steps, grid,
                                                 args.vocab, device, args.devices, args.activation_checkpointing,
                                                 args.compile, args.text_model, args.peak_tflops) for pr in presets}
    if "decode_sandbox" in sections and not child:
        result["decode_sandbox"] = [decode_sandbox_run(args.steps or 20, 5, args.batch_size or 16, w)
                                    for w in args.num_workers]
    if child:
        return result
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
