"""Centered kernel alignment (Kornblith et al. 2019) between two representations of the same rows.

* ``linear_cka`` works in feature space: O(D^2) memory, never an N x N matrix. Rows are streamed
  in chunks, converted to float64, shifted by the first chunk's mean (so a large common offset
  in float16/float32 inputs cannot cancel catastrophically) and accumulated as float64 sums from
  which the centred products are recovered exactly.
* ``debiased=True`` uses the unbiased HSIC estimator (Song et al. 2012), also in feature space
  (it needs only per-row squared norms of the centred rows, accumulated through their sums).
* ``rbf_cka`` needs N x N Gram matrices (bandwidth = threshold x median distance, as in the
  reference notebook); it refuses N above ``max_n`` rather than exhausting memory.
* ``minibatch_cka`` (Nguyen et al. 2021) averages unbiased HSIC over random minibatches: for
  RBF on large N, or as a cheap estimate.
* ``store_linear_cka`` streams two feature sets of a featstore store slide by slide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # rows converted to float64 at a time (64 MiB at D = 1024)
RBF_MAX_N = 10_000  # N x N float64 Gram = 800 MB at this size


# --------------------------------------------------------------------------- feature-space sums
@dataclass
class _Side:
    """Float64 sums over the (shifted) rows of one representation."""

    shift: np.ndarray | None = None  # first chunk's column mean
    n: int = 0
    s: np.ndarray | None = None  # sum of shifted rows (D,)
    gram: np.ndarray | None = None  # X~^T X~ (D, D)
    q: float = 0.0  # sum of squared row norms
    q2: float = 0.0  # sum of squared row norms squared
    qx: np.ndarray | None = None  # sum_i |x~_i|^2 x~_i (D,)

    def prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shift one chunk (float64) and return it with its squared row norms."""
        x = np.array(x, dtype=np.float64, copy=True)  # never modify the caller's array
        if self.shift is None:
            d = x.shape[1]
            self.shift = x.mean(axis=0)
            self.s, self.qx = np.zeros(d), np.zeros(d)
            self.gram = np.zeros((d, d))
        elif x.shape[1] != self.shift.shape[0]:
            raise AnalysisError(f"a chunk has {x.shape[1]} columns but earlier chunks had "
                                f"{self.shift.shape[0]}; pass the same feature set every update")
        x -= self.shift
        return x, np.einsum("ij,ij->i", x, x)

    def add(self, x: np.ndarray, qrow: np.ndarray) -> None:
        self.n += len(x)
        self.s += x.sum(axis=0)
        self.gram += x.T @ x
        self.q += float(qrow.sum())
        self.q2 += float(qrow @ qrow)
        self.qx += qrow @ x

    @property
    def mean(self) -> np.ndarray:
        return self.s / self.n


@dataclass
class _Cross:
    """Float64 cross sums between two representations (rows paired)."""

    xty: np.ndarray | None = None  # X~^T Y~ (Dx, Dy)
    qq: float = 0.0  # sum_i |x~_i|^2 |y~_i|^2
    qx_y: np.ndarray | None = None  # sum_i |x~_i|^2 y~_i (Dy,)
    qy_x: np.ndarray | None = None  # sum_i |y~_i|^2 x~_i (Dx,)

    def add(self, x, qx, y, qy) -> None:
        if self.xty is None:
            self.xty = np.zeros((x.shape[1], y.shape[1]))
            self.qx_y, self.qy_x = np.zeros(y.shape[1]), np.zeros(x.shape[1])
        self.xty += x.T @ y
        self.qq += float(qx @ qy)
        self.qx_y += qx @ y
        self.qy_x += qy @ x


def _terms(n: int, a: _Side, b: _Side, xty: np.ndarray, qq: float, qa_b: np.ndarray,
           qb_a: np.ndarray) -> tuple[float, float, float, float]:
    """Centred quantities from the shifted sums.

    Returns (|Xc^T Yc|_F^2, sum_i |xc_i|^2 |yc_i|^2, sum |xc_i|^2, sum |yc_i|^2), where
    xc_i = x~_i - d and d is the mean of the shifted rows (small, so no cancellation).
    """
    d, e = a.mean, b.mean
    dd, ee = float(d @ d), float(e @ e)
    cross = xty - n * np.outer(d, e)
    hs = float(np.einsum("ij,ij->", cross, cross))
    # sum (|x~|^2 - 2 x~.d + |d|^2)(|y~|^2 - 2 y~.e + |e|^2), expanded into accumulated sums
    ab = (qq - 2 * float(e @ qa_b) + ee * a.q
          - 2 * float(d @ qb_a) + 4 * float(d @ xty @ e) - 2 * ee * float(d @ a.s)
          + dd * b.q - 2 * dd * float(e @ b.s) + n * dd * ee)
    return hs, ab, a.q - n * dd, b.q - n * ee


