"""Fixtures: tiny real featstore stores written through the store's writer API."""

from __future__ import annotations

import numpy as np
import pytest

from featstore import open_store
from featstore.store import FeatureKey

# Two encoders ("frozen" and "tuned" weights of one architecture) at levels 0 and 1.
KEYS = {
    FeatureKey("resnet18", "imagenet", 0): 24,
    FeatureKey("resnet18", "imagenet", 1): 16,
    FeatureKey("resnet18", "tuned", 0): 24,
    FeatureKey("resnet18", "tuned", 1): 16,
}
SLIDES = {"s0": (30, 0), "s1": (25, 1), "s2": (40, 0), "s3": (35, 1), "s4": (28, 0), "s5": (33, 1)}


def write_store(path, slides=SLIDES, keys=KEYS, seed=0):
    """A store whose features share a latent per tile; label-1 slides are shifted along one axis.

    Returns {key: concatenated features in slide order} (float16 as stored).
    """
    rng = np.random.default_rng(seed)
    store = open_store(path, mode="a")
    store.set_tiling({"patch_size": 64, "mpp": 0.5})
    proj = {k: rng.normal(size=(8, d)) for k, d in keys.items()}
    allf = {k: [] for k in keys}
    for sid, (n, label) in slides.items():
        coords = np.stack(np.meshgrid(np.arange(n) * 64, [0]), -1).reshape(-1, 2)
        store.write_tiling(sid, coords, np.ones(n), {"source": f"{sid}.tif", "size0": 64})
        latent = rng.normal(size=(n, 8))
        latent[:, 0] += 2.0 * label
        for k, d in keys.items():
            f = (np.tanh(latent @ proj[k]) + 0.2 * rng.normal(size=(n, d))).astype(np.float16)
            store.write_features(sid, k, f, {"encoder": k.encoder, "weights": k.weights})
            allf[k].append(f)
    return {k: np.concatenate(v) for k, v in allf.items()}


@pytest.fixture
def store_data(tmp_path):
    path = tmp_path / "cohort.zarr"
    feats = write_store(path)
    return open_store(path), feats
