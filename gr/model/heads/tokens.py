"""Discrete action tokens (RT-2 / OpenVLA style): 256 bins per dimension, predicted autoregressively.

Each arm dimension is cut into `model.robot.head.num_bins` equal bins between the dataset's min and max (from the
action statistics every robot shard set carries; in normalized units, since the head works on z-scored actions);
a value decodes to its bin's centre, so tokenize -> de-tokenize is within half a bin inside the range (values
outside are clamped to the end bins). Gripper dimensions stay binary: only the first and the last bin are legal
there, and they decode to -1 / +1. The shard statistics hold mean, std, min and max, not quantiles, so the bins are
min/max bins (OpenVLA's 1st/99th-percentile bins would need quantiles in the statistics).

The k x A tokens of a chunk form one sequence, time-major (step 0's dims, then step 1's, ...), decoded by a small
causal transformer that cross-attends to the readouts: [BOS, tok_0, .., tok_{n-2}] -> tok_0 .. tok_{n-1}.
The vocabulary is the bins plus BOS. Decoding is greedy and constrained: BOS is never emitted, and gripper positions
may only emit their two legal tokens. In eval mode the decoder keeps a key/value cache (`_greedy_cached`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gr.config import FinetuneLossConfig, RobotConfig
from gr.model.heads.base import ActionHead, decoder_layer
from gr.normalization import STD_FLOOR


class TokenActionHead(ActionHead):
    kind = "tokens"

    def __init__(self, cfg: RobotConfig, trunk_width: int):
        super().__init__(cfg, trunk_width)
        h = cfg.head
        self.num_bins, self.bos = h.num_bins, h.num_bins
        self.seq_len = cfg.action_chunk * cfg.action_dim
        # Bin range of each arm dim in normalized units; NaN until set_statistics (restored from checkpoints).
        self.register_buffer("low", torch.full((self.num_arm,), float("nan")))
        self.register_buffer("high", torch.full((self.num_arm,), float("nan")))
        allowed = torch.zeros(cfg.action_dim, h.num_bins + 1, dtype=torch.bool)
        allowed[: self.num_arm, : h.num_bins] = True
        allowed[self.num_arm:, [0, h.num_bins - 1]] = True
        self.register_buffer("allowed", allowed.repeat(cfg.action_chunk, 1), persistent=False)  # (n, V)
        self.token_emb = nn.Embedding(h.num_bins + 1, h.width)
        self.pos = nn.Parameter(torch.zeros(1, self.seq_len, h.width))
        self.readout_in = nn.Linear(trunk_width, h.width)
        self.decoder = nn.TransformerDecoder(decoder_layer(h.width, h.num_heads, h.dropout), h.num_decoder_layers)
        self.norm = nn.LayerNorm(h.width)
        self.out = nn.Linear(h.width, h.num_bins + 1)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(self.seq_len), persistent=False)
        nn.init.normal_(self.pos, std=0.02)

    # ---- bins ----
    def set_statistics(self, stats_action: torch.Tensor) -> None:
        mean, std, lo, hi = (stats_action[i, self.arm_index].float() for i in range(4))
        std = std.clamp(min=STD_FLOOR)  # the floor the data pipeline normalizes with
        low, high = (lo - mean) / std, (hi - mean) / std
        high = torch.maximum(high, low + 1e-3)  # a constant dim still gets a (tiny) range
        self.low.copy_(low.to(self.low))
        self.high.copy_(high.to(self.high))

    def _range(self):
        if torch.isnan(self.low).any():
            raise ValueError("model.robot.head.kind=tokens: the head has no action statistics (bins are cut from the "
                             "dataset's min/max); set them with the module's normalization_stats(data_stats)")
        return self.low, (self.high - self.low) / self.num_bins

    def tokenize(self, chunk: torch.Tensor) -> torch.Tensor:
        """Normalized chunk (B, k, A) in chunk layout -> bins (B, k, A) (gripper: first / last bin by sign)."""
        low, width = self._range()
        arm = ((chunk[..., : self.num_arm] - low) / width).floor().clamp(0, self.num_bins - 1).long()
        grip = torch.where(chunk[..., self.num_arm:] > 0, self.num_bins - 1, 0).long()
        return torch.cat([arm, grip], dim=-1)

    def detokenize(self, tokens: torch.Tensor):
        """Bins (B, k, A) -> arm (B, k, A_arm) at bin centres, gripper scores (-1 / +1) or None."""
        low, width = self._range()
        arm = low + (tokens[..., : self.num_arm].float() + 0.5) * width
        grip = (tokens[..., self.num_arm:] == self.num_bins - 1).float() * 2 - 1
        return arm, (grip if self.num_gripper else None)

    # ---- network ----
    def _logits(self, inputs: torch.Tensor, readouts: torch.Tensor) -> torch.Tensor:
        """Input tokens (B, p) (BOS first) -> logits (B, p, V) at each position."""
        p = inputs.shape[1]
        h = self.token_emb(inputs) + self.pos[:, :p]
        h = self.decoder(h, self.readout_in(readouts), tgt_mask=self.causal[:p, :p], tgt_is_causal=True)
        return self.out(self.norm(h))

    def _losses(self, readouts: torch.Tensor, batch: dict[str, Any], loss_cfg: FinetuneLossConfig,
               sample: bool = True) -> dict[str, torch.Tensor]:
        b, k, a = batch["arm"].shape[0], self.cfg.action_chunk, self.cfg.action_dim
        target = self.tokenize(self.chunk(batch)).reshape(b, -1)  # (B, n)
        inputs = torch.cat([target.new_full((b, 1), self.bos), target[:, :-1]], dim=1)
        logits = self._logits(inputs, readouts).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        mask = batch["action_mask"].bool()
        out = self.arm_gripper_terms(ce.reshape(b, k, a), mask, loss_cfg, "token_ce")
        hit = (logits.argmax(-1) == target).float().reshape(b, k, a)
        out["action_token_acc"] = self.masked_mean(hit, mask).detach()
        return out

    @torch.no_grad()
    def _predict(self, readouts: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Greedy constrained decoding (deterministic; `generator` is unused). In eval mode one token per decoder
        pass with cached keys/values (`_greedy_cached`); in train mode (dropout on) the plain recomputation."""
        tokens = self._greedy_recompute(readouts) if self.training else self._greedy_cached(readouts)
        return self.detokenize(tokens.reshape(readouts.shape[0], self.cfg.action_chunk, self.cfg.action_dim))

    def _pick(self, logits: torch.Tensor, p: int) -> torch.Tensor:
        """The constrained greedy choice at chunk position p: (B, V) logits -> (B, 1) tokens."""
        return logits.float().masked_fill(~self.allowed[p], float("-inf")).argmax(-1, keepdim=True)

    def _greedy_recompute(self, readouts: torch.Tensor) -> torch.Tensor:
        """The reference decoder: the whole prefix through nn.TransformerDecoder at every position (B, n)."""
        seq = torch.full((readouts.shape[0], 1), self.bos, dtype=torch.long, device=readouts.device)
        for p in range(self.seq_len):
            seq = torch.cat([seq, self._pick(self._logits(seq, readouts)[:, -1], p)], dim=1)
        return seq[:, 1:]

    def _greedy_cached(self, readouts: torch.Tensor) -> torch.Tensor:
        """The same tokens as `_greedy_recompute` with a key/value cache: each position runs one token through the
        decoder layers (pre-norm nn.TransformerDecoderLayer, eval mode), reading the layers' own weights; the
        readouts' cross-attention keys/values are projected once. n passes of one token instead of n passes of up to
        n tokens: the head's latency no longer grows with the square of k x A."""
        b, n = readouts.shape[0], self.seq_len
        memory = self.readout_in(readouts)
        layers = self.decoder.layers
        heads = layers[0].self_attn.num_heads
        width = memory.shape[-1]

        def split(x):  # (B, L, W) -> (B, heads, L, W / heads)
            return x.unflatten(-1, (heads, width // heads)).transpose(1, 2)

        def attend(attn, q, k, v):
            return attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

        cross, cache = [], []
        for layer in layers:
            w, bias = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
            cross.append((split(F.linear(memory, w[width:2 * width], bias[width:2 * width])),
                          split(F.linear(memory, w[2 * width:], bias[2 * width:]))))
            cache.append(memory.new_empty(2, b, heads, n, width // heads))
        token = torch.full((b, 1), self.bos, dtype=torch.long, device=readouts.device)
        out = []
        for p in range(n):
            h = self.token_emb(token) + self.pos[:, p:p + 1]
            for layer, (ck, cv), kv in zip(layers, cross, cache):
                q, k, v = F.linear(layer.norm1(h), layer.self_attn.in_proj_weight,
                                   layer.self_attn.in_proj_bias).chunk(3, dim=-1)
                kv[0, :, :, p:p + 1], kv[1, :, :, p:p + 1] = split(k), split(v)
                h = h + attend(layer.self_attn, split(q), kv[0, :, :, :p + 1], kv[1, :, :, :p + 1])
                w, bias = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
                q = F.linear(layer.norm2(h), w[:width], bias[:width])
                h = h + attend(layer.multihead_attn, split(q), ck, cv)
                h = h + layer.linear2(layer.activation(layer.linear1(layer.norm3(h))))
            token = self._pick(self.out(self.norm(h))[:, -1], p)
            out.append(token)
        return torch.cat(out, dim=1)
