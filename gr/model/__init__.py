"""Sequence layout, GPT trunk with KV cache, and the GR model."""

from gr.model.gpt import Block, GPTTrunk, KVCache
from gr.model.gr_model import GRModel

__all__ = ["Block", "GPTTrunk", "KVCache", "GRModel"]