def _hsic(hs: float, ab: float, sa: float, sb: float, n: int, debiased: bool) -> float:
    """Scaled HSIC: biased |Xc^T Yc|^2, or the unbiased estimator times n(n-3)."""
    if not debiased:
        return hs
    if n < 4:
        raise AnalysisError(f"debiased CKA needs at least 4 rows, got {n}")
    return hs - n / (n - 2) * ab + sa * sb / ((n - 1) * (n - 2))


def _ratio(xy: float, xx: float, yy: float) -> float:
    if not (xx > 0 and yy > 0):
        log.warning("CKA undefined: a representation has zero (or negative debiased) variance")
        return float("nan")
    return float(xy / np.sqrt(xx * yy))


class CKAMatrixAccumulator:
    """Streaming linear CKA between named feature sets, for any list of (a, b) pairs.

    ``update({name: rows})`` takes the same rows (tiles) of every set, in chunks; each set's
    sums are shared by all the pairs it is in, so a K x L block-wise matrix reads each chunk
    once. Memory: O(sum of D^2) float64, independent of N.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], chunk_rows: int = CHUNK_ROWS):
        self.pairs = [tuple(p) for p in pairs]
        self.names = sorted({n for p in self.pairs for n in p})
        self.chunk_rows = int(chunk_rows)
        self._sides = {n: _Side() for n in self.names}
        self._cross = {p: _Cross() for p in self.pairs if p[0] != p[1]}

    @property
    def n(self) -> int:
        return self._sides[self.names[0]].n if self.names else 0

    def update(self, feats: Mapping[str, np.ndarray]) -> None:
        """Add the same rows of every feature set (arrays (n, D_name), any float dtype)."""
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise AnalysisError(f"update() lacks feature sets {missing}; pass all of {self.names}")
        rows = {len(feats[n]) for n in self.names}
        if len(rows) != 1:
            raise AnalysisError(f"feature sets have different row counts {sorted(rows)}; CKA compares "
                                "the same tiles, so every set needs the same rows")
        n_rows = rows.pop()
        for start in range(0, n_rows, self.chunk_rows):
            prepped = {}
            for name in self.names:
                chunk = np.asarray(feats[name])[start:start + self.chunk_rows]
                if chunk.ndim != 2:
                    raise AnalysisError(f"feature set {name!r} must be 2-D (rows, features), got {chunk.shape}")
                side = self._sides[name]
                prepped[name] = side.prepare(chunk)
                side.add(*prepped[name])
            for (a, b), cross in self._cross.items():
                cross.add(*prepped[a], *prepped[b])

    def cka(self, a: str, b: str, debiased: bool = False) -> float:
        """Linear CKA between sets ``a`` and ``b`` over every row seen so far."""
        n = self.n
        if n < 2:
            raise AnalysisError(f"CKA needs at least 2 rows, got {n}")
        sa, sb = self._sides[a], self._sides[b]
        xx = _hsic(*_terms(n, sa, sa, sa.gram, sa.q2, sa.qx, sa.qx), n, debiased)
        yy = _hsic(*_terms(n, sb, sb, sb.gram, sb.q2, sb.qx, sb.qx), n, debiased)
        if a == b:
            return _ratio(xx, xx, xx)
        if (a, b) in self._cross:
            c = self._cross[(a, b)]
            xy = _hsic(*_terms(n, sa, sb, c.xty, c.qq, c.qx_y, c.qy_x), n, debiased)
        elif (b, a) in self._cross:
            c = self._cross[(b, a)]
            xy = _hsic(*_terms(n, sb, sa, c.xty, c.qq, c.qx_y, c.qy_x), n, debiased)
        else:
            raise AnalysisError(f"pair ({a}, {b}) was not requested; known pairs: {self.pairs}")
        return _ratio(xy, xx, yy)


class LinearCKAAccumulator:
    """Streaming linear CKA of two representations: ``update(Xb, Yb)`` per chunk, then ``cka()``."""

    def __init__(self, chunk_rows: int = CHUNK_ROWS):
        self._acc = CKAMatrixAccumulator([("x", "y")], chunk_rows=chunk_rows)

    @property
    def n(self) -> int:
        return self._acc.n

    def update(self, X: np.ndarray, Y: np.ndarray) -> None:
        self._acc.update({"x": X, "y": Y})

    def cka(self, debiased: bool = False) -> float:
        return self._acc.cka("x", "y", debiased=debiased)


def _check_pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise AnalysisError(f"X {X.shape} and Y {Y.shape} must be (N, Dx) and (N, Dy) over the same N rows")
    return X, Y


def linear_cka(X, Y, debiased: bool = False, chunk_rows: int = CHUNK_ROWS) -> float:
    """Linear CKA of X (N, Dx) and Y (N, Dy), rows paired; feature space, float64, no N x N."""
    X, Y = _check_pair(X, Y)
    acc = LinearCKAAccumulator(chunk_rows=chunk_rows)
    acc.update(X, Y)
    return acc.cka(debiased=debiased)


# --------------------------------------------------------------------------- Gram form (RBF)
def gram_linear(X, threshold: float = 1.0) -> np.ndarray:
    """Linear Gram X X^T (``threshold`` is ignored; it keeps the kernel signatures uniform)."""
    X = np.asarray(X, dtype=np.float64)
    return X @ X.T


def gram_rbf(X, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram with sigma^2 = threshold^2 x median squared distance (Kornblith's notebook:
    the median is taken over the full N x N matrix, diagonal zeros included)."""
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(axis=0)
    sq = np.einsum("ij,ij->i", X, X)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (X @ X.T), 0.0)
    med = float(np.median(d2))
    if med <= 0:
        raise AnalysisError("RBF bandwidth is zero (median pairwise distance is 0: most rows are "
                            "identical); use the linear kernel")
    return np.exp(-d2 / (2 * threshold**2 * med))


