"""Causal GPT trunk with a preallocated KV cache.

Legend: B batch, T tokens in this call, S cached + new tokens, C width, nh heads, hs head size.
Attention is torch `scaled_dot_product_attention`, or xformers' memory-efficient attention when asked for and
installed. Masks are boolean, True = may attend.

Cached generation runs one token per step through `GPTTrunk._decode_token`, a leaner copy of the block math: at
batch 1 a step is a matrix-vector product per weight matrix, so it is bound by reading the weights, and the Python
and mask overhead around them is worth trimming.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gr.config import TrunkConfig


@dataclass
class KVCache:
    """Per-layer keys/values, preallocated for `max_len` tokens. `length` tokens are filled.

    Layer i's keys and values are the two halves of one (B, 2, nh, max_len, hs) tensor `kv[i]`, so a decode step
    writes both with one copy; `k[i]` and `v[i]` (not dataclass fields) are views of those halves, made once.
    Decode steps also keep prepared weight views and a key-validity bias here: a cache serves one generation call,
    with the model's weights and `key_valid` changed only through the trunk.
    """

    kv: list[torch.Tensor]  # per layer (B, 2, nh, max_len, hs): keys, values
    key_valid: torch.Tensor  # (B, max_len) bool: False for padding keys (e.g. unused text tokens)
    length: int = 0
    decode_layers: Optional[list] = None  # weights prepared for single-token steps, by the first one (one generation)
    decode_bias: Optional[torch.Tensor] = None  # (B, 1, 1, max_len) additive key-validity bias for decode steps

    def __post_init__(self):
        self.k = [kv.select(1, 0) for kv in self.kv]  # per layer (B, nh, max_len, hs) views
        self.v = [kv.select(1, 1) for kv in self.kv]

    @classmethod
    def empty(cls, cfg: TrunkConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        hs = cfg.width // cfg.num_heads
        shape = (batch, 2, cfg.num_heads, max_len, hs)
        kv = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        return cls(kv, torch.ones(batch, max_len, dtype=torch.bool, device=device))


def attention_mask(key_valid: torch.Tensor, q_len: int, past: int) -> torch.Tensor:
    """(B, S) key validity -> (B, 1, q_len, S) causal mask for queries at positions past..past+q_len-1."""
    s = key_valid.shape[1]
    q_pos = torch.arange(past, past + q_len, device=key_valid.device)
    causal = torch.arange(s, device=key_valid.device)[None, :] <= q_pos[:, None]  # (q_len, S)
    return causal[None, None] & key_valid[:, None, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout
        self.use_xformers = cfg.attention == "xformers"
        if self.use_xformers:
            try:
                import xformers.ops  # noqa: F401
            except ImportError as exc:
                raise ValueError("trunk.attention: 'xformers' was asked for but xformers is not installed") from exc

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], cache: Optional[KVCache], layer: int,
                q_from: int = 0):
        """x (B, T, C) -> (B, T - q_from, C): keys and values from every position, queries from q_from on (the mask,
        when given, already has only those query rows)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        q = q[:, :, q_from:]
        if cache is not None:
            start, kv = cache.length, cache.kv[layer]
            kv[:, 0, :, start:start + t] = k
            kv[:, 1, :, start:start + t] = v
            k, v = kv[:, 0, :, :start + t], kv[:, 1, :, :start + t]  # (B, nh, S, hs)
        p = self.dropout if self.training else 0.0
        if self.use_xformers and x.is_cuda:
            y = self._xformers(q, k, v, mask, p)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t - q_from, c))

    @staticmethod
    def _xformers(q, k, v, mask, p):
        import xformers.ops as xops

        if mask is None:
            bias = xops.LowerTriangularMask()
        else:  # additive float bias, padded to a multiple of 8 as xformers requires
            s = k.shape[2]
            pad = (-s) % 8
            bias = torch.zeros(*mask.shape[:-1], s + pad, dtype=q.dtype, device=q.device)
            bias[..., :s].masked_fill_(~mask, float("-inf"))
            bias = bias[..., :s].expand(q.shape[0], q.shape[1], q.shape[2], s)
        y = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=p)
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.width)
        self.fc = nn.Linear(cfg.width, hidden)
        self.proj = nn.Linear(hidden, cfg.width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block. Distributed wrapping and activation-checkpoint policies name this class."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None, layer: int = 0,
                q_from: int = 0):
        """(B, T, C) -> (B, T - q_from, C): positions before q_from serve only as keys and values."""
        x = x[:, q_from:] + self.drop(self.attn(self.ln_1(x), mask, cache, layer, q_from))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPTTrunk(nn.Module):
    """A stack of causal blocks plus the final LayerNorm. Input and output: (B, T, C)."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, num_outputs: Optional[int] = None) -> torch.Tensor:
        """Run the blocks.

        Args:
            x: (B, T, C) embeddings of the new tokens.
            key_valid: (B, T) bool for these tokens; None = all valid. With a cache it is written into the cache.
            cache: KVCache to read and extend; `cache.length` advances by T.
            num_outputs: return only the last k positions (B, k, C) (all T when k >= T). The last block then runs
                its queries, output projection and MLP for those rows only: the rest feed nothing downstream. With a
                cache, the last block still writes every row's keys and values.
        Returns:
            (B, T, C), or (B, num_outputs, C).
        """
        b, t, _ = x.shape
        if (cache is not None and t == 1 and key_valid is None and not self.training
                and not (self.cfg.attention == "xformers" and x.is_cuda)):
            return self._decode_token(x, cache)
        past = cache.length if cache is not None else 0
        if cache is not None:
            if key_valid is not None:
                cache.key_valid[:, past:past + t] = key_valid
                cache.decode_bias = None
            all_valid = cache.key_valid[:, :past + t]
        else:
            all_valid = key_valid
        mask = None  # None -> SDPA's is_causal fast path
        if past > 0 or all_valid is not None:
            # Built without inspecting the values: a `.all()` check here would be a host sync on every forward.
            kv = all_valid if all_valid is not None else torch.ones(b, past + t, dtype=torch.bool, device=x.device)
            mask = attention_mask(kv, t, past)
        last, q_from, last_mask = len(self.blocks) - 1, 0, mask
        if num_outputs is not None and 0 < num_outputs < t:
            q_from = t - num_outputs
            last_mask = (mask[:, :, q_from:] if mask is not None
                         else attention_mask(torch.ones(b, t, dtype=torch.bool, device=x.device), num_outputs, q_from))
        for i, block in enumerate(self.blocks):
            m, qf = (last_mask, q_from) if i == last else (mask, 0)
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, m, None, i, qf, use_reentrant=False)
            else:
                x = block(x, m, cache, i, qf)
        if cache is not None:
            cache.length = past + t
        return self.ln_f(x)

    def _decode_token(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One cached generation step (eval mode): x (B, 1, C) -> (B, 1, C), `cache.length` advances by 1.

        The same math as the blocks, unrolled into functional calls on (B, C) rows (dropout is the identity in eval),
        with the weights prepared once per cache (`StepLinear`). A query at the newest position may attend to every
        cached key, so the causal mask reduces to key validity: one additive bias over the whole cache, made once and
        sliced per step, shared by all layers (SDPA would turn a boolean mask into the same bias per layer).
        """
        b, _, c = x.shape
        past, nh = cache.length, self.cfg.num_heads
        s, hs = past + 1, c // nh
        if cache.decode_layers is None:
            cache.decode_layers = [_DecodeLayer.of(blk) for blk in self.blocks]
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
        return F.layer_norm(x, (c,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps).view(b, 1, c)


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
        self.weight, self.bias = lin.weight, lin.bias
        out_f, in_f = lin.weight.shape
        # Measured for fp32 on the CPU; the block view needs a contiguous weight. bf16 keeps oneDNN's F.linear.
        blocked = (lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32
                   and lin.weight.is_contiguous())
        self.k = _row_blocks(out_f, torch.get_num_threads()) if blocked else 1
        self.blocks = lin.weight.view(self.k, out_f // self.k, in_f)
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
    """One block's parameters, prepared for `GPTTrunk._decode_token`."""

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
