"""The CPU/GPU fast path of cached generation: one token per step through the trunk, in eval mode.

At batch 1 a step is a matrix-vector product per weight matrix, so it is bound by reading the weights, and the
Python and mask overhead around them is worth trimming. `decode_token` is the same math as `gr.model.gpt.Block`,
unrolled into functional calls on (B, C) rows with the weights prepared once per KV cache; `GPTTrunk.forward` sends
single-token cached calls here, and tests check it against the blocks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from gr.model.gpt import Block, GPTTrunk, KVCache


def decode_token(trunk: "GPTTrunk", x: torch.Tensor, cache: "KVCache") -> torch.Tensor:
    """One cached generation step (eval mode): x (B, 1, C) -> (B, 1, C), `cache.length` advances by 1.

    The same math as the blocks, unrolled into functional calls on (B, C) rows (dropout is the identity in eval),
    with the weights prepared once per cache (`StepLinear`). A query at the newest position may attend to every
    cached key, so the causal mask reduces to key validity: one additive bias over the whole cache, made once and
    sliced per step, shared by all layers (SDPA would turn a boolean mask into the same bias per layer).
    """
    b, _, c = x.shape
    past, nh = cache.length, trunk.cfg.num_heads
    s, hs = past + 1, c // nh
    if cache.decode_layers is None:
        cache.decode_layers = [_DecodeLayer.of(blk) for blk in trunk.blocks]
    if cache.decode_bias is None:  # remade only when a multi-token call writes key validity
        cache.decode_bias = torch.zeros(cache.key_valid.shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~cache.key_valid, float("-inf"))[:, None, None]
    bias = cache.decode_bias.narrow(3, 0, s)
    x = x.view(b, c)
    with _onednn_off(x.device.type == "cpu" and x.dtype == torch.float32):
        # narrow/select rather than [] indexing: a step is short enough for Python's indexing to show (~1.5%)
        for layer, kv, keys, values in zip(cache.decode_layers, cache.kv, cache.k, cache.v):
            qkv = layer.qkv(F.layer_norm(x, (c,), *layer.ln_1)).reshape(b, 3, nh, 1, hs)
            kv.narrow(3, past, 1).copy_(qkv.narrow(1, 1, 2))  # keys and values in one copy
            y = F.scaled_dot_product_attention(qkv.select(1, 0), keys.narrow(2, 0, s), values.narrow(2, 0, s),
                                               attn_mask=bias)
            x = x + layer.proj(y.view(b, c))
            x = x + layer.fc_out(F.gelu(layer.fc(F.layer_norm(x, (c,), *layer.ln_2))))
    cache.length = s
    return F.layer_norm(x, (c,), trunk.ln_f.weight, trunk.ln_f.bias, trunk.ln_f.eps).view(b, 1, c)


class StepLinear:
    """`nn.Linear` for the few rows of a decode step: (B, in) -> (B, out), possibly non-contiguous.

    On the CPU a decode step is a matrix-vector product per layer, bound by reading the weight, and MKL runs a
    single-row `F.linear` on one thread (13-20 GB/s at preset S on 2 AVX2 cores). Viewing the (out, in) weight as k
    row blocks (k, out/k, in), a free view, makes it one batched product that MKL spreads over k threads (24-27 GB/s;
    3x `F.linear` at batch 4). k is the largest divisor of `out` up to the intra-op thread count. The result equals
    `F.linear` up to float summation order. Build one per generation call (the trunk keeps its layers' in the KV
    cache, `GRModel.generate_future_frame` one for the frame head), so steps do not pay for the views; elsewhere
    (k = 1, e.g. on a GPU) it is `F.linear`. Meant for no-grad generation.
    """

    __slots__ = ("weight", "bias", "blocks", "bias_blocks", "k")

    def __init__(self, lin: nn.Linear):
        from gr.model.lora import effective_weight  # LoRA adapters fold in here (no-grad generation)

        self.weight, self.bias = effective_weight(lin), lin.bias
        out_f, in_f = self.weight.shape
        # Measured for fp32 on the CPU; the block view needs a contiguous weight. bf16 keeps oneDNN's F.linear.
        blocked = (self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
                   and self.weight.is_contiguous())
        self.k = _row_blocks(out_f, torch.get_num_threads()) if blocked else 1
        self.blocks = self.weight.view(self.k, out_f // self.k, in_f)
        self.bias_blocks = None if lin.bias is None else lin.bias.view(self.k, out_f // self.k, 1)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return F.linear(h, self.weight, self.bias)
        b, in_f = h.shape
        cols = h.t().expand(self.k, in_f, b)  # (k, in, B): the same rows for every block
        y = (torch.bmm(self.blocks, cols) if self.bias_blocks is None
             else torch.baddbmm(self.bias_blocks, self.blocks, cols))  # (k, out/k, B)
        # (B, out). At B = 1 a plain view: a transposed one would have unit strides in both dims, which BLAS cannot
        # take as a matrix, so a later product on it would fall back to a slow path (4x slower, measured).
        return y.view(1, -1) if b == 1 else y.view(-1, b).t()


@dataclass
class _DecodeLayer:
    """One block's parameters, prepared for `decode_token`."""

    ln_1: tuple
    qkv: StepLinear
    proj: StepLinear
    ln_2: tuple
    fc: StepLinear
    fc_out: StepLinear

    @classmethod
    def of(cls, blk: Block) -> "_DecodeLayer":
        return cls((blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps), StepLinear(blk.attn.qkv),
                   StepLinear(blk.attn.proj), (blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps),
                   StepLinear(blk.mlp.fc), StepLinear(blk.mlp.proj))


@functools.lru_cache(maxsize=None)
def _row_blocks(out_features: int, threads: int) -> int:
    """How many row blocks `StepLinear` splits a weight into: the largest divisor of out_features that is at most
    the intra-op thread count (1 = a plain `F.linear`)."""
    return next(k for k in range(min(threads, out_features), 0, -1) if out_features % k == 0)


_onednn_lock = threading.Lock()
_onednn_users = 0
_onednn_saved = True


@contextlib.contextmanager
def _onednn_off(active: bool):
    """oneDNN off while fp32 CPU decode steps run.

    oneDNN's GELU costs a fixed ~8 us per call more than ATen's own kernel, which is much of a single-row GELU: with
    oneDNN off, a preset-S step ran 0.3-0.5 ms (5-7%) faster (interleaved A/B). The flag is process-wide, so steps
    running in several threads share one switch: the first to enter turns it off, the last to leave restores the
    user's setting. Other threads' CPU ops meanwhile pick ATen kernels instead of oneDNN ones (speed only). bf16 keeps
    oneDNN: its matrix products need it.
    """
    global _onednn_users, _onednn_saved
    if not active:
        yield
        return
    with _onednn_lock:
        if _onednn_users == 0:
            _onednn_saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _onednn_users += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users -= 1
            if _onednn_users == 0:
                torch.backends.mkldnn.enabled = _onednn_saved
