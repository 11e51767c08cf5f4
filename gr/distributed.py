"""Scale-out helpers: FSDP2 sharding, per-block torch.compile and DeepSpeed configs, applied to an unchanged model.

The model code (gr/model) imports none of this; the wrapping and compile policies name its block class,
`gr.model.gpt.Block`. Activation checkpointing is a trunk flag (`model.trunk.activation_checkpointing`): it uses only
`torch.utils.checkpoint`, so it works the same under DDP, FSDP2 and DeepSpeed.

Strategies are chosen in YAML (configs/strategy/*.yaml):
- `ddp`: Lightning's DDPStrategy, every rank holds the whole model;
- `fsdp2`: `FSDP2Strategy` below, Lightning's ModelParallelStrategy restricted to data parallel FSDP2 (`fully_shard`
  per block, then per trainable model); it also runs on CPU processes (gloo), so CI trains with it;
- `deepspeed_stage_2`/`_3` (+ `_offload`): Lightning's DeepSpeedStrategy (CUDA only in Lightning). `deepspeed_config`
  builds the same ZeRO configs for raw `deepspeed.initialize` (used by the CPU tests and the memory benchmark).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from gr.model.heads import ActionHead
from gr.model.gpt import Block

log = logging.getLogger(__name__)

BLOCK_CLASS = Block  # the unit of FSDP wrapping, activation checkpointing and compilation
# Sharded as units of their own besides the blocks: modules that the training code calls outside GRModel.forward
# (the action head runs on the readouts after the trunk), so they gather their own weights (its `losses` and
# `predict` both run through its forward).
EXTRA_WRAP_CLASSES = (ActionHead,)
# GRModel methods that read the root's weights without going through forward (validation's action path).
FSDP_FORWARD_METHODS = ("readout_features",)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block inside `module`, in registration order."""
    return [m for m in module.modules() if isinstance(m, BLOCK_CLASS)]


def trainable_children(module: nn.Module) -> list[nn.Module]:
    """Direct children of `module` that hold trainable parameters (the frozen encoders are left out)."""
    return [child for child in module.children() if any(p.requires_grad for p in child.parameters())]


