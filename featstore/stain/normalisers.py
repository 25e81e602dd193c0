"""Stain normalisers (Macenko, Reinhard, none) fitted by torchstain, applied batched, and their
registry: a normaliser by name, from a provenance record, and the weights tag of its features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from featstore.errors import StainError
from featstore.stain.colour import (CHUNK, EPS, MIN_TISSUE_PX, as_batch, concentrations, enough_tissue,
                                    lab_to_rgb, macenko_estimate, optical_density, reference_pixels,
                                    rgb_to_lab, tissue_px_floor, to_uint8)


def torchstain_version() -> str:
    """The installed torchstain distribution's version (its ``__version__`` string can lag)."""
    try:
        return version("torchstain")
    except PackageNotFoundError:  # pragma: no cover - torchstain is a dependency
        import torchstain

        return str(getattr(torchstain, "__version__", "unknown"))



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
        batch = as_batch(batch)
        if not self.fitted:
            raise StainError(f"{self.name} normaliser is not fitted; call fit(reference) "
                             "or normaliser_from_dict(record)")
        if batch.shape[0] <= CHUNK:
            return self._transform(batch) if batch.shape[0] else to_uint8(batch).clone()
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
        return to_uint8(batch).clone()     # a new tensor, as every normaliser returns


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

        img, desc = reference_pixels(reference, self.beta, self.min_tissue, self.io)
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
        batch = as_batch(batch)
        n, _, h, w = batch.shape
        od = optical_density(batch, self.io)
        mask = (od >= self.beta).all(1)
        he, valid = macenko_estimate(od, mask, self.alpha)
        valid &= mask.sum(1) >= tissue_px_floor(h * w, self.min_tissue)
        c = concentrations(od, he, valid)
        del od
        npx = h * w
        k = 1 + round(0.01 * 99 * (npx - 1))                                   # torchstain's 99th percentile
        max_c = c.topk(npx - k + 1, dim=-1).values[..., -1]                    # (N, 2)
        valid &= (max_c > EPS).all(1) & torch.isfinite(max_c).all(1)
        return he, c, max_c, valid

    def _transform(self, batch: Tensor) -> Tensor:
        n, _, h, w = batch.shape
        he_ref, mc_ref = self.he_ref_.to(batch.device), self.max_c_ref_.to(batch.device)
        _, c, max_c, valid = self.estimate(batch)
        scale = torch.where(valid[:, None], mc_ref / max_c.clamp(min=EPS), torch.ones_like(max_c))
        out = he_ref @ c.mul_(scale[:, :, None])                              # (N, 3, P)
        out = out.neg_().exp_().mul_(self.io).nan_to_num_(255.0).clamp_(0, 255)
        out = out.to(torch.uint8).reshape(n, 3, h, w)                        # torchstain: >255 -> 255, .int()
        if not bool(valid.all()):
            out[~valid] = to_uint8(batch[~valid])
        return out



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

        img, desc = reference_pixels(reference, self.beta, self.min_tissue, self.io)
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
        valid = enough_tissue(batch, self.beta, self.min_tissue, self.io)
        valid &= (sd > 1e-3).all(1) & torch.isfinite(sd).all(1)
        gain = torch.where(valid[:, None], sd_t / sd.clamp(min=1e-3), torch.ones_like(sd))
        offset = mu_t - mu * gain                                            # (x - mu) / sd * sd_t + mu_t
        flat.mul_(gain[:, :, None]).add_(offset[:, :, None])
        out = lab_to_rgb(lab, uint8=True)
        if not bool(valid.all()):
            out[~valid] = to_uint8(batch[~valid])
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
