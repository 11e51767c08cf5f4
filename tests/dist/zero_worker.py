"""Train the tiny GR pretraining model for a few steps with raw `deepspeed.initialize` (ZeRO-2/3) or plain torch.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist/zero_worker.py --stage 3 --out r.json
    python tests/dist/zero_worker.py --reference --out ref.json   # one process, no DeepSpeed, full batch

Both take the same global batch per step (rank r takes the r-th slice), the same AdamW over
`gr.training.optim.param_groups` and the same global-norm clip, so their per-step losses and final weights must agree.
With `--save-dir` the engine also saves a ZeRO checkpoint folder, laid out as Lightning's DeepSpeedStrategy saves one
(tests/test_deepspeed.py exports it with `gr export`).
Rank 0 writes a JSON with the global losses, every trainable parameter after the last step and, per rank, how many
optimizer-state and parameter elements that rank holds (the evidence that ZeRO sharded anything).
Used by tests/test_deepspeed.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from gr.distributed import FrameLoss  # noqa: E402  (the encoders run up front, outside DeepSpeed)
from gr.training.optim import param_groups  # noqa: E402
from gr.training.pretrain import PretrainModule  # noqa: E402
from tests.conftest import module_init_args  # noqa: E402

LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.05, 1.0
CAPTIONS = ["push the red block", "open the drawer", "pick up the cup", "close the lid"]


def tokenized_batches(module: PretrainModule, steps: int, global_batch: int) -> list[tuple]:
    """Deterministic per-step global batches, tokenized by the frozen encoders: [(text, text_mask, history, future)].

    Each step's frames come from a generator seeded by the step, so every process builds the same batches without
    communicating. Random frames still give a learnable target: the random VQGAN's code histogram is far from uniform.
    """
    clip = module.clip_spec
    batches = []
    with torch.no_grad():
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 + step)
            frames = torch.randint(0, 256, (global_batch, clip.num_history + 1, clip.image_size, clip.image_size, 3),
                                   generator=g, dtype=torch.uint8)
            captions = [CAPTIONS[(step + i) % len(CAPTIONS)] for i in range(global_batch)]
            history, future, text, text_mask = module.tokenize({"frames": frames, "caption": captions})
            batches.append((text, text_mask, history, future))
    return batches


def build(seed: int):
    """The tiny pretraining module with seeded weights (identical in every process) and its loss wrapper."""
    torch.manual_seed(seed)
    module = PretrainModule(**module_init_args())
    module.eval()  # the encoders are frozen; the trunk has no dropout (trunk.dropout = 0), so train/eval agree
    return module, FrameLoss(module.model)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # A client torch optimizer: a DeepSpeed-config optimizer would JIT-compile C++ ops (minutes) on CPU.
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95))


def run_reference(args) -> dict:
    module, net = build(args.seed)
    batches = tokenized_batches(module, args.steps, args.global_batch)
    opt = optimizer(net.model)
    initial = {n: p.detach().flatten().tolist() for n, p in net.named_parameters()}
    losses = []
    for text, text_mask, history, future in batches:
        opt.zero_grad(set_to_none=True)
        loss = net(text, text_mask, history, future)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
    total = sum(p.numel() for p in net.parameters())
    return {"mode": "reference", "world_size": 1, "losses": losses, "total_numel": total,
            "params": {n: p.detach().flatten().tolist() for n, p in net.named_parameters()},
            "initial_params": initial,
            "ranks": [{"opt_state_numel": _opt_state_numel(opt), "resident_param_numel": total}]}


def _opt_state_numel(opt: torch.optim.Optimizer) -> int:
    """Elements of Adam's first moment held by this process (ZeRO gives the torch optimizer flat partitions)."""
    return sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)


def run_deepspeed(args) -> dict | None:
    # CPU tensors and gloo throughout, also on a machine with GPUs (DeepSpeed would otherwise move the model to CUDA).
    os.environ["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("RANK", "0") != "0":  # rank 0 speaks for both: same warnings, same model, same losses
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        sys.stdout = open(os.devnull, "w")  # prints from model code; errors still reach stderr
    # DeepSpeed calls all_gather_into_tensor / reduce_scatter_tensor, which torch deprecates: one warning per call.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    import deepspeed
    import torch.distributed as dist

    from gr.distributed import deepspeed_config

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # per-rank config dumps otherwise
    # On a CPU accelerator DeepSpeed's torch backend JIT-compiles a shared-memory C++ op (about 90 s on 2 cores, once
    # per machine) that only its inference all-reduce uses; training collectives go through gloo either way.
    # (`import deepspeed.comm.torch as m` would bind torch itself: deepspeed.comm has an attribute named torch.)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    micro = args.global_batch // world
    config = deepspeed_config(args.stage, micro_batch_size=micro, grad_accum=1, world_size=world,
                              offload_optimizer=False, bf16=False, grad_clip=GRAD_CLIP)
    if args.stage == 3 and args.persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold

    module, net = build(args.seed)
    batches = tokenized_batches(module, args.steps, args.global_batch)
    total = sum(p.numel() for p in net.parameters())
    names = [n for n, _ in net.named_parameters()]
    engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=optimizer(net.model), config=config)

    losses = []
    for text, text_mask, history, future in batches:
        mine = slice(rank * micro, (rank + 1) * micro)
        loss = engine(text[mine], text_mask[mine], history[mine], future[mine])
        engine.backward(loss)
        engine.step()
        # Equal-sized slices: the mean of the per-rank means is the global-batch mean the reference computes.
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if args.save_dir:
        # Lightning's DeepSpeedStrategy layout: tag "checkpoint", the rest of the Lightning checkpoint as client
        # state (hyper-parameters, step). Every rank writes its own partition.
        engine.save_checkpoint(args.save_dir, tag="checkpoint",
                               client_state={"hyper_parameters": dict(module.hparams), "global_step": args.steps,
                                             "epoch": 0})
    params = list(engine.module.parameters())
    mine = {"opt_state_numel": _opt_state_numel(getattr(opt, "optimizer", opt)),  # ZeRO wraps the torch optimizer
            # At rest, ZeRO-3 keeps only persistent (small) parameters materialized; the rest have .data of size 0.
            "resident_param_numel": sum(p.data.numel() for p in params),
            "partition_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
            "persistent_params": sum(bool(getattr(p, "ds_persist", False)) for p in params)}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    # Every rank must enter the gather (a collective); only rank 0 reads the full tensors.
    with deepspeed.zero.GatheredParameters(params, enabled=args.stage == 3):
        full = {n: p.detach().flatten().tolist() for n, p in zip(names, params)} if rank == 0 else None
    result = {"mode": f"zero{args.stage}", "stage": args.stage, "world_size": world, "losses": losses,
              "total_numel": total, "params": full, "ranks": ranks, "engine_stage": engine.zero_optimization_stage(),
              "optimizer": type(opt).__name__, "zero_optimization": config["zero_optimization"]}
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()
    return result if rank == 0 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--reference", action="store_true", help="one process, plain torch, the full batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--persistence-threshold", type=int, default=None,
                   help="ZeRO-3 only: override stage3_param_persistence_threshold (parameters with at most this many "
                        "elements stay gathered on every rank)")
    p.add_argument("--save-dir", default=None, help="DeepSpeed only: save a ZeRO checkpoint folder after the last step")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    result = run_reference(args) if args.reference else run_deepspeed(args)
    if result is not None:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
