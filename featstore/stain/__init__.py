"""Stain normalisation (Macenko, Reinhard), its QC and stain augmentation (HED jitter) on torch batches.

=============  ==============================================================================
colour         optical density, Macenko's tissue rule and estimate, sRGB <-> LAB (batched)
normalisers    StainNormaliser and its kinds, the registry (get_normaliser, normaliser_of, stained_tag)
reference      fitting a normaliser to a reference image or slide (fit_normaliser, reference_tiles)
qc             stain vectors and angles; `featstore stain-qc` (stain_qc)
augment        HEDJitter and stain_jitter (``--hed-jitter`` of every trainer)
=============  ==============================================================================

Every transform takes a batch of tiles as a torch tensor (N, 3, H, W), uint8 (or float in
0-255), on any device, and returns uint8 (N, 3, H, W) on the same device. The per-tile work
(Macenko's stain estimation, Reinhard's LAB statistics) is vectorised over N: no Python loop
per tile, so a batch costs a few tensor ops whatever its size.

Reference values are fitted by torchstain's own ``fit`` (``torchstain.normalizers``, torch
backend) and the batched transforms reproduce torchstain's per-image ``normalize`` (Io=240,
alpha=1, beta=0.15, its OpenCV-scaled LAB conversion, its truncation to integers); the tests use
torchstain as the oracle.

Tiles without enough tissue are returned unchanged (torchstain fails on them): a tile needs
at least ``max(MIN_TISSUE_PX, min_tissue * H * W)`` tissue pixels, a tissue pixel being one
whose optical density is >= beta (0.15) in all three channels (Macenko's own transparency rule),
and its estimate must be non-degenerate (finite, H and E vectors apart, positive maximum
concentrations / LAB standard deviations). A fully white or single-colour tile therefore passes
through unchanged, without NaN.

``to_dict()`` is the provenance record (method, parameters, fitted reference values, reference
source, torchstain version); ``normaliser_from_dict`` rebuilds the same normaliser without the
reference image.
"""

from __future__ import annotations

from featstore.errors import StainError
from featstore.stain.augment import BIAS_RAMP_OD, HEDJitter, stain_jitter
from featstore.stain.colour import CHUNK, MIN_TISSUE_PX, lab_to_rgb, rgb_to_lab, tissue_mask
from featstore.stain.normalisers import (NORMALISERS, IdentityNormaliser, MacenkoNormaliser, ReinhardNormaliser,
                                         StainNormaliser, get_normaliser, normaliser_from_dict, normaliser_of,
                                         stained_tag, torchstain_version)
from featstore.stain.qc import stain_angle, stain_vectors

__all__ = [
    "StainError", "StainNormaliser", "MacenkoNormaliser", "ReinhardNormaliser", "IdentityNormaliser",
    "NORMALISERS", "get_normaliser", "normaliser_from_dict", "normaliser_of", "stained_tag", "stain_vectors",
    "stain_angle", "HEDJitter", "stain_jitter", "BIAS_RAMP_OD", "tissue_mask", "rgb_to_lab", "lab_to_rgb",
    "torchstain_version", "MIN_TISSUE_PX", "CHUNK",
]
