"""Block-wise CKA: every level of encoder set A against every level of set B, on the same tiles.

E.g. frozen vs fine-tuned ResNet at minus 0..3 (HistoTransfer Fig. 2). Linear CKA streams all
pairs in one pass over the store (one read per slide and level); RBF collects a row subsample
(``max_tiles``) and builds each Gram matrix once.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from analysis.cka import RBF_MAX_N, CKAMatrixAccumulator, gram_cka, gram_rbf, iter_store_rows
from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

KERNELS = ("linear", "rbf")
RBF_DEFAULT_TILES = 5000


def parse_set(text: str) -> tuple[str, str | None]:
    """``ENC`` or ``ENC:WEIGHTS`` -> (encoder, weights or None)."""
    enc, _, weights = str(text).partition(":")
    if not enc:
        raise AnalysisError(f"{text!r}: expected ENCODER or ENCODER:WEIGHTS, e.g. resnet18:imagenet")
    return enc, (weights or None)


@dataclass
class BlockwiseResult:
    """CKA matrix: rows = levels of set A, columns = levels of set B."""

    rows: list[tuple[str, str, int]]  # (encoder, weights, minus)
    cols: list[tuple[str, str, int]]
    matrix: np.ndarray
    n_tiles: int
    kernel: str
    debiased: bool
    slides: list[str] = field(default_factory=list)

    @staticmethod
    def label(key: tuple[str, str, int]) -> str:
        return f"{key[0]}:{key[1]}:minus{key[2]}"

    def to_rows(self) -> list[dict]:
        return [{"a": self.label(a), "b": self.label(b), "a_minus": a[2], "b_minus": b[2],
                 "cka": float(self.matrix[i, j]), "kernel": self.kernel, "debiased": self.debiased,
                 "n_tiles": self.n_tiles}
                for i, a in enumerate(self.rows) for j, b in enumerate(self.cols)]

    def write_csv(self, path: str | Path) -> Path:
        """Long format: one line per (a, b) pair."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.to_rows()
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    def plot(self, path: str | Path) -> Path:
        from featstore.core.plotting import heatmap

        kind = ("debiased " if self.debiased else "") + f"{self.kernel} CKA"
        a, b = self.rows[0], self.cols[0]
        return heatmap(
            self.matrix, [f"minus{k[2]}" for k in self.rows], [f"minus{k[2]}" for k in self.cols], path,
            title=f"{kind}, {self.n_tiles:,} tiles", ylabel=f"{a[0]}:{a[1]}", xlabel=f"{b[0]}:{b[1]}",
            vmin=min(0.0, float(np.nanmin(self.matrix))) if np.isfinite(self.matrix).any() else 0.0,
        )


def _levels_for(store, enc: str, weights: str | None, levels: Sequence[int] | None) -> list[tuple[str, str, int]]:
    if levels is None:
        levels = sorted({k.minus for k in store.matching_keys(enc, weights)})
        if not levels:
            have = ", ".join(str(k) for k in store.encoders()) or "none"
            raise AnalysisError(f"{store.path}: no features for {enc}{':' + weights if weights else ''} "
                                f"(stored: {have})")
    out = []
    for lv in levels:
        k = store.resolve_key(enc, lv, weights)
        out.append((k.encoder, k.weights, k.minus))
    return out


def _subsample(store, slides: list[str], max_tiles: int, seed: int) -> dict[str, np.ndarray]:
    """Row indices per slide: a uniform random subset of max_tiles tiles over the slides (sorted)."""
    counts = np.array([len(store.coords(s)) for s in slides])
    total = int(counts.sum())
    if total <= max_tiles:
        return {s: np.arange(c) for s, c in zip(slides, counts)}
    pick = np.sort(np.random.default_rng(seed).choice(total, size=max_tiles, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    return {s: pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i] for i, s in enumerate(slides)}


def blockwise_cka(store, a: tuple[str, str | None], b: tuple[str, str | None],
                  levels: Sequence[int] | None = None, *, kernel: str = "linear", debiased: bool = False,
                  max_tiles: int | None = None, seed: int = 0, slides: Sequence[str] | None = None,
                  threshold: float = 1.0,
                  progress: Callable[[int, int], None] | None = None) -> BlockwiseResult:
    """CKA between every level of ``a`` = (encoder, weights) and every level of ``b``.

    ``levels`` None: all levels stored for each set. Only slides holding every requested
    feature set are used. ``max_tiles`` subsamples tiles uniformly (seeded); RBF defaults to
    5,000 because it builds N x N Gram matrices. ``progress(done, total)`` is called per slide.
    """
    if kernel not in KERNELS:
        raise AnalysisError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    rows = _levels_for(store, *a, levels)
    cols = _levels_for(store, *b, levels)
    specs = {BlockwiseResult.label(k): (k[0], k[2], k[1]) for k in rows + cols}
    ids = list(slides) if slides is not None else store.slide_ids()
    ids = [s for s in ids if all(store.has_features(s, *spec) for spec in specs.values())]
    if not ids:
        raise AnalysisError(f"{store.path}: no slide has features for all of {', '.join(specs)}; "
                            "extract both encoders at these levels first")
    if kernel == "rbf":
        if max_tiles and max_tiles > RBF_MAX_N:
            log.warning("RBF CKA builds N x N Gram matrices: using %d tiles, not %d", RBF_MAX_N, max_tiles)
        max_tiles = min(max_tiles or RBF_DEFAULT_TILES, RBF_MAX_N)
    picks = _subsample(store, ids, max_tiles, seed) if max_tiles else None

    labels_r = [BlockwiseResult.label(k) for k in rows]
    labels_c = [BlockwiseResult.label(k) for k in cols]
    acc = CKAMatrixAccumulator([(r, c) for r in labels_r for c in labels_c]) if kernel == "linear" else None
    collected: dict[str, list[np.ndarray]] = {name: [] for name in specs}
    n = 0
    for i, (sid, feats) in enumerate(iter_store_rows(store, specs, ids)):
        if picks is not None:
            feats = {k: v[picks[sid]] for k, v in feats.items()}
        n += len(next(iter(feats.values())))
        if acc is not None:
            if len(next(iter(feats.values()))):
                acc.update(feats)
        else:
            for k, v in feats.items():
                collected[k].append(v)
        if progress is not None:
            progress(i + 1, len(ids))

    matrix = np.empty((len(rows), len(cols)))
    if acc is not None:
        for i, r in enumerate(labels_r):
            for j, c in enumerate(labels_c):
                matrix[i, j] = acc.cka(r, c, debiased=debiased)
    else:
        grams = {k: gram_rbf(np.concatenate(v), threshold) for k, v in collected.items()}
        for i, r in enumerate(labels_r):
            for j, c in enumerate(labels_c):
                matrix[i, j] = gram_cka(grams[r], grams[c], debiased=debiased)
    log.info("block-wise %s CKA over %d tiles of %d slides", kernel, n, len(ids))
    return BlockwiseResult(rows, cols, matrix, n, kernel, debiased, ids)
