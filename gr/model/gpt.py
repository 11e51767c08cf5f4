"""Causal GPT trunk with a preallocated KV cache.

Legend: B batch, T tokens in this call, S cached + new tokens, C width, nh heads, hs head size.
Attention is torch `scaled_dot_product_attention`, or xformers' memory-efficient attention when asked for and
installed. Masks are boolean, True = may attend.

Cached single-token generation steps in eval mode go to `gr.model.decode.decode_token`, a leaner copy of the block
math kept out of this file so that the trunk reads as a plain GPT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gr.config import TrunkConfig
from gr.model.decode import decode_token


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
            return decode_token(self, x, cache)
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