def apply_fsdp2(module: nn.Module, mesh, reshard_after_forward: bool = True,
                mp_policy: Optional[Any] = None) -> list[nn.Module]:
    """Shard the trainable part of a LightningModule with FSDP2: each block and action head, then each trainable child.

    Frozen encoders (no trainable parameters) stay replicated: they are small next to the trunk, run under no_grad
    and are never checkpointed, so sharding them would only add an all-gather to every step. A trainable child's own
    weights (embeddings, heads) stay gathered from its forward to the backward (FSDP2's root default), so code that
    uses them right after forward works; `readout_features` is registered as a forward method for the same reason.
    Already-sharded modules are left as they are (Lightning may set up twice: fit, then validate).

    Args:
        module: the LightningModule (or any container of the GR model).
        mesh: a 1-D data-parallel DeviceMesh.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3-like memory) or keep
            them until backward (ZeRO-2-like speed).
        mp_policy: optional `torch.distributed.fsdp.MixedPrecisionPolicy`.
    Returns:
        The modules that were sharded as roots (one per trainable child).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    roots = trainable_children(module)
    if not roots:
        raise ValueError("FSDP2: the module has no trainable parameters to shard")
    for root in roots:
        if isinstance(root, FSDPModule):
            continue
        for unit in [m for m in root.modules() if isinstance(m, (BLOCK_CLASS, *EXTRA_WRAP_CLASSES))]:
            fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(root, **kwargs)
        for name in FSDP_FORWARD_METHODS:
            if hasattr(root, name):
                register_fsdp_forward_method(root, name)
    return roots


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data-parallel FSDP2: data_parallel_size = world size, no tensor
    parallelism, and the sharding applied here (the LightningModule only compiles in `configure_model`).

    The stock strategy's "auto" sizes mean data parallel across nodes and tensor parallel within a node, which a GPT
    without tensor-parallel plans cannot use; this class fixes the mesh instead of asking every config for numbers.

    Args:
        reshard_after_forward: see `apply_fsdp2` (True for the largest presets, False trades memory for speed).
        save_distributed_checkpoint: True writes a sharded checkpoint folder (torch.distributed.checkpoint); False
            gathers one full .ckpt on rank 0, which `gr rollout`, `GRPolicy` and `init_from` read directly.
        process_group_backend: None = nccl on GPUs, gloo on CPUs.
        timeout: collective timeout.
    """

    def __init__(self, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = False,
                 bf16_gather: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = timedelta(minutes=30)):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.reshard_after_forward = reshard_after_forward
        self.bf16_gather = bf16_gather

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def mp_policy(self):
        """Under bf16-mixed: gather parameters in bf16 and reduce gradients in fp32 (half the all-gather traffic; the
        fp32 shards stay the master weights). None otherwise."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(getattr(self.precision_plugin, "precision", ""))
        if self.bf16_gather and precision.startswith("bf16"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return None

    def setup(self, trainer) -> None:
        roots = apply_fsdp2(self.lightning_module, self.device_mesh["data_parallel"], self.reshard_after_forward,
                            self.mp_policy())
        log.info("FSDP2: sharded %d blocks in %s over %d ranks", sum(len(transformer_blocks(r)) for r in roots),
                 [type(r).__name__ for r in roots], self.world_size)
        super().setup(trainer)


def apply_compile(module: nn.Module, mode: Optional[str] = None, backend: str = "inductor") -> int:
    """Compile each transformer block's training forward in place (torchtitan-style per-block compile).

    Per-block compilation keeps parameter names unchanged (checkpoints stay interchangeable) and composes with FSDP2
    and activation checkpointing. Calls with a KV cache (generation: one token at a time, growing lengths) stay eager,
    so rollouts during validation never trigger recompilation.

    Args:
        module: any module containing transformer blocks.
        mode: torch.compile mode (None = default; "max-autotune" for long GPU runs).
        backend: torch.compile backend ("inductor"; tests use "aot_eager" to skip C++ code generation).
    Returns:
        The number of blocks compiled.
    """
    blocks = transformer_blocks(module)
    for block in blocks:
        eager = block.forward
        compiled = torch.compile(eager, mode=mode, backend=backend, dynamic=False)

        def forward(x, mask=None, cache=None, layer=0, q_from=0, _eager=eager, _compiled=compiled):
            return (_eager if cache is not None else _compiled)(x, mask, cache, layer, q_from)

        block.forward = forward
    return len(blocks)


def sharding_kind(module: nn.Module) -> Optional[str]:
    """"fsdp2" when `module` holds FSDP2-sharded submodules, "zero3" when its parameters are ZeRO-3 partitions,
    else None (whole parameters on every rank: single device, DDP, ZeRO-1/2)."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return "fsdp2"
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return "zero3"
    return None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2-sharded module, on CPU, on rank 0 ({} on other ranks).

    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_deepspeed_offload(strategy) -> bool:
    """True when `strategy` is a DeepSpeed strategy that offloads optimizer states to the CPU."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = getattr(strategy, "config", None)
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(config, dict):
        return False
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def optimizer_class(strategy) -> type:
    """The AdamW implementation for a strategy: DeepSpeed's CPU Adam when states are offloaded (DeepSpeed refuses a
    plain torch optimizer with ZeRO-Offload), torch's AdamW otherwise."""
    if is_deepspeed_offload(strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW


class FrameLoss(nn.Module):
    """GRModel + the pretraining loss as one module returning the loss, for raw `deepspeed.initialize`.

    (text, text_mask, history, future) -> cross-entropy, as `PretrainModule._loss` minus the tokenizing. DeepSpeed gets
    this wrapper around the GR model, not the whole LightningModule: ZeRO-3 would otherwise partition the frozen
    encoders too, and the optimizer must not see them anyway. Parameter names ("model.*") match the LightningModule's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text, text_mask, history, future):
        from gr.training.pretrain import frame_cross_entropy

        return frame_cross_entropy(self.model(text, text_mask, history, future), future)


def deepspeed_config(stage: int, micro_batch_size: int, grad_accum: int = 1, world_size: int = 1,
                     offload_optimizer: bool = False, bf16: bool = False, grad_clip: float = 0.0,
                     bucket_size: float = 5e7) -> dict:
    """A ZeRO config for raw `deepspeed.initialize`, matching what configs/strategy/deepspeed_*.yaml ask Lightning for.

    Args:
        stage: ZeRO stage (0, 1, 2, 3).
        micro_batch_size: samples per rank per forward.
        grad_accum: micro-batches per optimizer step.
        world_size: data-parallel ranks (for the global batch size DeepSpeed checks).
        offload_optimizer: keep optimizer states (and the step) on the CPU.
        bf16: bf16 weights and activations with fp32 master weights.
        grad_clip: global gradient-norm clip (0 = off).
        bucket_size: elements per all-gather / reduce bucket (the YAMLs' value; DeepSpeed allocates whole buckets, so
            Lightning's 2e8 default would cost more than all gradients of presets S and B).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed stage: must be 0-3, got {stage!r}")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket_size, "allgather_bucket_size": bucket_size}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket_size, stage3_param_persistence_threshold=1e5)  # Lightning's
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch_size * grad_accum * world_size, "gradient_clipping": grad_clip,
            "zero_optimization": zero, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False}
