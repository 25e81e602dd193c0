"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter) on torch batches.

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

import hashlib
import json
import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from featstore.errors import FeatstoreError

__all__ = [
    "StainError", "StainNormaliser", "MacenkoNormaliser", "ReinhardNormaliser", "IdentityNormaliser",
    "NORMALISERS", "get_normaliser", "normaliser_from_dict", "normaliser_of", "stained_tag", "stain_vectors", "stain_angle", "HEDJitter",
    "tissue_mask", "rgb_to_lab", "lab_to_rgb", "torchstain_version", "MIN_TISSUE_PX", "CHUNK",
]

MIN_TISSUE_PX = 16          # absolute floor of tissue pixels a tile needs to be normalised
CHUNK = 32                  # tiles per vectorised step: bounds the float temporaries (~40 MB at 224²)
_EPS = 1e-6


class StainError(FeatstoreError, ValueError):
    """A stain normaliser cannot be fitted or rebuilt as asked (no tissue, unknown method, bad record)."""


def torchstain_version() -> str:
    """The installed torchstain distribution's version (its ``__version__`` string can lag)."""
    try:
        return version("torchstain")
    except PackageNotFoundError:  # pragma: no cover - torchstain is a dependency
        import torchstain

        return str(getattr(torchstain, "__version__", "unknown"))


# ---------------------------------------------------------------------------------------------
# input handling


def _as_batch(batch: Tensor) -> Tensor:
    """*batch* checked as (N, 3, H, W); uint8 or floating point in 0-255."""
    if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
        raise StainError(f"stain: expected a torch tensor (N, 3, H, W), got {shape}; stack tiles channels-first")
    if batch.dtype != torch.uint8 and not batch.dtype.is_floating_point:
        raise StainError(f"stain: expected uint8 or float 0-255 tiles, got {batch.dtype}")
    return batch


def _to_uint8(batch: Tensor) -> Tensor:
    """uint8 view of *batch* (floats are rounded and clipped to 0-255)."""
    return batch if batch.dtype == torch.uint8 else batch.round().clamp(0, 255).to(torch.uint8)


