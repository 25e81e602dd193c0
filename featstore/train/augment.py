"""Pathology augmentations for pretraining, built from torchvision's v2 transforms.

Tissue has no up or down: every view is flipped and rotated by a multiple of 90° at random.
Colour jitter stands in for stain and scanner variation. SimCLR views add a random resized
crop and blur, as Ciga et al. (2022) trained on pathology; MAE views stay close to the tile
(flips, rotations, mild jitter), as the MAE recipe relies on the masking, not on heavy
augmentation; ``light`` is the same close-to-the-tile pipeline for supervised fine-tuning. Each
tile of a batch draws its own parameters from torch's global RNG, which the trainer seeds per
step, so a resumed run augments exactly as the uninterrupted one.

Stain augmentation (``hed_jitter``): :class:`featstore.stain.HEDJitter` (Tellez et al. 2018) on
the whole batch after the pipeline, each tile and HED channel scaled by 1 ± U(sigma) and shifted
by ± U(bias) (sigma = bias = ``hed_jitter``), its generator seeded from torch's global RNG, so
it is as reproducible as the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

from featstore.stain.augment import stain_jitter


def _rot90() -> v2.Transform:
    return v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)])


def _pipeline(kind: str, size: int) -> v2.Transform:
    geometric = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), _rot90()]
    if kind in ("mae", "light"):
        return v2.Compose(geometric + [v2.RandomApply([v2.ColorJitter(0.1, 0.1, 0.1, 0.02)], p=0.5)])
    if kind == "simclr":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True)] + geometric + [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
        ])
    raise ValueError(f"augmentation {kind!r}: light, mae or simclr")


def augmenter(kind: str, size: int, hed_jitter: float = 0.0) -> Callable[[Tensor], Tensor]:
    """``f(batch)``: uint8 (B, 3, H, W) -> uint8 (B, 3, size, size), each tile augmented on its
    own, then HED-jittered when *hed_jitter* > 0."""
    pipe = _pipeline(kind, size)
    stain = stain_jitter(hed_jitter)

    def apply(batch: Tensor) -> Tensor:
        return stain(torch.stack([pipe(t) for t in batch]))

    return apply


__all__ = ["augmenter"]
