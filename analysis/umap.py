"""2-D embedding plots of tile or slide features, coloured by label or by encoder.

UMAP needs the optional ``umap-learn`` package (``pip install 'featstore[umap]'``); without it
``method="umap"`` raises a clear AnalysisError. ``method="pca"`` (scikit-learn) always works.
Several feature sets (e.g. frozen vs fine-tuned weights of one architecture) are embedded
jointly, so they must have the same dimension.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

UMAP_MISSING = "umap-learn is not installed; pip install 'featstore[umap]'"


def _umap(X: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap  # noqa: F401  (optional dependency)
    except ImportError:
        raise AnalysisError(UMAP_MISSING) from None
    n_neighbors = int(min(15, max(2, len(X) - 1)))
    return umap.UMAP(n_neighbors=n_neighbors, random_state=seed).fit_transform(X)


def _pca(X: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(X)


METHODS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {"umap": _umap, "pca": _pca}


def embed_2d(X, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(N, 2) embedding of standardised features."""
    if method not in METHODS:
        raise AnalysisError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    X = np.asarray(X, np.float64)
    if len(X) < 3:
        raise AnalysisError(f"an embedding plot needs at least 3 points, got {len(X)}")
    sd = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return np.asarray(METHODS[method](X, seed), np.float64)


@dataclass
class Points:
    X: np.ndarray
    ids: list[str]  # slide id, or slide:x:y for tiles
    encoder: list[str]
    label: list[str]


def collect_points(store, sets: Sequence[tuple[str, int, str | None]], *, level: str = "slide",
                   labels: Mapping[str, str] | None = None, max_tiles: int = 5000, seed: int = 0) -> Points:
    """Mean-pooled slides (``level="slide"``) or a seeded tile subsample (``"tile"``) per set."""
    if level not in ("slide", "tile"):
        raise AnalysisError(f"level must be 'slide' or 'tile', not {level!r}")
    rng = np.random.default_rng(seed)
    xs, ids, enc, lab = [], [], [], []
    for spec in sets:
        key = store.resolve_key(spec[0], spec[1], spec[2] if len(spec) > 2 else None)
        name = str(key)
        slides = [s for s in store.slide_ids() if store.has_features(s, key.encoder, key.minus, key.weights)
                  and (labels is None or s in labels)]
        if not slides:
            raise AnalysisError(f"{store.path}: no {'labelled ' if labels else ''}slide has {name} features")
        per_slide = max(1, max_tiles // len(slides))
        for sid in slides:
            f = store.features(sid, key.encoder, key.minus, key.weights)
            if len(f) == 0:
                continue
            if level == "slide":
                rows, rid = f.astype(np.float64).mean(0, keepdims=True), [sid]
            else:
                pick = np.sort(rng.choice(len(f), size=min(per_slide, len(f)), replace=False))
                xy = store.coords(sid)[pick]
                rows, rid = f[pick].astype(np.float64), [f"{sid}:{x}:{y}" for x, y in xy]
            xs.append(rows)
            ids += rid
            enc += [name] * len(rid)
            lab += [labels[sid] if labels else ""] * len(rid)
    dims = {x.shape[1] for x in xs}
    if len(dims) > 1:
        raise AnalysisError(f"feature sets have different dimensions {sorted(dims)}; a joint embedding needs "
                            "one dimension (e.g. the same architecture and level with different weights)")
    return Points(np.concatenate(xs), ids, enc, lab)


def plot_embedding(points: Points, out_dir: str | Path, *, method: str = "umap", seed: int = 0,
                   color_by: str | None = None) -> dict[str, Path]:
    """Embed, then write ``<method>.png`` (scatter) and ``<method>.csv`` (id, encoder, label, x, y)."""
    from featstore.core.plotting import scatter_groups

    xy = embed_2d(points.X, method, seed)
    if color_by is None:
        color_by = "encoder" if len(set(points.encoder)) > 1 else "label"
    if color_by not in ("label", "encoder"):
        raise AnalysisError(f"color_by must be 'label' or 'encoder', not {color_by!r}")
    groups = points.label if color_by == "label" and any(points.label) else points.encoder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = scatter_groups(xy, groups, out / f"{method}.png",
                         title=f"{method.upper()} of {len(xy):,} points, coloured by {color_by}")
    csv_path = out / f"{method}.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "encoder", "label", "x", "y"])
        for i in range(len(xy)):
            w.writerow([points.ids[i], points.encoder[i], points.label[i], f"{xy[i, 0]:.5f}", f"{xy[i, 1]:.5f}"])
    return {"png": png, "csv": csv_path}
