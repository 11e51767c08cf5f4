"""The GR model: CLIP text tokens + VQGAN frame tokens (+ robot state) -> GPT trunk -> future frames (+ actions).

Token layout of one causal sequence (DESIGN.md). Pretraining uses one view, no state and no readouts; robot finetuning
adds them. Both go through the same code path.

    [text_0 .. text_{L-1}]                 projected CLIP token features (+ text position), padding masked
    for tau in 0 .. Th-1 (history steps):
        for v in views (sorted):  [o_tau^v: h*w codes]     code + spatial + time(tau) (+ view v) embeddings
        [s_tau]                                              robot only: state projection + time(tau)
    [r_0 .. r_{R-1}]                       robot only: ACT readouts -> action head (gr/model/heads/)
    for v in views:  [BOS, f_0, .., f_{n-2}]^v               future frame o_{t+offset}^v shifted right (teacher
                                                              forcing); output at future slot j predicts f_j^v
                                                              (+ last_frame_emb(o_t^v[j]) with `last_frame_input`)

Readouts sit before every future-frame token, so the causal mask keeps actions independent of the future frames, and
the action path needs only the prefix (`readout_features`).

Legend: B batch, L text tokens, Th history steps, Nv views, h/w code grid, n = h*w, C width, V codebook size,
S state dims, R readouts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gr.config import GRModelConfig
from gr.model.heads import build_action_head
from gr.model.decode import StepLinear
from gr.model.gpt import GPTTrunk, KVCache


class GRModel(nn.Module):
    """GPT over text + frame (+ state) tokens with a future-frame head (and, for robots, readouts + action head).

    Args:
        cfg: GRModelConfig (trunk, clip spec, text token budget, optional robot parts).
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
        self.robot = cfg.robot
        self.num_views = len(cfg.robot.view_names) if cfg.robot else 1
        self.text_proj = nn.Linear(text_dim, c)
        self.text_pos_emb = nn.Embedding(cfg.max_text_tokens, c)
        self.code_emb = nn.Embedding(codebook_size + 1, c)  # last index = BOS of a future frame
        self.spatial_emb = nn.Embedding(self.tokens_per_frame, c)
        self.time_emb = nn.Embedding(self.num_history + 1, c)  # history slots, then the future slot
        self.trunk = GPTTrunk(cfg.trunk)
        self.frame_head = nn.Linear(c, codebook_size, bias=False)
        # the copy path (cfg.last_frame_input): future slot j also sees the last history frame's code at j
        self.last_frame_emb = nn.Embedding(codebook_size, c) if cfg.last_frame_input else None
        if cfg.robot is not None:  # finetuning adds only these; everything above transfers from pretraining
            self.view_emb = nn.Embedding(self.num_views, c)
            self.state_proj = nn.Linear(cfg.robot.state_dim, c)
            self.readout_emb = nn.Embedding(cfg.robot.num_readouts, c)
            self.action_head = build_action_head(cfg.robot, c)
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

    @property
    def max_len(self) -> int:
        """Longest sequence: text + history (frames, state) + readouts + future frames."""
        per_step = self.num_views * self.tokens_per_frame + (1 if self.robot else 0)
        readouts = self.robot.num_readouts if self.robot else 0
        return (self.cfg.max_text_tokens + self.num_history * per_step + readouts
                + self.num_views * self.tokens_per_frame)

    # ---- embeddings ----
    def embed_text(self, text_feats: torch.Tensor, text_mask: torch.Tensor):
        """(B, L, Dt), (B, L) -> tokens (B, L', C), valid (B, L') with L' = min(L, max_text_tokens)."""
        n = min(text_feats.shape[1], self.cfg.max_text_tokens)
        pos = torch.arange(n, device=text_feats.device)
        return self.text_proj(text_feats[:, :n]) + self.text_pos_emb(pos), text_mask[:, :n]

    def embed_frame(self, codes: torch.Tensor, slot: int, start: int = 0, view: Optional[int] = None) -> torch.Tensor:
        """codes (B, k) at spatial positions start..start+k-1 of time slot `slot` (and camera `view`) -> (B, k, C)."""
        pos = torch.arange(start, start + codes.shape[1], device=codes.device)
        x = self.code_emb(codes) + self.spatial_emb(pos) + self.time_emb.weight[slot]
        return x + self.view_emb.weight[view] if view is not None else x

    def embed_future(self, codes: torch.Tensor, start: int, v: int, history: torch.Tensor) -> torch.Tensor:
        """Inputs of future slots start..start+k-1 of view v: codes (B, k), history (B, Th, Nv, h, w) -> (B, k, C)."""
        x = self.embed_frame(codes, self.future_slot, start=start, view=self._view(v))
        if self.last_frame_emb is None:
            return x
        last = history[:, -1, v].reshape(history.shape[0], -1)[:, start:start + codes.shape[1]]  # (B, k)
        return x + self.last_frame_emb(last)

    def _view(self, v: int) -> Optional[int]:
        return v if self.robot is not None else None

    def _check_history(self, history_codes: torch.Tensor, state: Optional[torch.Tensor]) -> torch.Tensor:
        """Validate shapes; return history as (B, Th, Nv, h, w)."""
        if self.robot is None:
            if history_codes.dim() != 4:
                raise ValueError(f"history_codes must be (B, Th, h, w), got {tuple(history_codes.shape)}")
            history_codes = history_codes[:, :, None]
        elif history_codes.dim() != 5 or history_codes.shape[2] != self.num_views:
            raise ValueError(f"history_codes must be (B, Th, {self.num_views} views, h, w), "
                             f"got {tuple(history_codes.shape)}")
        th = history_codes.shape[1]
        if th != self.num_history:
            raise ValueError(f"history_codes has {th} frames, model.clip.num_history is {self.num_history}")
        if tuple(history_codes.shape[3:]) != (self.grid_size, self.grid_size):
            raise ValueError(f"history_codes grid {tuple(history_codes.shape[3:])} != model grid {self.grid_size}")
        if self.robot is not None:
            want = (history_codes.shape[0], th, self.robot.state_dim)
            if state is None or tuple(state.shape) != want:
                raise ValueError(f"state must be {want} (batch, history, model.robot.state_dim), "
                                 f"got {None if state is None else tuple(state.shape)}")
        return history_codes

    def embed_prefix(self, text_feats, text_mask, history_codes, state: Optional[torch.Tensor] = None):
        """Text + history (+ state, + readouts) -> (B, P, C) embeddings and (B, P) key validity."""
        history_codes = self._check_history(history_codes, state)
        b, th = history_codes.shape[:2]
        text, valid = self.embed_text(text_feats, text_mask)
        parts = [text]
        for tau in range(th):
            for v in range(self.num_views):
                parts.append(self.embed_frame(history_codes[:, tau, v].reshape(b, -1), tau, view=self._view(v)))
            if self.robot is not None:
                parts.append((self.state_proj(state[:, tau]) + self.time_emb.weight[tau])[:, None])
        if self.robot is not None:
            parts.append(self.readout_emb.weight[None].expand(b, -1, -1))
        x = torch.cat(parts, dim=1)
        valid = torch.cat([valid, valid.new_ones(b, x.shape[1] - valid.shape[1])], dim=1)
        return x, valid

    def shifted_future(self, future_codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, n) inputs of the future slots: [BOS, f_0, .., f_{n-2}]."""
        flat = future_codes.reshape(future_codes.shape[0], -1)
        bos = flat.new_full((flat.shape[0], 1), self.bos_index)
        return torch.cat([bos, flat[:, :-1]], dim=1)

    # ---- teacher-forced training pass ----
    def forward(self, text_feats, text_mask, history_codes, future_codes, state: Optional[torch.Tensor] = None):
        """Teacher-forced logits for every future-frame token.

        Pretraining: history (B, Th, h, w), future (B, h, w) -> logits (B, n, V).
        Robot: history (B, Th, Nv, h, w), future (B, Nv, h, w), state (B, Th, S) -> (logits (B, Nv, n, V),
        readout features (B, R, C)).
        """
        prefix, valid = self.embed_prefix(text_feats, text_mask, history_codes, state)
        b, n = prefix.shape[0], self.tokens_per_frame
        future = future_codes if self.robot is not None else future_codes[:, None]
        history = self._check_history(history_codes, state)
        futs = [self.embed_future(self.shifted_future(future[:, v]), 0, v, history) for v in range(self.num_views)]
        x = torch.cat([prefix, *futs], dim=1)
        r = self.robot.num_readouts if self.robot is not None else 0
        # Only readouts and future slots feed a loss: the trunk's last block computes just those rows.
        h = self.trunk(x, torch.cat([valid, valid.new_ones(b, self.num_views * n)], dim=1),
                       num_outputs=r + self.num_views * n)
        logits = self.frame_head(h[:, r:]).reshape(b, self.num_views, n, -1)
        if self.robot is None:
            return logits[:, 0]
        return logits, h[:, :r]

    @torch.no_grad()
    def readout_features(self, text_feats, text_mask, history_codes, state) -> torch.Tensor:
        """The action path: one pass over the prefix up to the readouts -> (B, R, C). No frame token is generated."""
        if self.robot is None:
            raise ValueError("this model has no readouts: it was built without model.robot (a pretraining model)")
        prefix, valid = self.embed_prefix(text_feats, text_mask, history_codes, state)
        return self.trunk(prefix, valid, num_outputs=self.robot.num_readouts)

    def new_cache(self, batch: int, device, dtype=None) -> KVCache:
        dtype = dtype or self.code_emb.weight.dtype
        return KVCache.empty(self.cfg.trunk, batch, self.max_len, device, dtype)

    # ---- generation ----
    @torch.no_grad()
    def generate_future_frame(self, text_feats, text_mask, history_codes, temperature: float = 0.0,
                              top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                              use_cache: bool = True, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Autoregressively sample the future frame's codes: (B, h, w), or (B, Nv, h, w) for robot models.

        temperature 0 = greedy. With `use_cache` the prefix is run once and each new token costs one single-token step;
        without it the whole sequence is recomputed for every token (the reference the cache must match).
        """
        b = history_codes.shape[0]
        prefix, valid = self.embed_prefix(text_feats, text_mask, history_codes, state)
        history = self._check_history(history_codes, state)
        n, nv = self.tokens_per_frame, self.num_views
        out = history_codes.new_empty(b, nv, n)
        cache = self.new_cache(b, prefix.device, prefix.dtype) if use_cache else None
        head = StepLinear(self.frame_head) if use_cache else self.frame_head
        pending, pending_valid = prefix, valid  # tokens not yet run through the cached trunk
        for v in range(nv):
            bos = self.embed_future(out.new_full((b, 1), self.bos_index), 0, v, history)
            pending = bos if pending is None else torch.cat([pending, bos], dim=1)
            if pending_valid is not None:
                pending_valid = torch.cat([pending_valid, pending_valid.new_ones(b, 1)], dim=1)
            for j in range(n):
                if use_cache:
                    h = self.trunk(pending, pending_valid, cache, num_outputs=1)[:, -1]
                    pending_valid = None
                else:
                    h = self._recompute_last(prefix, valid, out, v, j, history)
                out[:, v, j] = _sample(head(h), temperature, top_k, generator)
                pending = self.embed_future(out[:, v, j:j + 1], j + 1, v, history) if j + 1 < n else None
        out = out.reshape(b, nv, self.grid_size, self.grid_size)
        return out if self.robot is not None else out[:, 0]

    def _recompute_last(self, prefix, valid, out, v: int, j: int, history) -> torch.Tensor:
        """No-cache reference: the full sequence up to future token j of view v -> last hidden state (B, C)."""
        b = prefix.shape[0]
        done = [self.embed_future(self.shifted_future(_pad_codes(out[:, u], self.tokens_per_frame, self.grid_size)),
                                  0, u, history) for u in range(v)]
        cur = self.embed_future(self.shifted_future(_pad_codes(out[:, v], j, self.grid_size))[:, : j + 1], 0, v,
                                history)
        x = torch.cat([prefix, *done, cur], dim=1)
        return self.trunk(x, torch.cat([valid, valid.new_ones(b, x.shape[1] - valid.shape[1])], dim=1))[:, -1]


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