def center_gram(K: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """Double-centre a Gram matrix; ``unbiased`` gives the U-statistic form (Song et al. 2012)."""
    K = np.array(K, dtype=np.float64, copy=True)
    n = K.shape[0]
    if unbiased:
        np.fill_diagonal(K, 0.0)
        means = K.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        np.fill_diagonal(K, 0.0)
    else:
        means = K.mean(axis=0)
        means -= means.mean() / 2
        K -= means[:, None]
        K -= means[None, :]
    return K


def gram_cka(K, L, debiased: bool = False) -> float:
    """CKA of two N x N Gram matrices."""
    n = np.shape(K)[0]
    if debiased and n < 4:
        raise AnalysisError(f"debiased CKA needs at least 4 rows, got {n}")
    Kc, Lc = center_gram(K, debiased), center_gram(L, debiased)
    return _ratio(float(np.vdot(Kc, Lc)), float(np.vdot(Kc, Kc)), float(np.vdot(Lc, Lc)))


def rbf_cka(X, Y, threshold: float = 1.0, debiased: bool = False, max_n: int = RBF_MAX_N) -> float:
    """CKA with RBF kernels (bandwidth threshold x median distance). Needs N x N memory: N > max_n
    is refused (subsample rows, or use minibatch_cka(kernel='rbf'))."""
    X, Y = _check_pair(X, Y)
    if len(X) > max_n:
        raise AnalysisError(f"RBF CKA on {len(X)} rows needs two {len(X)}x{len(X)} Gram matrices; "
                            f"subsample to <= {max_n} rows (--max-tiles) or use minibatch CKA")
    return gram_cka(gram_rbf(X, threshold), gram_rbf(Y, threshold), debiased=debiased)


# --------------------------------------------------------------------------- minibatch CKA
def _unbiased_hsic_gram(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    return float(np.vdot(center_gram(K, True), center_gram(L, True))) / (n * (n - 3))


def minibatch_cka(X, Y, batch_size: int = 1024, kernel: str = "linear", threshold: float = 1.0,
                  seed: int = 0) -> float:
    """Minibatch CKA (Nguyen et al. 2021): sum of unbiased HSIC over random minibatches,
    normalised by the same sums of HSIC(X, X) and HSIC(Y, Y). Memory O(batch^2 + D^2)."""
    X, Y = _check_pair(X, Y)
    if kernel not in _KERNELS:
        raise AnalysisError(f"unknown kernel {kernel!r}; choose one of {sorted(_KERNELS)}")
    n = len(X)
    n_batches = max(1, n // int(batch_size))
    if n // n_batches < 4:
        raise AnalysisError(f"minibatch CKA needs batches of at least 4 rows (N={n}, batch_size={batch_size})")
    order = np.random.default_rng(seed).permutation(n)
    gram = _KERNELS[kernel]
    xy = xx = yy = 0.0
    for idx in np.array_split(order, n_batches):
        xb, yb = np.asarray(X[np.sort(idx)], np.float64), np.asarray(Y[np.sort(idx)], np.float64)
        K, L = gram(xb - xb.mean(0), threshold), gram(yb - yb.mean(0), threshold)
        xy += _unbiased_hsic_gram(K, L)
        xx += _unbiased_hsic_gram(K, K)
        yy += _unbiased_hsic_gram(L, L)
    return _ratio(xy, xx, yy)


_KERNELS = {"linear": gram_linear, "rbf": gram_rbf}


# --------------------------------------------------------------------------- store


def _spec(s: Sequence) -> tuple[str, int, str | None]:
    if len(s) == 2:
        return str(s[0]), int(s[1]), None
    if len(s) == 3:
        return str(s[0]), int(s[1]), (None if s[2] is None else str(s[2]))
    raise AnalysisError(f"feature set {s!r} must be (encoder, minus) or (encoder, minus, weights)")


def iter_store_rows(store, specs: Mapping[str, Sequence], slides: Iterable[str] | None = None,
                    store_b=None, b_names: Iterable[str] = ()) -> Iterable[tuple[str, dict[str, np.ndarray]]]:
    """Yield (slide_id, {name: features}) for the slides having every requested feature set.

    Names in ``b_names`` are read from ``store_b`` (default: the same store); the two stores
    must then hold the same tiles (coords equal), else AnalysisError.
    """
    b_names = set(b_names)
    parsed = {k: _spec(v) for k, v in specs.items()}
    ids = list(slides) if slides is not None else store.slide_ids()
    if not ids:
        raise AnalysisError(f"{store.path}: no slides to compare")
    src = {k: (store_b if (store_b is not None and k in b_names) else store) for k in parsed}
    # resolve weights=None once: an ambiguous tag is a StoreError listing the stored tags
    parsed = {k: (key.encoder, key.minus, key.weights)
              for k, key in ((k, src[k].resolve_key(e, m, w)) for k, (e, m, w) in parsed.items())}
    used = 0
    for sid in ids:
        if not all(src[k].has_features(sid, *parsed[k]) for k in parsed):
            if slides is not None:
                raise AnalysisError(f"{store.path}: slide {sid!r} lacks features for one of "
                                    f"{list(specs.values())}; extract them or drop the slide")
            log.info("skipping %s: not every feature set is present", sid)
            continue
        if store_b is not None and store_b is not store and b_names:
            if not np.array_equal(store.coords(sid), store_b.coords(sid)):
                raise AnalysisError(f"slide {sid!r}: tile coords differ between {store.path} and "
                                    f"{store_b.path}; CKA needs the same tiles (use one tiling)")
        feats = {k: src[k].features(sid, *parsed[k]) for k in parsed}
        if len({len(f) for f in feats.values()}) != 1:
            raise AnalysisError(f"slide {sid!r}: feature sets have different tile counts "
                                f"{ {k: len(f) for k, f in feats.items()} }; re-extract the slide")
        used += 1
        yield sid, feats
    if used == 0:
        raise AnalysisError(f"{store.path}: no slide has all of {list(specs.values())}; "
                            "see `featstore info` for what is stored")


def store_linear_cka(store, a: Sequence, b: Sequence, slides: Iterable[str] | None = None, *,
                     debiased: bool = False, store_b=None) -> float:
    """Linear CKA between two feature sets (encoder, minus, weights) of a store over all tiles.

    Streams slide by slide (memory O(D^2)); ``store_b`` reads ``b`` from a second store with
    the same tiling (coords are checked slide by slide).
    """
    acc = LinearCKAAccumulator()
    for _, feats in iter_store_rows(store, {"a": a, "b": b}, slides, store_b=store_b, b_names=["b"]):
        acc.update(feats["a"], feats["b"])
    return acc.cka(debiased=debiased)
