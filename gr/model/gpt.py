"""Causal GPT trunk with a preallocated KV cache.

Legend: B batch, T tokens in this call, S cached + new tokens, C width, nh heads, hs head size.
Attention is torch `scaled_dot_product_attention`, or xformers' memory-efficient attention when asked for and
installed. Masks are boolean, True = may attend.

Cached generation runs one token per step through `GPTTrunk._decode_token`, a leaner copy of the block math: at
batch 1 a step is a matrix-vector product per weight matrix, so it is bound by reading the weights, and the Python
and mask overhead around them is worth trimming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gr.config import TrunkConfig


@dataclass
class KVCache:
    """Per-layer keys/values, preallocated for `max_len` tokens. `length` tokens are filled."""

    k: list[torch.Tensor]  # per layer (B, nh, max_len, hs)
    v: list[torch.Tensor]
    key_valid: torch.Tensor  # (B, max_len) bool: False for padding keys (e.g. unused text tokens)
    length: int = 0
    step_weights: dict = field(default_factory=dict)  # id(weight) -> (in, out) copy for decode steps on the CPU

    @classmethod
    def empty(cls, cfg: TrunkConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        hs = cfg.width // cfg.num_heads
        shape = (batch, cfg.num_heads, max_len, hs)
        ks = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        vs = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        return cls(ks, vs, torch.ones(batch, max_len, dtype=torch.bool, device=device))


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
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k, v = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]  # (B, nh, S, hs)
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
            num_outputs: return only the last k positions (B, k, C). The last block then runs its queries, output
                projection and MLP for those rows only: the rest feed nothing downstream (no cache).
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
            all_valid = cache.key_valid[:, :past + t]
        else:
            all_valid = key_valid
        mask = None  # None -> SDPA's is_causal fast path
        if past > 0 or all_valid is not None:
            # Built without inspecting the values: a `.all()` check here would be a host sync on every forward.
            kv = all_valid if all_valid is not None else torch.ones(b, past + t, dtype=torch.bool, device=x.device)
            mask = attention_mask(kv, t, past)
        last, q_from, last_mask = len(self.blocks) - 1, 0, mask
        if num_outputs is not None and cache is None and 0 < num_outputs < t:
            q_from = t - num_outputs
            last_mask = (mask[:, :, q_from:] if mask is not None
                         else attention_mask(torch.ones(b, t, dtype=torch.bool, device=x.device), num_outputs, q_from))
        for i, block in enumerate(self.blocks):
            m, qf = (last_mask, q_from) if i == last else (mask, 0)
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, m, None, i, qf, use_reentrant=False)
            else:
                x = block(x, m, cache, i, qf)
        if num_outputs is not None and x.shape[1] > num_outputs:
            x = x[:, -num_outputs:]  # with a cache every row was computed (all keys and values are needed)
        if cache is not None:
            cache.length = past + t
        return self.ln_f(x)

    def _decode_token(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One cached generation step (eval mode): x (B, 1, C) -> (B, 1, C), `cache.length` advances by 1.

        The same math as the blocks, unrolled into functional calls (dropout is the identity in eval). A query at the
        newest position may attend to every cached key, so the causal mask reduces to key validity: one (B, 1, 1, S)
        additive bias per step, shared by all layers (SDPA would turn a boolean mask into the same bias per layer).
        """
        b, _, c = x.shape
        past, nh = cache.length, self.cfg.num_heads
        s, hs = past + 1, c // nh
        bias = torch.zeros(b, 1, 1, s, dtype=x.dtype, device=x.device).masked_fill_(
            ~cache.key_valid[:, None, None, :s], float("-inf"))
        for i, blk in enumerate(self.blocks):
            attn, mlp = blk.attn, blk.mlp
            h = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            q, k, v = _step_linear(h, attn.qkv, cache).view(b, 3, nh, 1, hs).unbind(1)  # (B, nh, 1, hs)
            cache.k[i][:, :, past:s] = k
            cache.v[i][:, :, past:s] = v
            y = F.scaled_dot_product_attention(q, cache.k[i][:, :, :s], cache.v[i][:, :, :s], attn_mask=bias)
            x = x + _step_linear(y.view(b, 1, c), attn.proj, cache)
            h = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            x = x + _step_linear(F.gelu(_step_linear(h, mlp.fc, cache)), mlp.proj, cache)
        cache.length = s
        return F.layer_norm(x, (c,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)


def _step_linear(x: torch.Tensor, lin: nn.Linear, cache: KVCache) -> torch.Tensor:
    """`lin(x)` for the few rows of a decode step: (B, 1, in) -> (B, 1, out).

    On the CPU, a wide layer (out > in: qkv, MLP fc) reads its weight as a contiguous (in, out) copy: MKL's
    matrix-vector product streams that layout about 1.5x faster than nn.Linear's (out, in) on AVX2 (measured at
    preset S; square and narrowing layers gain nothing, so they keep the original). The copies live in the cache,
    i.e. for one generation call, during which the weights cannot change.
    """
    w = lin.weight
    if x.device.type != "cpu" or w.shape[0] <= w.shape[1]:
        return F.linear(x, w, lin.bias)
    wt = cache.step_weights.get(id(w))
    if wt is None:
        wt = cache.step_weights[id(w)] = w.detach().t().contiguous()
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, wt) if lin.bias is None else torch.addmm(lin.bias, flat, wt)
    return out.view(*x.shape[:-1], -1)
