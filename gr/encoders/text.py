"""Frozen open_clip text tower returning per-token features and a padding mask."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

import torch

from gr.config import TextEncoderConfig
from gr.encoders._frozen import FrozenMixin, check_state_dict, read_state_dict, seeded

log = logging.getLogger(__name__)


class FrozenTextEncoder(FrozenMixin):
    """open_clip text tower, frozen. `forward(captions) -> (features (B, L, D), mask (B, L) bool)`.

    Features are the final-layer (ln_final) token features of the custom text tower, before pooling and projection.
    Features are cached per unique caption, so repeated captions cost nothing. The cache is an LRU bounded in bytes
    (`cache_mib`) and entries (`cache_size`) and lives in host memory unless `cache_device: model`: at width 512 and 32
    tokens an entry is 66 KB, so the old bound of 100k entries on the GPU held 6.6 GB per rank.

    Args:
        cfg: TextEncoderConfig.
        max_tokens: number of leading tokens returned (CLIP's context is 77; the tail is padding for short captions).
    """

    def __init__(self, cfg: TextEncoderConfig, max_tokens: int = 77):
        super().__init__()
        import open_clip

        self.cfg = cfg
        self.max_tokens = max_tokens
        with seeded(cfg.random_init_seed):
            clip = open_clip.create_model(cfg.model_name, pretrained=None, force_custom_text=True)
        if cfg.pretrained:
            self._load_weights(clip, cfg.pretrained)
        else:
            log.warning("text_encoder.pretrained is not set: %s uses random (seeded) weights", cfg.model_name)
        self.text = clip.text  # the image tower is dropped: only text is used
        self.text.output_tokens = True
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        self.feature_dim = self.text.width
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.freeze()

    @staticmethod
    def _load_weights(clip: torch.nn.Module, path: str) -> None:
        from open_clip.model import convert_to_custom_text_state_dict

        found = read_state_dict(path, "text_encoder.pretrained")
        found = {k[len("module."):] if k.startswith("module.") else k: v for k, v in found.items()}
        found = convert_to_custom_text_state_dict(found)  # OpenAI/open_clip layout -> custom text tower keys
        expected = clip.state_dict()
        found = {k: v for k, v in found.items() if k != "logit_bias" or k in expected}
        check_state_dict(expected, found, path, "text_encoder.pretrained")
        clip.load_state_dict(found, strict=True)
        log.info("text_encoder: loaded %s", path)

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        device = next(self.text.parameters()).device
        ids = self.tokenizer(captions).to(device)  # (B, 77)
        _, tokens = self.text(ids)  # (B, 77, D)
        n = self.max_tokens
        valid = (ids[:, :n] != 0).unsqueeze(-1).to(tokens.dtype)
        # Pack the padding mask into the cached tensor as an extra channel: one cache entry per caption.
        return torch.cat([tokens[:, :n] * valid, valid], dim=-1)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"text_encoder: caption {i} is {type(c).__name__}, expected str")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        self.cache_misses += len(missing)
        self.cache_hits += len(captions) - len(missing)
        device = next(self.text.parameters()).device
        fresh = dict(zip(missing, self._encode_uncached(missing))) if missing else {}
        packed = torch.stack([fresh[c] if c in fresh else self._cache[c].to(device) for c in captions])
        self._remember(captions, fresh, device)
        return packed[..., :-1], packed[..., -1] > 0.5

    def _remember(self, captions: Sequence[str], fresh: dict[str, torch.Tensor], device: torch.device) -> None:
        """Store the new features (on the cache device), mark this batch's captions as recent, evict the oldest."""
        limit = self.cfg.cache_mib * 2**20
        store = device if self.cfg.cache_device == "model" else torch.device("cpu")
        for c, feat in fresh.items():
            self._cache[c] = feat.to(store)
            self.cache_bytes += feat.numel() * feat.element_size()
        for c in captions:
            if c in self._cache:
                self._cache.move_to_end(c)
        while self._cache and (len(self._cache) > self.cfg.cache_size or self.cache_bytes > limit):
            _, old = self._cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached tensors come from the old device/dtype
        self.cache_bytes = 0
        return super()._apply(fn, *args, **kwargs)
