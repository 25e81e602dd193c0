"""Was the stain normalisation really applied, and did it work? A QC picture and numbers for a
set of stain-normalised features, from what the store *recorded*: the normaliser is rebuilt from
the features' provenance (never refitted), the tiles are read again at the stored coordinates,
and each is shown before and after, with the angle between its Macenko stain vectors and the
reference's (marugoto #12 asks exactly this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featstore.errors import FeatstoreError, StainError
from featstore.stain.colour import MIN_TISSUE_PX, macenko_estimate, optical_density
from featstore.stain.normalisers import normaliser_of


def stain_vectors(rgb: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> np.ndarray:
    """Macenko's H and E unit OD vectors of one RGB uint8 image (H, W, 3) as (2, 3), H first
    (the vector with the larger red OD component, torchstain's convention)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise StainError(f"stain_vectors: expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    batch = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    od = optical_density(batch, io)
    mask = (od >= beta).all(1)
    he, valid = macenko_estimate(od, mask, alpha)
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


@dataclass
class StainQC:
    """Per-slide median angles (degrees) to the reference stain vectors, before and after."""

    method: str
    source: str | None
    angles: dict[str, tuple[float, float]] = field(default_factory=dict)
    picture: Path | None = None


def _angle(tile: np.ndarray, ref: np.ndarray | None) -> float:
    if ref is None:
        return float("nan")
    try:
        return stain_angle(stain_vectors(tile), ref)
    except StainError:           # a tile without enough tissue has no stain vectors
        return float("nan")


def _median(values: list[float]) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def _reference_vectors(norm) -> np.ndarray | None:
    he = getattr(norm, "he_ref_", None)
    return None if he is None else np.asarray(he, np.float64).T


def _picture(rows: list[tuple[str, np.ndarray, np.ndarray]], out: Path, label: str) -> Path:
    from PIL import Image, ImageDraw

    k, s = rows[0][1].shape[0], rows[0][1].shape[1]
    gap, head, name_w = 6, 22, 150
    w = name_w + 2 * k * s + 3 * gap
    h = head + len(rows) * (s + gap)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((name_w, 4), "before", fill="black")
    draw.text((name_w + k * s + 2 * gap, 4), f"after ({label})", fill="black")
    for r, (name, before, after) in enumerate(rows):
        y = head + r * (s + gap)
        draw.text((4, y + s // 2 - 6), name[:22], fill="black")
        for j in range(k):
            img.paste(Image.fromarray(before[j]), (name_w + j * s, y))
            img.paste(Image.fromarray(after[j]), (name_w + k * s + 2 * gap + j * s, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def stain_qc(store, encoder: str, minus: int, weights: str, out: str | Path | None = None, *,
             n_slides: int = 4, per_slide: int = 4, slides=None) -> StainQC:
    """Read *per_slide* tiles (evenly spaced over the stored coords) of *n_slides* slides that have
    the stain-normalised features (encoder, minus, weights), normalise them with the recorded
    normaliser, and report / draw them. Raises when the features come from raw tiles."""
    from featstore.read.tilesource import TileSource

    key = store.resolve_key(encoder, minus, weights)
    sids = [s for s in store.slide_ids() if store.has_features(s, key.encoder, key.minus, key.weights)][:n_slides]
    if not sids:
        raise FeatstoreError(f"{store.path}: no slide has features {key}")
    prov = store.provenance(sids[0], key.encoder, key.minus, key.weights)
    norm = normaliser_of(prov)
    if norm is None:
        raise FeatstoreError(f"{store.path}: features {key} were extracted from raw tiles (stain: none); "
                             "pick a -stain-<method> weights tag (see `featstore ls`)")
    pre = dict(prov.get("preprocessing") or {})
    identity = {"input_size": int(pre.get("input_size") or 224), "interpolation": pre.get("interpolation"),
                "resize_size": pre.get("resize_size"), "mean": (0.0,) * 3, "std": (1 / 255,) * 3}
    ref = _reference_vectors(norm)
    qc = StainQC(norm.name, prov["stain"].get("source"))
    rows = []
    with TileSource.from_store(store, sids, identity, slides=slides) as src:
        for sid in sids:
            coords = store.coords(sid)
            idx = np.unique(np.linspace(0, len(coords) - 1, min(per_slide, len(coords))).round().astype(int))
            before = src.read_rgb(sid, coords[idx])
            after = norm(torch.from_numpy(before).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
            qc.angles[sid] = (_median([_angle(t, ref) for t in before]), _median([_angle(t, ref) for t in after]))
            rows.append((sid, before, after))
    if out is not None and rows and all(r[1].shape[0] == rows[0][1].shape[0] for r in rows):
        qc.picture = _picture(rows, Path(out), f"{norm.name}, reference {qc.source}")
    return qc


__all__ = ["StainQC", "stain_angle", "stain_qc", "stain_vectors"]
