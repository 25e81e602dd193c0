"""Tiny MIL cohorts: synthetic bags with a planted signal, in memory or in a real Zarr store."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from featstore.store import FeatureKey, open_store

KEY = FeatureKey("resnet18", "random", 1)


def planted_bags(n_slides: int, dim: int = 16, n_inst=(30, 60), k: int = 3, shift: float = 4.0,
                 seed: int = 0, n_classes: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Bags of N(0, 1) instances; a bag of class c > 0 has *k* instances shifted along axis c-1.

    With k small relative to N the signal is rare: attention can find it, mean pooling dilutes it.
    """
    rng = np.random.default_rng(seed)
    bags, y = {}, []
    for i in range(n_slides):
        label = i % n_classes
        n = int(rng.integers(*n_inst))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        if label > 0:
            x[rng.choice(n, k, replace=False), label - 1] += shift
        bags[f"s{i:03d}"] = x
        y.append(label)
    return bags, np.array(y)


def write_store(path: Path, bags: dict[str, np.ndarray], key: FeatureKey = KEY, size0: int = 64,
                sources: dict[str, str] | None = None) -> str:
    """A real featstore Zarr store holding *bags* as float16 features on a row-major grid."""
    st = open_store(path, mode="a")
    st.set_tiling({"patch_size": 64, "mpp": 0.5, "overlap": 0, "min_tissue": 0.5, "mask": "saturation"})
    for sid, x in bags.items():
        n = len(x)
        cols = max(1, int(np.ceil(np.sqrt(n))))
        coords = np.stack([np.arange(n) % cols, np.arange(n) // cols], 1) * size0
        st.write_tiling(sid, coords, np.ones(n), {"source": (sources or {}).get(sid, f"{sid}.tif"),
                                                  "size0": size0, "slide_mpp": 0.5})
        st.write_features(sid, key, x.astype(np.float16),
                          {"encoder": key.encoder, "weights": key.weights, "minus": key.minus,
                           "dim": int(x.shape[1]), "weights_sha256": None})
    return str(path)


def write_labels(path: Path, rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def planted_cohort(path: Path, n_slides: int, **bag_args):
    """(store, label rows, bags, y): a real store of *n_slides* planted bags (see planted_bags,
    shift 6 unless given) at *path*, one patient per slide."""
    bags, y = planted_bags(n_slides, **{"shift": 6.0, **bag_args})
    store = write_store(path, bags)
    rows = [{"slide_id": s, "label": ["normal", "tumor"][int(c)], "patient_id": f"p{i:02d}"}
            for i, (s, c) in enumerate(zip(bags, y))]
    return store, rows, bags, y


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(store path, labels path, bags, y): 40 slides, 20 patients of 2 slides, planted signal."""
    tmp_path = tmp_path_factory.mktemp("cohort")
    store, rows, bags, y = planted_cohort(tmp_path / "cohort.zarr", 40, dim=16, n_inst=(20, 40), k=4, seed=1)
    # patients hold two slides of the same class: pair slides i and i+2 within each class
    for i, r in enumerate(rows):
        r["patient_id"] = f"p{(i // 4) * 2 + (i % 2):02d}"
    labels = write_labels(tmp_path / "labels.csv", rows)
    return store, labels, bags, y


def burden_cohort(path: Path, n_slides: int = 64, *, dim: int = 16, seed: int = 0, censor: float = 0.3
                  ) -> tuple[str, list[dict], np.ndarray]:
    """(store, label rows, burden): bags whose share of shifted instances (the lesion burden,
    0-40 %) sets an exponential hazard (hazard ratio e per 10 % burden) and a continuous score;
    about *censor* of the slides are censored at a uniform time before their event. Rows carry
    slide_id, patient_id, time, event and score (the regression target: burden plus noise)."""
    rng = np.random.default_rng(seed)
    bags, rows, burden = {}, [], []
    for i in range(n_slides):
        n = int(rng.integers(30, 50))
        b = float(rng.uniform(0.0, 0.4))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        k = int(round(b * n))
        x[rng.choice(n, k, replace=False), 0] += 5.0
        sid = f"s{i:03d}"
        bags[sid] = x
        t = rng.exponential(1.0 / (0.1 * np.exp(10 * k / n)))
        censored = rng.random() < censor
        time = float(rng.uniform(0, t)) if censored else float(t)
        rows.append({"slide_id": sid, "patient_id": f"p{i:03d}", "time": f"{time:.4f}",
                     "event": str(int(not censored)), "score": f"{100 * k / n + rng.normal(0, 2):.3f}"})
        burden.append(k / n)
    return write_store(path, bags), rows, np.array(burden)