def _reference_pixels(reference: np.ndarray | Sequence[np.ndarray], beta: float, min_tissue: float,
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
        if bool(_enough_tissue(t[None], beta, min_tissue, io)[0]):
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


def _optical_density(batch: Tensor, io: float) -> Tensor:
    """torchstain's OD, -log((I + 1) / Io), channels first as (N, 3, P) float32 (same ops, in place)."""
    n = batch.shape[0]
    return batch.reshape(n, 3, -1).to(torch.float32, copy=True).add_(1).div_(io).log_().neg_()


def tissue_mask(batch: Tensor, beta: float = 0.15, io: float = 240.0) -> Tensor:
    """(N, H, W) bool: pixels whose OD is >= *beta* in every channel (Macenko's tissue pixels).

    Compared in intensity, ``I <= Io * exp(-beta) - 1`` (205.6 for the defaults): the same
    pixels as torchstain's ``-log((I + 1) / Io) >= beta`` for integer I, without the log.
    """
    batch = _as_batch(batch)
    return (batch <= io * math.exp(-beta) - 1).all(1)


def _min_tissue_px(npx: int, min_tissue: float) -> int:
    return max(MIN_TISSUE_PX, int(math.ceil(min_tissue * npx)))


def _enough_tissue(batch: Tensor, beta: float, min_tissue: float, io: float) -> Tensor:
    """(N,) bool: the tile has enough tissue pixels to be normalised (the white-tile rule)."""
    mask = tissue_mask(batch, beta, io)
    return mask.flatten(1).sum(1) >= _min_tissue_px(mask[0].numel(), min_tissue)


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


def _macenko_estimate(od: Tensor, mask: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
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
    cos_he = (he[:, :, 0] * he[:, :, 1]).sum(1) / (he.norm(dim=1).prod(1) + _EPS)
    valid = (cnt >= 2) & torch.isfinite(he).all(dim=(1, 2)) & (cos_he.abs() < math.cos(math.radians(1.0)))
    return he, valid


def _concentrations(od: Tensor, he: Tensor, valid: Tensor) -> Tensor:
    """Least-squares stain concentrations C (N, 2, P) of OD (N, 3, P) on HE (N, 3, 2): the
    2x2 normal equations inverted in closed form (``lstsq`` / ``solve`` cost more than the rest)."""
    eye = torch.eye(3, 2, dtype=he.dtype, device=he.device).expand_as(he)
    he = torch.where(valid[:, None, None], he, eye)             # degenerate tiles: any solvable system
    g = he.transpose(1, 2) @ he                                  # (N, 2, 2)
    det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    inv = torch.stack((torch.stack((g[:, 1, 1], -g[:, 0, 1]), -1),
                       torch.stack((-g[:, 1, 0], g[:, 0, 0]), -1)), 1) / det[:, None, None]
    return (inv @ he.transpose(1, 2)) @ od


class StainNormaliser:
    """Base of the registered normalisers: ``fit(reference)`` then ``normaliser(batch)``.

    Hyperparameters are set in ``__init__``; fitted state ends in ``_``. ``to_dict`` /
    :func:`normaliser_from_dict` round-trip it as JSON for provenance.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.source_: str | None = None

    # -- to override
    def fit(self, reference: np.ndarray | Sequence[np.ndarray], source: str | None = None) -> "StainNormaliser":
        raise NotImplementedError

    def _transform(self, batch: Tensor) -> Tensor:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def _reference(self) -> dict[str, Any]:
        return {}

    def _load(self, reference: dict[str, Any]) -> None:
        pass

    @property
    def fitted(self) -> bool:
        return True

    # -- shared
    def __call__(self, batch: Tensor) -> Tensor:
        """Normalise *batch* (N, 3, H, W) uint8 / float 0-255 -> uint8 (N, 3, H, W) on its device."""
        batch = _as_batch(batch)
        if not self.fitted:
            raise StainError(f"{self.name} normaliser is not fitted; call fit(reference) "
                             "or normaliser_from_dict(record)")
        if batch.shape[0] <= CHUNK:
            return self._transform(batch) if batch.shape[0] else _to_uint8(batch).clone()
        return torch.cat([self._transform(part) for part in batch.split(CHUNK)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able provenance record: method, parameters, fitted reference values, source, torchstain version."""
        return {"method": self.name, "params": self._params(), "reference": self._reference(),
                "source": self.source_, "torchstain": torchstain_version()}

    def fingerprint(self) -> dict[str, Any]:
        """:meth:`to_dict` plus ``sha256`` of its canonical JSON (method, params, reference only)."""
        rec = self.to_dict()
        core = json.dumps({k: rec[k] for k in ("method", "params", "reference")}, sort_keys=True)
        return {**rec, "sha256": hashlib.sha256(core.encode()).hexdigest()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "StainNormaliser":
        """Rebuild the normaliser *record* describes (see :func:`normaliser_from_dict`)."""
        return normaliser_from_dict(record)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"


class IdentityNormaliser(StainNormaliser):
    """``"none"``: a uint8 copy of the batch (the baseline of the benchmarks; nothing to fit)."""

    name = "none"

    def __init__(self) -> None:
        super().__init__()
        self.source_ = "identity: nothing fitted"

    def fit(self, reference=None, source: str | None = None) -> "IdentityNormaliser":
        """Nothing to fit; *reference* is ignored."""
        self.source_ = source or self.source_
        return self

    def _transform(self, batch: Tensor) -> Tensor:
        return _to_uint8(batch).clone()     # a new tensor, as every normaliser returns


class MacenkoNormaliser(StainNormaliser):
    """Macenko et al. (ISBI 2009), batched; reference HE / maxC from torchstain's ``fit``.

    Per tile: estimate its stain matrix and 99th-percentile concentrations, rescale the
    concentrations to the reference's and recompose with the reference stain matrix, exactly
    as torchstain's ``normalize`` (``Io * exp(-HERef @ C)``, capped at 255, truncated).
    """

    name = "macenko"

    def __init__(self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_tissue: float = 0.01) -> None:
        super().__init__()
        self.io, self.alpha, self.beta, self.min_tissue = float(io), float(alpha), float(beta), float(min_tissue)
        self.he_ref_: Tensor | None = None       # (3, 2) OD unit vectors, columns H, E
        self.max_c_ref_: Tensor | None = None    # (2,) 99th percentile concentrations

    @property
    def fitted(self) -> bool:
        return self.he_ref_ is not None

    def fit(self, reference: np.ndarray | Sequence[np.ndarray], source: str | None = None) -> "MacenkoNormaliser":
        """Fit HERef / maxCRef with torchstain's Macenko ``fit`` on *reference* (image or list of tiles)."""
        import torchstain

        img, desc = _reference_pixels(reference, self.beta, self.min_tissue, self.io)
        ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        ts.fit(img, Io=self.io, alpha=self.alpha, beta=self.beta)
        self.he_ref_ = ts.HERef.detach().float().cpu().clone()
        self.max_c_ref_ = ts.maxCRef.detach().float().cpu().clone()
        self.source_ = source or desc
        return self

    def _params(self) -> dict[str, Any]:
        return {"io": self.io, "alpha": self.alpha, "beta": self.beta, "min_tissue": self.min_tissue,
                "min_tissue_px": MIN_TISSUE_PX}

    def _reference(self) -> dict[str, Any]:
        return {"HERef": self.he_ref_.tolist(), "maxCRef": self.max_c_ref_.tolist()} if self.fitted else {}

    def _load(self, reference: dict[str, Any]) -> None:
        he = torch.tensor(reference["HERef"], dtype=torch.float32)
        mc = torch.tensor(reference["maxCRef"], dtype=torch.float32)
        if he.shape != (3, 2) or mc.shape != (2,):
            raise StainError(f"macenko record: HERef must be 3x2 and maxCRef 2 values, "
                             f"got {tuple(he.shape)}, {tuple(mc.shape)}")
        self.he_ref_, self.max_c_ref_ = he, mc

    def estimate(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(HE (N, 3, 2), C (N, 2, P), maxC (N, 2), valid (N,)) of each tile of *batch*."""
        batch = _as_batch(batch)
        n, _, h, w = batch.shape
        od = _optical_density(batch, self.io)
        mask = (od >= self.beta).all(1)
        he, valid = _macenko_estimate(od, mask, self.alpha)
        valid &= mask.sum(1) >= _min_tissue_px(h * w, self.min_tissue)
        c = _concentrations(od, he, valid)
        del od
        npx = h * w
        k = 1 + round(0.01 * 99 * (npx - 1))                                   # torchstain's 99th percentile
        max_c = c.topk(npx - k + 1, dim=-1).values[..., -1]                    # (N, 2)
        valid &= (max_c > _EPS).all(1) & torch.isfinite(max_c).all(1)
        return he, c, max_c, valid

    def _transform(self, batch: Tensor) -> Tensor:
        n, _, h, w = batch.shape
        he_ref, mc_ref = self.he_ref_.to(batch.device), self.max_c_ref_.to(batch.device)
        _, c, max_c, valid = self.estimate(batch)
        scale = torch.where(valid[:, None], mc_ref / max_c.clamp(min=_EPS), torch.ones_like(max_c))
        out = he_ref @ c.mul_(scale[:, :, None])                              # (N, 3, P)
        out = out.neg_().exp_().mul_(self.io).nan_to_num_(255.0).clamp_(0, 255)
        out = out.to(torch.uint8).reshape(n, 3, h, w)                        # torchstain: >255 -> 255, .int()
        if not bool(valid.all()):
            out[~valid] = _to_uint8(batch[~valid])
        return out


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


class ReinhardNormaliser(StainNormaliser):
    """Reinhard et al. (2001), batched: match each tile's per-channel LAB mean / std to the reference's.

    LAB means / stds of the reference come from torchstain's Reinhard ``fit`` (unbiased std,
    L in 0-100); per tile ``(lab - mu) / std * std_ref + mu_ref``, back to RGB, truncated, as
    torchstain's ``normalize``.
    """

    name = "reinhard"

    def __init__(self, beta: float = 0.15, min_tissue: float = 0.01, io: float = 240.0) -> None:
        super().__init__()
        self.beta, self.min_tissue, self.io = float(beta), float(min_tissue), float(io)
        self.means_: Tensor | None = None    # (3,) L, a, b
        self.stds_: Tensor | None = None     # (3,)

    @property
    def fitted(self) -> bool:
        return self.means_ is not None

    def fit(self, reference: np.ndarray | Sequence[np.ndarray], source: str | None = None) -> "ReinhardNormaliser":
        """Fit the LAB target means / stds with torchstain's Reinhard ``fit`` on *reference*."""
        import torchstain

        img, desc = _reference_pixels(reference, self.beta, self.min_tissue, self.io)
        ts = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        ts.fit(img)
        self.means_ = ts.target_means.detach().float().cpu().clone()
        self.stds_ = ts.target_stds.detach().float().cpu().clone()
        self.source_ = source or desc
        return self

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "min_tissue": self.min_tissue, "min_tissue_px": MIN_TISSUE_PX, "io": self.io}

    def _reference(self) -> dict[str, Any]:
        return {"lab_means": self.means_.tolist(), "lab_stds": self.stds_.tolist()} if self.fitted else {}

    def _load(self, reference: dict[str, Any]) -> None:
        mu = torch.tensor(reference["lab_means"], dtype=torch.float32)
        sd = torch.tensor(reference["lab_stds"], dtype=torch.float32)
        if mu.shape != (3,) or sd.shape != (3,):
            raise StainError(f"reinhard record: lab_means and lab_stds must hold 3 values, "
                             f"got {tuple(mu.shape)}, {tuple(sd.shape)}")
        self.means_, self.stds_ = mu, sd

    def _transform(self, batch: Tensor) -> Tensor:
        mu_t, sd_t = self.means_.to(batch.device), self.stds_.to(batch.device)
        lab = rgb_to_lab(batch if batch.dtype == torch.uint8 else batch.float() / 255)
        flat = lab.flatten(2)
        sd, mu = torch.std_mean(flat, dim=2)                                 # unbiased, as torch.std
        valid = _enough_tissue(batch, self.beta, self.min_tissue, self.io)
        valid &= (sd > 1e-3).all(1) & torch.isfinite(sd).all(1)
        gain = torch.where(valid[:, None], sd_t / sd.clamp(min=1e-3), torch.ones_like(sd))
        offset = mu_t - mu * gain                                            # (x - mu) / sd * sd_t + mu_t
        flat.mul_(gain[:, :, None]).add_(offset[:, :, None])
        out = lab_to_rgb(lab, uint8=True)
        if not bool(valid.all()):
            out[~valid] = _to_uint8(batch[~valid])
        return out


# ---------------------------------------------------------------------------------------------
# registry


NORMALISERS: dict[str, type[StainNormaliser]] = {
    cls.name: cls for cls in (MacenkoNormaliser, ReinhardNormaliser, IdentityNormaliser)
}


def get_normaliser(name: str, **params: Any) -> StainNormaliser:
    """A new, unfitted normaliser *name* (``"macenko"``, ``"reinhard"``, ``"none"``) with *params*."""
    try:
        cls = NORMALISERS[name]
    except KeyError:
        raise StainError(f"unknown stain normaliser {name!r}; known: {', '.join(sorted(NORMALISERS))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise StainError(f"stain normaliser {name!r}: {exc}") from None


def stained_tag(weights_tag: str, normaliser: StainNormaliser | None) -> str:
    """The features' weights tag for tiles through *normaliser*: ``<tag>-stain-<method>-<sha8>``
    (the fitted normaliser's hash), or *weights_tag* itself for none / raw tiles."""
    from featstore.tags import WeightsTag

    if normaliser is None or normaliser.name == "none":
        return weights_tag
    sha8 = normaliser.fingerprint()["sha256"][:8]
    return str(WeightsTag.parse(weights_tag).with_stain(f"{normaliser.name}-{sha8}"))


def normaliser_of(provenance: dict | None) -> StainNormaliser | None:
    """The normaliser a features array's provenance records (``stain``), or None for raw tiles."""
    rec = (provenance or {}).get("stain")
    if not rec or rec.get("method", "none") == "none":
        return None
    return normaliser_from_dict(rec)


def normaliser_from_dict(record: dict[str, Any]) -> StainNormaliser:
    """The normaliser a :meth:`StainNormaliser.to_dict` record describes, ready to apply (no reference image)."""
    if not isinstance(record, dict) or "method" not in record:
        raise StainError("stain record: expected a dict with 'method' (from StainNormaliser.to_dict())")
    params = {k: v for k, v in record.get("params", {}).items() if k != "min_tissue_px"}   # a module constant
    norm = get_normaliser(record["method"], **params)
    if record.get("reference"):
        try:
            norm._load(record["reference"])
        except KeyError as exc:
            raise StainError(f"stain record for {record['method']!r} lacks reference value {exc}") from None
    norm.source_ = record.get("source")
    return norm


# ---------------------------------------------------------------------------------------------
# stain-vector helpers (acceptance checks)


def stain_vectors(rgb: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> np.ndarray:
    """Macenko's H and E unit OD vectors of one RGB uint8 image (H, W, 3) as (2, 3), H first
    (the vector with the larger red OD component, torchstain's convention)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise StainError(f"stain_vectors: expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    batch = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    od = _optical_density(batch, io)
    mask = (od >= beta).all(1)
    he, valid = _macenko_estimate(od, mask, alpha)
    if not bool(valid[0]) or int(mask.sum()) < MIN_TISSUE_PX:
        raise StainError(f"stain_vectors: image has {int(mask.sum())} tissue px (OD >= {beta}) or a degenerate "
                         "estimate; pass a tile with tissue")
    v = he[0].T.double().numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def stain_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest angle in degrees between corresponding rows (H with H, E with E) of two (2, 3) stain
    matrices; rows are axes, so the sign of a vector does not count."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise StainError(f"stain_angle: expected two (k, 3) stain matrices, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.clip(np.abs((a * b).sum(1)), 0.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


# ---------------------------------------------------------------------------------------------
# stain augmentation


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
        batch = _as_batch(batch)
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
