"""CKA properties and agreement with independent Gram-form reference formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import ortho_group

from analysis.cka import (CKAMatrixAccumulator, LinearCKAAccumulator, linear_cka, minibatch_cka,
                          rbf_cka)
from analysis.errors import AnalysisError


# ------------------------------------------------------------------ independent references
def _hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def _hsic_unbiased(K, L):
    """Song et al. (2012), eq. 5, written out term by term."""
    n = len(K)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def _ref_cka(K, L, debiased=False):
    h = _hsic_unbiased if debiased else _hsic_biased
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def _lin(X):
    X = np.asarray(X, np.float64)
    return X @ X.T


def _rbf(X, threshold=1.0):
    d2 = cdist(X, X, "sqeuclidean")
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 16))
    Y = np.tanh(X @ rng.normal(size=(16, 24))) + 0.5 * rng.normal(size=(120, 24))
    return X, Y


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_matches_gram_reference(xy, debiased):
    X, Y = xy
    assert linear_cka(X, Y, debiased) == pytest.approx(_ref_cka(_lin(X), _lin(Y), debiased), rel=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one_and_symmetric(xy, fn, debiased):
    X, Y = xy
    assert fn(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert fn(X, Y, debiased=debiased) == pytest.approx(fn(Y, X, debiased=debiased), rel=1e-12)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(xy, fn):
    X, Y = xy
    Q = ortho_group.rvs(X.shape[1], random_state=1)
    base = fn(X, Y)
    assert fn(X @ Q, Y) == pytest.approx(base, rel=1e-9)
    assert fn(3.7 * X, Y) == pytest.approx(base, rel=1e-9)
    assert fn(X + 5.0, Y) == pytest.approx(base, rel=1e-9)  # centring


def test_changed_by_general_invertible_linear_map(xy):
    X, Y = xy
    A = np.diag(np.geomspace(0.05, 20, X.shape[1])) @ ortho_group.rvs(X.shape[1], random_state=2)
    assert abs(np.linalg.det(A)) > 1e-6
    assert abs(linear_cka(X @ A, Y) - linear_cka(X, Y)) > 0.05


def test_debiased_goes_slightly_negative_on_independent_data():
    rng = np.random.default_rng(3)
    biased, debiased = [], []
    for _ in range(20):
        X, Y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert min(biased) > 0.1  # the biased estimator is inflated at small N
    assert min(debiased) < 0 and max(np.abs(debiased)) < 0.15


def test_large_offset_float32_gives_float64_answer():
    rng = np.random.default_rng(4)
    X = (1e4 + rng.normal(size=(800, 12))).astype(np.float32)
    Y = (-3e4 + X[:, :8] - 1e4 + 0.3 * rng.normal(size=(800, 8))).astype(np.float32)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
    ref = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    # the naive float32 path (uncentred sums, centring afterwards) is badly wrong here
    n = len(X)
    gx = X.T @ X - n * np.outer(X.mean(0), X.mean(0))
    gy = Y.T @ Y - n * np.outer(Y.mean(0), Y.mean(0))
    gxy = Y.T @ X - n * np.outer(Y.mean(0), X.mean(0))
    naive = np.linalg.norm(gxy) ** 2 / (np.linalg.norm(gx) * np.linalg.norm(gy))
    assert abs(naive - ref) > 1e-2
    for chunk in (100, 8192):
        assert linear_cka(X, Y, chunk_rows=chunk) == pytest.approx(ref, rel=1e-9)
        assert linear_cka(X, Y, debiased=True, chunk_rows=chunk) == pytest.approx(
            _ref_cka(_lin(Xc), _lin(Yc), True), rel=1e-8)


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_over_uneven_chunks_equals_in_memory(xy, debiased):
    X, Y = xy
    X = X + 50.0  # offset so the first-chunk shift matters
    acc = LinearCKAAccumulator(chunk_rows=7)
    for lo, hi in [(0, 1), (1, 9), (9, 70), (70, 120)]:
        acc.update(X[lo:hi].astype(np.float32), Y[lo:hi])
    assert acc.n == 120
    X32 = X.astype(np.float32).astype(np.float64)
    ref = _ref_cka(_lin(X32 - X32.mean(0)), _lin(Y), debiased)  # centred: exact reference
    assert acc.cka(debiased) == pytest.approx(ref, rel=1e-9)


def test_matrix_accumulator_matches_pairwise(xy):
    X, Y = xy
    Z = X[:, :5] ** 2
    acc = CKAMatrixAccumulator([(a, b) for a in ("x", "z") for b in ("x", "y", "z")], chunk_rows=33)
    acc.update({"x": X, "y": Y, "z": Z})
    assert acc.cka("x", "y") == pytest.approx(linear_cka(X, Y), rel=1e-10)
    assert acc.cka("z", "y", debiased=True) == pytest.approx(linear_cka(Z, Y, True), rel=1e-10)
    assert acc.cka("y", "z") == pytest.approx(linear_cka(Y, Z), rel=1e-10)  # either order
    assert acc.cka("z", "z") == pytest.approx(1.0)


def test_input_is_not_modified(xy):
    X, Y = xy
    X0 = X.copy()
    linear_cka(X, Y)
    np.testing.assert_array_equal(X, X0)


def test_row_mismatch_is_an_error(xy):
    X, Y = xy
    with pytest.raises(AnalysisError, match="same N rows"):
        linear_cka(X, Y[:-1])


# ------------------------------------------------------------------ RBF and minibatch
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_rbf_matches_reference_notebook_form(xy, debiased, threshold):
    X, Y = xy
    ref = _ref_cka(_rbf(X, threshold), _rbf(Y, threshold), debiased)
    assert rbf_cka(X, Y, threshold, debiased) == pytest.approx(ref, rel=1e-9)


def test_rbf_refuses_large_n(xy):
    X, Y = xy
    with pytest.raises(AnalysisError, match="subsample"):
        rbf_cka(X, Y, max_n=100)


def test_minibatch_close_to_full():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(6000, 32))
    Y = X[:, :16] @ rng.normal(size=(16, 20)) + 2.0 * rng.normal(size=(6000, 20))
    full = linear_cka(X, Y, debiased=True)
    mb = minibatch_cka(X, Y, batch_size=500, seed=0)
    assert 0.05 < full < 0.95
    assert mb == pytest.approx(full, abs=0.02)
    # deterministic for a seed
    assert minibatch_cka(X, Y, batch_size=500, seed=0) == mb
    rbf = minibatch_cka(X[:2000], Y[:2000], batch_size=500, kernel="rbf")
    assert rbf == pytest.approx(rbf_cka(X[:2000], Y[:2000], debiased=True), abs=0.05)


# ------------------------------------------------------------------ store
def test_store_linear_cka_streams_slides(store_data):
    from analysis.cka import store_linear_cka

    store, feats = store_data
    a, b = ("resnet18", 0, "imagenet"), ("resnet18", 1, "tuned")
    ref = linear_cka(feats[("resnet18", "imagenet", 0)], feats[("resnet18", "tuned", 1)])
    assert store_linear_cka(store, a, b) == pytest.approx(ref, rel=1e-10)
    sub = store_linear_cka(store, a, b, slides=["s0", "s2"])
    assert sub != pytest.approx(ref)


def test_store_linear_cka_second_store_checks_coords(tmp_path, store_data):
    from analysis.cka import store_linear_cka
    from featstore import open_store
    from featstore.store import FeatureKey
    from tests.analysis.conftest import write_store

    store, _ = store_data
    other = tmp_path / "other.zarr"
    write_store(other, slides={"s0": (30, 0)}, seed=1)
    # same tiles (coords) for s0: allowed
    v = store_linear_cka(store, ("resnet18", 0, "imagenet"), ("resnet18", 0, "tuned"), slides=["s0"],
                         store_b=open_store(other))
    assert 0 < v < 1
    moved = tmp_path / "moved.zarr"
    write_store(moved, slides={"s0": (30, 0)})
    s = open_store(moved, mode="a")
    s.write_tiling("s0", np.arange(60).reshape(30, 2), np.ones(30), {"source": "x"})  # other tiles
    s.write_features("s0", FeatureKey("resnet18", "tuned", 0), np.ones((30, 24)), {})
    with pytest.raises(AnalysisError, match="coords differ"):
        store_linear_cka(store, ("resnet18", 0, "imagenet"), ("resnet18", 0, "tuned"), slides=["s0"],
                         store_b=open_store(moved))


def test_store_missing_or_ambiguous_features_are_clear_errors(store_data):
    from analysis.cka import store_linear_cka
    from featstore.errors import StoreError

    store, _ = store_data
    with pytest.raises(AnalysisError, match="no slide has all"):
        store_linear_cka(store, ("resnet18", 0, "imagenet"), ("densenet121", 0, "imagenet"))
    with pytest.raises(StoreError, match="several weights"):
        store_linear_cka(store, ("resnet18", 0), ("resnet18", 1, "tuned"))
