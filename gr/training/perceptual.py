"""LPIPS perceptual loss built from local weight files only.

Why not `taming.modules.losses.lpips.LPIPS`: its constructor downloads VGG16 (torchvision) and the LPIPS linear layers
(taming's `vgg_lpips`), which fails offline. This module keeps taming's attribute names (`scaling_layer`, `net.sliceN`,
`lin0..lin4`) and forward computation, so taming's state dicts and `loss.perceptual_loss.*` checkpoint keys load
unchanged, but it builds VGG16 with random weights and then loads what the config points at:

- `lpips_weights`: taming's/LPIPS's `vgg.pth` (only `lin*.model.1.weight`), or a full LPIPS state dict (`net.*` too);
- `vgg16_weights`: torchvision's `vgg16-*.pth` (`features.N.*`; the classifier is ignored), needed when the LPIPS file
  has no `net.*` keys.
"""

from __future__ import annotations

import torch
from taming.modules.losses.lpips import NetLinLayer, ScalingLayer, normalize_tensor, spatial_average
from torch import nn

from gr.encoders._frozen import FrozenMixin, read_state_dict

# VGG16 `features` indices of each LPIPS slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), as in taming.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Slices(nn.Module):
    """VGG16 conv features split into taming's five slices (`slice1` .. `slice5`, keys `sliceK.<features index>.*`)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=False)  # VGG16 conv stack only: no 100M-parameter classifier
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            part = nn.Sequential()
            for i in range(lo, hi):
                part.add_module(str(i), features[i])
            setattr(self, f"slice{k}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, len(_SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class LocalLPIPS(FrozenMixin):
    """Frozen LPIPS(VGG16) distance, (B, 3, H, W) x 2 in [-1, 1] -> (B, 1, 1, 1).

    Args:
        lpips_weights: local LPIPS state dict (lin layers, optionally `net.*` as well).
        vgg16_weights: local torchvision VGG16 state dict; required when `lpips_weights` has no `net.*` keys.
    """

    def __init__(self, lpips_weights: str, vgg16_weights: str | None = None):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, chn in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(chn, use_dropout=True))
        self._load(lpips_weights, vgg16_weights)
        self.freeze()

    def _load(self, lpips_weights: str, vgg16_weights: str | None) -> None:
        expected = self.state_dict()
        found = read_state_dict(lpips_weights, "loss.lpips_weights")
        found = {k: v for k, v in found.items() if k in expected or k.startswith(("lin", "net."))}
        if not any(k.startswith("net.") for k in found):
            if vgg16_weights is None:
                raise ValueError(f"loss.lpips_weights: {lpips_weights!r} holds no VGG16 weights (`net.*`); "
                                 "set loss.vgg16_weights to a local torchvision vgg16 file")
            found.update(self._vgg_from_torchvision(vgg16_weights))
        for key, ref in expected.items():
            if key in ("scaling_layer.shift", "scaling_layer.scale"):
                continue  # constants, not in LPIPS weight files
            src = "loss.vgg16_weights" if key.startswith("net.") and vgg16_weights else "loss.lpips_weights"
            if key not in found:
                raise ValueError(f"{src}: missing key {key!r} for the LPIPS network")
            if tuple(found[key].shape) != tuple(ref.shape):
                raise ValueError(f"{src}: key {key!r} has shape {tuple(found[key].shape)}, expected {tuple(ref.shape)}")
        self.load_state_dict(found, strict=False)

    @staticmethod
    def _vgg_from_torchvision(path: str) -> dict[str, torch.Tensor]:
        sd = read_state_dict(path, "loss.vgg16_weights")
        out = {}
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            for i in range(lo, hi):
                for p in ("weight", "bias"):
                    if f"features.{i}.{p}" in sd:
                        out[f"net.slice{k}.{i}.{p}"] = sd[f"features.{i}.{p}"]
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (normalize_tensor(a) - normalize_tensor(b)) ** 2
            total = total + spatial_average(getattr(self, f"lin{k}").model(diff), keepdim=True)
        return total
