"""The GR model: CLIP text tokens + VQGAN frame tokens -> GPT trunk -> future-frame token logits.

Token layout of one causal sequence (pretraining; DESIGN.md):

    [text_0 .. text_{L-1}]                       projected CLIP token features (+ text position), padding masked
    [o_{t-h+1}: h*w codes] ... [o_t: h*w codes]  code + spatial + time(slot) embeddings, one block per history frame
    [BOS, f_0, .., f_{n-2}]                       the future frame o_{t+offset}, shifted right (teacher forcing);
                                                  output at future slot j predicts f_j

Legend: B batch, L text tokens, Th history frames, h/w code grid, n = h*w, C width, V codebook size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gr.config import GRModelConfig
from gr.model.gpt import GPTTrunk, KVCache


class GRModel(nn.Module):
    """GPT over text + frame tokens with a future-frame head.

    Args:
        cfg: GRModelConfig (trunk, clip spec, text token budget).
        codebook_size: V, from the image tokenizer.
        grid_size: code grid side (h = w), from the image tokenizer and `cfg.clip.image_size`.
        text_dim: feature size of the text encoder's tokens.
    """

    def __init__(self, cfg: GRModelConfig, codebook_size: int, grid_size: int, text_dim: int):
        super().__init__()
        self.cfg = cfg
        c = cfg.trunk.width
        self.codebook_size = codebook_size
        self.grid_size = grid_size
        self.tokens_per_frame = grid_size * grid_size
        self.num_history = cfg.clip.num_history
        self.text_proj = nn.Linear(text_dim, c)
        self.text_pos_emb = nn.Embedding(cfg.max_text_tokens, c)
        self.code_emb = nn.Embedding(codebook_size + 1, c)  # last index = BOS of the future frame
        self.spatial_emb = nn.Embedding(self.tokens_per_frame, c)
        self.time_emb = nn.Embedding(self.num_history + 1, c)  # history slots, then the future slot
        self.trunk = GPTTrunk(cfg.trunk)
        self.frame_head = nn.Linear(c, codebook_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") and "trunk" in name:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.trunk.num_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def bos_index(self) -> int:
        return self.codebook_size

    @property
    def future_slot(self) -> int:
        return self.num_history

    def embed_text(self, text_feats: torch.Tensor, text_mask: torch.Tensor):
        """(B, L, Dt), (B, L) -> tokens (B, L', C), valid (B, L') with L' = min(L, max_text_tokens)."""
        n = min(text_feats.shape[1], self.cfg.max_text_tokens)
        pos = torch.arange(n, device=text_feats.device)
        return self.text_proj(text_feats[:, :n]) + self.text_pos_emb(pos), text_mask[:, :n]

    def embed_frame(self, codes: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        """codes (B, k) at spatial positions start..start+k-1 of time slot `slot` -> (B, k, C)."""
        pos = torch.arange(start, start + codes.shape[1], device=codes.device)
        return self.code_emb(codes) + self.spatial_emb(pos) + self.time_emb.weight[slot]

    def embed_prefix(self, text_feats, text_mask, history_codes):
        """Text + history frames -> (B, P, C) embeddings and (B, P) key validity."""
        b, th = history_codes.shape[:2]
        if th != self.num_history:
            raise ValueError(f"history_codes has {th} frames, model.clip.num_history is {self.num_history}")
        if tuple(history_codes.shape[2:]) != (self.grid_size, self.grid_size):
            raise ValueError(f"history_codes grid {tuple(history_codes.shape[2:])} != model grid {self.grid_size}")
        text, valid = self.embed_text(text_feats, text_mask)
        frames = [self.embed_frame(history_codes[:, i].reshape(b, -1), i) for i in range(th)]
        x = torch.cat([text, *frames], dim=1)
        valid = torch.cat([valid, valid.new_ones(b, th * self.tokens_per_frame)], dim=1)
        return x, valid

    def shifted_future(self, future_codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, n) inputs of the future slots: [BOS, f_0, .., f_{n-2}]."""
        flat = future_codes.reshape(future_codes.shape[0], -1)
        bos = flat.new_full((flat.shape[0], 1), self.bos_index)
        return torch.cat([bos, flat[:, :-1]], dim=1)

    def forward(self, text_feats, text_mask, history_codes, future_codes) -> torch.Tensor:
        """Teacher-forced logits for every future-frame token: (B, n, V)."""
        prefix, valid = self.embed_prefix(text_feats, text_mask, history_codes)
        fut = self.embed_frame(self.shifted_future(future_codes), self.future_slot)
        x = torch.cat([prefix, fut], dim=1)
        valid = torch.cat([valid, valid.new_ones(fut.shape[:2])], dim=1)
        h = self.trunk(x, valid)
        return self.frame_head(h[:, -self.tokens_per_frame:])

    def new_cache(self, batch: int, device, dtype=None) -> KVCache:
        max_len = self.cfg.max_text_tokens + (self.num_history + 1) * self.tokens_per_frame
        dtype = dtype or self.code_emb.weight.dtype
        return KVCache.empty(self.cfg.trunk, batch, max_len, device, dtype)

    @torch.no_grad()
    def generate_future_frame(self, text_feats, text_mask, history_codes, temperature: float = 0.0,
                              top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                              use_cache: bool = True) -> torch.Tensor:
        """Autoregressively sample the future frame's codes (B, h, w). temperature 0 = greedy.

        With `use_cache` the prefix is run once and each new token costs one single-token step; without it the whole
        sequence is recomputed for every token (the reference the cache must match).
        """
        b = history_codes.shape[0]
        prefix, valid = self.embed_prefix(text_feats, text_mask, history_codes)
        out = history_codes.new_empty(b, self.tokens_per_frame)
        cache = self.new_cache(b, prefix.device, prefix.dtype) if use_cache else None
        bos = self.embed_frame(out.new_full((b, 1), self.bos_index), self.future_slot)
        step_in = torch.cat([prefix, bos], dim=1)  # first cached step: prefix + BOS -> predicts f_0
        step_valid = torch.cat([valid, valid.new_ones(b, 1)], dim=1)
        n = self.tokens_per_frame
        for j in range(n):
            if use_cache:
                h = self.trunk(step_in, step_valid, cache)[:, -1]
                step_valid = None
            else:
                fut = self.embed_frame(self.shifted_future(_pad_codes(out, j, self.grid_size))[:, : j + 1],
                                       self.future_slot)
                x = torch.cat([prefix, fut], dim=1)
                h = self.trunk(x, torch.cat([valid, valid.new_ones(b, j + 1)], dim=1))[:, -1]
            out[:, j] = _sample(self.frame_head(h), temperature, top_k, generator)
            if use_cache and j + 1 < n:
                step_in = self.embed_frame(out[:, j:j + 1], self.future_slot, start=j + 1)
        return out.reshape(b, self.grid_size, self.grid_size)


def _pad_codes(out: torch.Tensor, filled: int, grid: int) -> torch.Tensor:
    """The first `filled` generated codes, zero-padded to a full (B, h, w) grid (the tail is never read)."""
    full = torch.zeros_like(out)
    full[:, :filled] = out[:, :filled]
    return full.reshape(out.shape[0], grid, grid)


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    """logits (B, V) -> (B,) codes. Greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
