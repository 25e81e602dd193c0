"""Stain augmentation in the training pipelines: HED jitter after the geometric pipeline, as
reproducible as the rest under the trainers' per-step seeding, glass left white."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.stain import StainError, stain_jitter
from featstore.train.augment import augmenter
from featstore.synth import gland_image


def _batch(n=4, size=48):
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([gland_image(rng, (size, size))[0] for _ in range(n)])).permute(0, 3, 1, 2)


def test_hed_jitter_is_seeded_by_the_step_seed_and_changes_colour_not_glass():
    b = _batch()
    aug = augmenter("light", 48, hed_jitter=0.05)
    torch.manual_seed(7)
    x1 = aug(b)
    torch.manual_seed(7)
    x2 = aug(b)
    torch.manual_seed(8)
    x3 = aug(b)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    torch.manual_seed(7)
    plain = augmenter("light", 48)(b)          # same geometry and colour jitter, no stain jitter
    assert (x1.float() - plain.float()).abs().mean() > 3
    white = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    assert (stain_jitter(0.05)(white).int() >= 250).all()
    assert torch.equal(stain_jitter(0.0)(b), b)


def test_bad_strength_is_refused():
    with pytest.raises(StainError, match="hed-jitter"):
        stain_jitter(2.0)
