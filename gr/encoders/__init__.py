"""Frozen encoders: open_clip text tower (text -> per-token features) and a taming-format VQGAN (frames <-> codes)."""

from gr.encoders.text import FrozenTextEncoder
from gr.encoders.vqgan import FrozenVQGAN, load_taming_vqgan, save_taming_vqgan

__all__ = ["FrozenTextEncoder", "FrozenVQGAN", "load_taming_vqgan", "save_taming_vqgan"]
