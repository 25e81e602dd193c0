"""Colour maths of the stain transforms, batched over tiles on any torch device.

Optical density, Macenko's tissue rule and per-tile stain estimation (vectorised order
statistics instead of a per-tile loop), concentrations, and the OpenCV-scaled sRGB <-> LAB
conversion torchstain's Reinhard uses. Everything takes (N, 3, H, W) tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from featstore.errors import StainError

MIN_TISSUE_PX = 16          # absolute floor of tissue pixels a tile needs to be normalised
CHUNK = 32                  # tiles per vectorised step: bounds the float temporaries (~40 MB at 224²)
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# input handling


def as_batch(batch: Tensor) -> Tensor:
    """*batch* checked as (N, 3, H, W); uint8 or floating point in 0-255."""
    if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
        raise StainError(f"stain: expected a torch tensor (N, 3, H, W), got {shape}; stack tiles channels-first")
    if batch.dtype != torch.uint8 and not batch.dtype.is_floating_point:
        raise StainError(f"stain: expected uint8 or float 0-255 tiles, got {batch.dtype}")
    return batch


def to_uint8(batch: Tensor) -> Tensor:
    """uint8 view of *batch* (floats are rounded and clipped to 0-255)."""
    return batch if batch.dtype == torch.uint8 else batch.round().clamp(0, 255).to(torch.uint8)


def reference_pixels(reference: np.ndarray | Sequence[np.ndarray], beta: float, min_tissue: float,
                      io: float = 240.0) -> tuple[Tensor, str]:
    """Reference tile(s) as one torch uint8 image (3, H, W) for torchstain's ``fit``, and a description.

    One image is passed as is; a list keeps the tiles that pass the tissue rule and concatenates
    their pixels into a strip (3, 1, P) (torchstain's estimates are per pixel, so layout is moot).
    """
    images = [reference] if isinstance(reference, np.ndarray) else list(reference)
    if not images:
        raise StainError("stain fit: empty reference list; pass one RGB uint8 image or a list of tiles")
    kept = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise StainError(f"stain fit: reference {i} is {im.shape} {im.dtype}; expected (H, W, 3) uint8 RGB")
        t = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1)
        if bool(enough_tissue(t[None], beta, min_tissue, io)[0]):
            kept.append(t)
    if not kept:
        raise StainError(f"stain fit: none of the {len(images)} reference image(s) has enough tissue "
                         f"(>= {MIN_TISSUE_PX} px and {min_tissue:.0%} with OD >= {beta}); pick tissue tiles")
    if len(images) == 1:
        img = kept[0]
    else:
        img = torch.cat([t.reshape(3, 1, -1) for t in kept], dim=2)
    npx = sum(t.shape[1] * t.shape[2] for t in kept)
    return img.contiguous(), f"{len(kept)} of {len(images)} reference image(s), {npx} px"


def optical_density(batch: Tensor, io: float) -> Tensor:
    """torchstain's OD, -log((I + 1) / Io), channels first as (N, 3, P) float32 (same ops, in place)."""
    n = batch.shape[0]
    return batch.reshape(n, 3, -1).to(torch.float32, copy=True).add_(1).div_(io).log_().neg_()


def tissue_mask(batch: Tensor, beta: float = 0.15, io: float = 240.0) -> Tensor:
    """(N, H, W) bool: pixels whose OD is >= *beta* in every channel (Macenko's tissue pixels).

    Compared in intensity, ``I <= Io * exp(-beta) - 1`` (205.6 for the defaults): the same
    pixels as torchstain's ``-log((I + 1) / Io) >= beta`` for integer I, without the log.
    """
    batch = as_batch(batch)
    return (batch <= io * math.exp(-beta) - 1).all(1)


def tissue_px_floor(npx: int, min_tissue: float) -> int:
    return max(MIN_TISSUE_PX, int(math.ceil(min_tissue * npx)))


def enough_tissue(batch: Tensor, beta: float, min_tissue: float, io: float) -> Tensor:
    """(N,) bool: the tile has enough tissue pixels to be normalised (the white-tile rule)."""
    mask = tissue_mask(batch, beta, io)
    return mask.flatten(1).sum(1) >= tissue_px_floor(mask[0].numel(), min_tissue)


def _percentile_rank(count: Tensor, q: float) -> Tensor:
    """torchstain's ``k = 1 + round(q / 100 * (n - 1))`` (nearest rank, half to even) for counts (N,)."""
    return 1 + torch.round(0.01 * float(q) * (count.double() - 1)).long()


def _kth_smallest(values: Tensor, count: Tensor, k: Tensor) -> Tensor:
    """Per row of *values* (N, P), the *k*-th smallest (1-based) of its first-*count* valid entries,
    invalid entries being +inf: torchstain's ``kthvalue`` percentile, with one ``topk`` per side."""
    p = values.shape[1]
    k = k.clamp(1, p)
    r = (count - k + 1).clamp(1, p)                                          # rank from the top
    if int(k.max()) <= int(r.max()):
        low = values.topk(int(k.max()), dim=1, largest=False).values
        return low.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    high = values.masked_fill(values == float("inf"), float("-inf")).topk(int(r.max()), dim=1).values
    return high.gather(1, (r - 1).unsqueeze(1)).squeeze(1)


def macenko_estimate(od: Tensor, mask: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per image stain matrix HE (N, 3, 2) (H first) and validity (N,), from OD (N, 3, P) and tissue mask (N, P).

    The batched form of torchstain's ``__compute_matrices`` up to HE: covariance of the tissue
    OD, its two leading eigenvectors (``eigh`` on the (N, 3, 3) batch), the alpha / 100-alpha
    percentiles of the projection angles (nearest rank, as torchstain), the extreme vectors
    ordered so that the one with the larger red OD comes first (haematoxylin).
    """
    cnt = mask.sum(1)
    m = mask.unsqueeze(1).to(od.dtype)
    denom = cnt.clamp(min=2).to(od.dtype)
    mean = (od * m).sum(2) / denom[:, None]
    x = (od - mean[:, :, None]).mul_(m)
    cov = x @ x.transpose(1, 2) / (denom - 1)[:, None, None]
    del x
    cov = torch.where(cnt[:, None, None] >= 2, cov, torch.eye(3, dtype=od.dtype, device=od.device))
    _, vecs = torch.linalg.eigh(cov)
    vecs = vecs[:, :, 1:3]                                                   # (N, 3, 2)
    proj = vecs.transpose(1, 2) @ od                                          # (N, 2, P)
    phi = torch.atan2(proj[:, 1], proj[:, 0]).masked_fill_(~mask, float("inf"))
    del proj
    cnt_ = cnt.clamp(min=1)
    phi_min = _kth_smallest(phi, cnt_, _percentile_rank(cnt_, alpha))
    phi_max = _kth_smallest(phi, cnt_, _percentile_rank(cnt_, 100 - alpha))
    v_min = (vecs @ torch.stack((torch.cos(phi_min), torch.sin(phi_min)), -1).unsqueeze(-1)).squeeze(-1)
    v_max = (vecs @ torch.stack((torch.cos(phi_max), torch.sin(phi_max)), -1).unsqueeze(-1)).squeeze(-1)
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = torch.stack((torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)), dim=-1)
    cos_he = (he[:, :, 0] * he[:, :, 1]).sum(1) / (he.norm(dim=1).prod(1) + EPS)
    valid = (cnt >= 2) & torch.isfinite(he).all(dim=(1, 2)) & (cos_he.abs() < math.cos(math.radians(1.0)))
    return he, valid


def concentrations(od: Tensor, he: Tensor, valid: Tensor) -> Tensor:
    """Least-squares stain concentrations C (N, 2, P) of OD (N, 3, P) on HE (N, 3, 2): the
    2x2 normal equations inverted in closed form (``lstsq`` / ``solve`` cost more than the rest)."""
    eye = torch.eye(3, 2, dtype=he.dtype, device=he.device).expand_as(he)
    he = torch.where(valid[:, None, None], he, eye)             # degenerate tiles: any solvable system
    g = he.transpose(1, 2) @ he                                  # (N, 2, 2)
    det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    inv = torch.stack((torch.stack((g[:, 1, 1], -g[:, 0, 1]), -1),
                       torch.stack((-g[:, 1, 0], g[:, 0, 0]), -1)), 1) / det[:, None, None]
    return (inv @ he.transpose(1, 2)) @ od



# ---------------------------------------------------------------------------------------------
# Reinhard, batched (torchstain's OpenCV-scaled LAB)


def _lab_constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    from torchstain.torch.utils.rgb2lab import _rgb2xyz, _white

    m = _rgb2xyz.to(device=device, dtype=torch.float32)
    minv = torch.linalg.inv(_rgb2xyz).to(device=device, dtype=torch.float32)
    return m, minv, _white.to(device=device, dtype=torch.float32)


def _srgb_to_linear(x: Tensor) -> Tensor:
    """sRGB in [0, 1] -> linear RGB, torchstain's formula (new tensor)."""
    return torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)


def _fix_below(out: Tensor, src: Tensor, threshold: float, low) -> Tensor:
    """Set *out* to ``low(src)`` where ``src <= threshold`` (the rare linear segment), in place."""
    below = src <= threshold
    if bool(below.any()):
        out[below] = low(src[below])
    return out


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """torchstain's rgb2lab on a batch (N, 3, H, W) -> (L 0-100, a, b) (N, 3, H, W) float32.

    *rgb* is uint8 0-255 (linearised through a 256-entry table) or float in [0, 1].
    """
    m, _, white = _lab_constants(rgb.device)
    n, _, h, w = rgb.shape
    if rgb.dtype == torch.uint8:
        lut = _srgb_to_linear(torch.arange(256, dtype=torch.float32, device=rgb.device) / 255)
        lin = lut.index_select(0, rgb.reshape(-1).int()).reshape(n, 3, h * w)
    else:
        lin = _srgb_to_linear(rgb.float()).reshape(n, 3, h * w)
    xyz = (m / white[:, None]) @ lin                                          # (N, 3, P), white-scaled
    del lin
    f = _fix_below(xyz.clamp(min=0.008856).pow_(1 / 3), xyz, 0.008856, lambda t: 7.787 * t + 16 / 116)
    del xyz
    lab = torch.empty_like(f)
    torch.mul(f[:, 1], 116.0, out=lab[:, 0]).sub_(16.0)
    torch.sub(f[:, 0], f[:, 1], out=lab[:, 1]).mul_(500.0)
    torch.sub(f[:, 1], f[:, 2], out=lab[:, 2]).mul_(200.0)
    return lab.reshape(n, 3, h, w)


def lab_to_rgb(lab: Tensor, *, uint8: bool = False) -> Tensor:
    """torchstain's lab2rgb on a batch: (L, a, b) (N, 3, H, W) -> RGB in [0, 1] (N, 3, H, W);
    ``uint8=True`` returns torchstain's ``(rgb * 255).type(uint8)`` instead. *lab* is consumed."""
    _, minv, white = _lab_constants(lab.device)
    n, _, h, w = lab.shape
    lab = lab.reshape(n, 3, h * w)
    out = torch.empty_like(lab)
    y = lab[:, 0].add_(16.0).div_(116.0)
    torch.add(lab[:, 1].div_(500.0), y, out=out[:, 0])
    out[:, 1] = y
    torch.sub(y, lab[:, 2].div_(200.0), out=out[:, 2])
    del lab, y
    cube = _fix_below(out.clamp(min=0.2068966).pow_(3), out, 0.2068966, lambda t: (t - 16 / 116) / 7.787)
    del out
    arr = (minv * white[None, :]) @ cube
    del cube
    rgb = _fix_below(arr.clamp(min=0.0031308).pow_(1 / 2.4).mul_(1.055).sub_(0.055), arr, 0.0031308,
                     lambda t: t * 12.92).clamp_(0, 1).reshape(n, 3, h, w)
    return rgb.mul_(255).to(torch.uint8) if uint8 else rgb
