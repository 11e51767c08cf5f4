"""Peak training memory per strategy, with and without activation checkpointing.

Prints one JSON object. For every strategy it launches real training steps of the GR model (forward, backward, AdamW)
in fresh processes and reports, per rank (the maximum over ranks):

- `peak_mib`: the peak of live tensor memory from model construction to the last step. On a GPU
  `torch.cuda.max_memory_allocated`; on the CPU the largest "Total Allocated" that torch.profiler's memory events
  report (the CPU allocator's live bytes, counted from just before the model is built);
- `peak_rss_growth_mib` (CPU): growth of the peak resident set (ru_maxrss) over the process size before the model,
  which adds allocator caching and communication buffers outside torch's allocator;
- `optimizer_state_mib`: the AdamW state tensors this rank holds (what ZeRO / FSDP shard);
- `param_mib`: the parameter storage this rank holds (full replicas under DDP and ZeRO-2, shards under FSDP2 and
  ZeRO-3; for ZeRO-2 the fp32 master partition is part of the optimizer state here).

Strategies: `single` (one process), `ddp` (torch DDP), `fsdp2` (gr.distributed.apply_fsdp2, as FSDP2Strategy
applies it), `zero2` / `zero3` (raw `deepspeed.initialize` with gr.distributed.deepspeed_config; Lightning's DeepSpeed
strategy itself needs CUDA). Multi-process runs use `torch.distributed.run` with 2 processes (gloo on the CPU).
The frozen encoders are not built: batches are codes and text features, so the numbers are the trainable model's.

LoRA (`--lora-ranks 8 ...`): extra `single+lora<r>` arms adapt the trunk's attention and MLP projections
(gr/model/lora.py defaults) and train only the adapters, beside the full `single` arm; every arm reports
`trainable_params`.

    .venv/bin/python bench/memory.py                                  # CPU: preset S, 8x8 codes, batch 8
    .venv/bin/python bench/memory.py --strategies single --lora-ranks 8 32
    python bench/memory.py --device cuda --nproc 8 --preset B --grid 16 --batch-size 16 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
STRATEGIES = ["single", "ddp", "fsdp2", "zero2", "zero3"]
MIB = 2 ** 20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _local_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):  # DTensor shard (FSDP2)
        t = t.to_local()
    if hasattr(t, "ds_tensor"):  # ZeRO-3 partitioned parameter: the local partition
        t = t.ds_tensor
    return t.numel() * t.element_size()


def _optimizer_state_bytes(opt) -> int:
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the client torch optimizer
    return sum(_local_bytes(v) for state in inner.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _profiled_peak_bytes(prof, folder: str, rank: int) -> int:
    """Largest live-bytes total of the CPU allocator among the profiler's memory events."""
    path = os.path.join(folder, f"trace{rank}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def worker(args) -> None:
    """One rank: build, wrap per strategy, train `steps` steps, write this rank's measurements."""
    import torch.distributed as dist

    from gr.config import ClipSpec, GRModelConfig
    from gr.distributed import FrameLoss
    from gr.model import GRModel
    from gr.training.optim import param_groups

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.strategy in ("zero2", "zero3"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    elif args.strategy != "single":  # DDP and FSDP2 need a process group, even with one rank
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
    torch.manual_seed(0)
    baseline = _rss_mib()
    profiler = None
    if device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        profiler.__enter__()
    from bench.train_throughput import trunk_spec

    cfg = GRModelConfig(trunk={**trunk_spec(args.preset), "activation_checkpointing": args.activation_checkpointing},
                        clip=ClipSpec(num_history=2, image_size=args.grid * 16), max_text_tokens=32)
    net = FrameLoss(GRModel(cfg, args.vocab, args.grid, 512)).to(device)
    if args.lora:
        from gr.model.lora import LoRAConfig, apply_lora

        apply_lora(net.model, LoRAConfig(rank=args.lora, alpha=2.0 * args.lora))
        for name, p in net.named_parameters():
            p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if args.strategy == "ddp":
        net = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True)
    elif args.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from gr.distributed import apply_fsdp2

        holder = nn.Module()
        holder.add_module("loss_model", net)
        apply_fsdp2(holder, init_device_mesh(device.type, (world,)))
    opt = torch.optim.AdamW(param_groups(net, 0.05), lr=1e-4)
    engine = None
    if args.strategy in ("zero2", "zero3"):
        import deepspeed

        from gr.distributed import deepspeed_config

        ds = deepspeed_config(int(args.strategy[-1]), args.batch_size, world_size=world, bf16=args.precision == "bf16",
                              grad_clip=1.0)
        engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(rank)
    b, n = args.batch_size, args.grid * args.grid
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16" and engine is None)
    for _ in range(args.steps):
        text = torch.randn(b, 32, 512, generator=g).to(device)
        mask = (torch.arange(32)[None] < torch.randint(4, 32, (b, 1), generator=g)).to(device)
        hist = torch.randint(0, args.vocab, (b, 2, args.grid, args.grid), generator=g).to(device)
        fut = torch.randint(0, args.vocab, (b, args.grid, args.grid), generator=g).to(device)
        if engine is not None:
            loss = engine(text.to(torch.bfloat16) if args.precision == "bf16" else text, mask, hist, fut)
            engine.backward(loss)
            engine.step()
        else:
            with autocast:
                loss = net(text, mask, hist, fut)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    extra = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MIB
    else:
        profiler.__exit__(None, None, None)
        peak = _profiled_peak_bytes(profiler, args.worker_out, rank) / MIB
        extra["peak_rss_growth_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline, 1)
    params_local = sum(_local_bytes(p) for p in (engine.module if engine else net).parameters()) / MIB
    out = {"rank": rank, "world_size": world, "peak_mib": round(peak, 1), "param_mib": round(params_local, 3),
           "optimizer_state_mib": round(_optimizer_state_bytes(opt) / MIB, 3), "params": n_params,
           "trainable_params": n_trainable,
           "final_loss": round(float(loss), 4), "tokens_per_sample": 32 + 3 * n, **extra}
    with open(os.path.join(args.worker_out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_one(args, strategy: str, act_ckpt: bool, lora: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--worker", "--worker-out", tmp, "--strategy", strategy, "--preset", args.preset, "--grid",
                  str(args.grid), "--vocab", str(args.vocab), "--batch-size", str(args.batch_size), "--steps",
                  str(args.steps), "--device", args.device, "--precision", args.precision]
        if act_ckpt:
            common.append("--activation-checkpointing")
        if lora:
            common += ["--lora", str(lora)]
        script = os.path.abspath(__file__)
        if strategy == "single":
            cmd = [sys.executable, script, *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   script, *common]
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        ranks = [json.load(open(os.path.join(tmp, name))) for name in sorted(os.listdir(tmp)) if name.startswith("rank")]
    keys = ("peak_mib", "peak_rss_growth_mib", "param_mib", "optimizer_state_mib")
    worst = {k: max(r[k] for r in ranks) for k in keys if k in ranks[0]}
    return {**worst, "world_size": ranks[0]["world_size"], "params": ranks[0]["params"],
            "trainable_params": ranks[0]["trainable_params"],
            "final_loss_rank0": ranks[0]["final_loss"], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--preset", default="S", help="a preset or LAYERSxWIDTHxHEADS")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2, help="processes for the distributed strategies")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lora-ranks", nargs="*", type=int, default=[],
                   help="also run single-process arms with LoRA adapters of these ranks (only adapters train)")
    p.add_argument("--out", default=None)
    p.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    runs = {}
    for strategy in args.strategies:
        for act_ckpt in (False, True):
            runs[f"{strategy}{'+act_ckpt' if act_ckpt else ''}"] = run_one(args, strategy, act_ckpt)
    for rank in args.lora_ranks:
        runs[f"single+lora{rank}"] = run_one(args, "single", False, rank)
    result = {"benchmark": "memory", "date": time.strftime("%Y-%m-%d"), "device": args.device,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "preset": args.preset, "grid": args.grid,
              "batch_per_rank": args.batch_size, "nproc": args.nproc, "precision": args.precision,
              "peak_is": ("cuda max_memory_allocated" if args.device != "cpu"
                else "max live bytes of the CPU allocator (torch.profiler memory events), from model build on"),
              "runs": runs}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
