"""Causal GPT trunk with a preallocated KV cache.

Legend: B batch, T tokens in this call, S cached + new tokens, C width, nh heads, hs head size.
Attention is torch `scaled_dot_product_attention`, or xformers' memory-efficient attention when asked for and
installed. Masks are boolean, True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], cache: Optional[KVCache], layer: int):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
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
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

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
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block. Distributed wrapping and activation-checkpoint policies name this class."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPTTrunk(nn.Module):
    """A stack of causal blocks plus the final LayerNorm. Input and output: (B, T, C)."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """Run the blocks.

        Args:
            x: (B, T, C) embeddings of the new tokens.
            key_valid: (B, T) bool for these tokens; None = all valid. With a cache it is written into the cache.
            cache: KVCache to read and extend; `cache.length` advances by T.
        """
        b, t, _ = x.shape
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
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, None, i, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.length = past + t
        return self.ln_f(x)
