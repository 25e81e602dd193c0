"""Stain augmentation: HED jitter (Tellez et al. 2018) on torch batches, and the seeded
``stain_jitter`` every trainer applies with ``--hed-jitter``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featstore.errors import StainError
from featstore.stain.colour import as_batch

_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])   # skimage's DAB-free third axis
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = -math.log(1e-6)       # skimage's HED scale: stains = OD / 13.8 @ hed_from_rgb
BIAS_RAMP_OD = (0.05, 0.25)         # the additive shift fades in between these max-channel ODs


class HEDJitter:
    """Random stain augmentation in HED space (Tellez et al. 2018; skimage's rgb2hed / hed2rgb).

    Per image and per channel (H, E, D): ``s' = s * (1 + U(-sigma, sigma)) + U(-bias, bias) * w``
    with ``s`` skimage's HED stains (Ruifrok-Johnston matrix, OD / -ln(1e-6)). The additive shift
    is weighted by ``w``, which ramps from 0 to 1 as the pixel's largest channel OD goes from
    0.05 to 0.25, so glass stays white (an unweighted 0.05 shift darkens white to ~165).
    Unlike skimage, negative stains are not clipped, so ``sigma = bias = 0`` is the identity.
    Random draws come from *generator* (CPU or batch device), so a seed reproduces a batch.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        if sigma < 0 or bias < 0:
            raise StainError(f"HEDJitter: sigma and bias must be >= 0, got {sigma}, {bias}")
        self.sigma, self.bias = float(sigma), float(bias)

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Jitter *batch* (N, 3, H, W) uint8 / float 0-255 -> uint8 (N, 3, H, W) on its device.

        The HED round trip folds into one 3x3 matrix per image on the OD:
        ``od' = (H diag(1 + a) R)^T od + w * ln(1e6) * (b R)^T`` (H = hed_from_rgb, R = rgb_from_hed).
        """
        batch = as_batch(batch)
        n, _, h, w = batch.shape
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((n, 2, 3), generator=generator, device=dev).to(batch.device) * 2 - 1
        scale, shift = 1 + self.sigma * u[:, 0], self.bias * u[:, 1]           # (N, 3) each
        to_hed = torch.as_tensor(_HED_FROM_RGB, dtype=torch.float32, device=batch.device)
        to_rgb = torch.as_tensor(_RGB_FROM_HED, dtype=torch.float32, device=batch.device)
        if batch.dtype == torch.uint8:      # skimage: -log(max(v / 255, 1e-6)) through a 256-entry table
            lut = -torch.log((torch.arange(256, dtype=torch.float32, device=batch.device) / 255).clamp(min=1e-6))
            od = lut.index_select(0, batch.reshape(-1).int()).reshape(n, 3, h * w)
        else:
            od = (batch.reshape(n, 3, h * w).float() / 255).clamp_(min=1e-6).log_().neg_()
        lo, hi = BIAS_RAMP_OD
        ramp = od.amax(1, keepdim=True).sub_(lo).div_(hi - lo).clamp_(0, 1)  # (N, 1, P)
        mix = (to_hed[None] * scale[:, None, :]) @ to_rgb                     # (N, 3, 3) row-vector form
        offset = (_LOG_ADJUST * shift) @ to_rgb                               # (N, 3)
        out = mix.transpose(1, 2) @ od
        del od
        out.addcmul_(offset[:, :, None], ramp)
        out = out.neg_().exp_().mul_(255).round_().clamp_(0, 255)
        return out.to(torch.uint8).reshape(n, 3, h, w)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "hed-jitter", "sigma": self.sigma, "bias": self.bias, "bias_ramp_od": list(BIAS_RAMP_OD)}

    def __repr__(self) -> str:
        return f"HEDJitter(sigma={self.sigma}, bias={self.bias})"


def stain_jitter(strength: float) -> Callable[[Tensor], Tensor]:
    """``f(batch)``: HED jitter of uint8 (B, 3, H, W) with sigma = bias = *strength* (0: identity)."""
    if not 0 <= strength <= 0.5:
        raise StainError(f"--hed-jitter {strength}: use a strength in [0, 0.5] (0.02-0.05 is typical)")
    if strength == 0:
        return lambda batch: batch

    jitter = HEDJitter(sigma=float(strength), bias=float(strength))

    def apply(batch: Tensor) -> Tensor:
        g = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**62, (1,))))
        return jitter(batch, generator=g)

    return apply


__all__ = ["BIAS_RAMP_OD", "HEDJitter", "stain_jitter"]
