"""Embedding plots: the optional umap-learn message, PCA path, joint sets, CLI."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
from typer.testing import CliRunner

from analysis.errors import AnalysisError
from analysis.umap import UMAP_MISSING, collect_points, embed_2d, plot_embedding

HAS_UMAP = importlib.util.find_spec("umap") is not None


@pytest.mark.skipif(HAS_UMAP, reason="umap-learn is installed")
def test_missing_umap_is_a_clear_error():
    with pytest.raises(AnalysisError) as err:
        embed_2d(np.random.default_rng(0).normal(size=(20, 4)), "umap")
    assert str(err.value) == UMAP_MISSING == "umap-learn is not installed; pip install 'featstore[umap]'"


def test_pca_embedding_separates_groups():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    X[:30, :4] += 3  # shift along 4 dims: a correlated direction that survives standardising
    xy = embed_2d(X, "pca")
    assert xy.shape == (60, 2)
    gap = abs(xy[:30, 0].mean() - xy[30:, 0].mean())
    assert gap > 3 * max(xy[:30, 0].std(), xy[30:, 0].std())  # first axis splits the two groups


def test_collect_slide_and_tile_points(store_data, tmp_path):
    store, feats = store_data
    labels = {"s0": "a", "s1": "b", "s2": "a"}
    pts = collect_points(store, [("resnet18", 0, "imagenet"), ("resnet18", 0, "tuned")], labels=labels)
    assert len(pts.ids) == 6 and set(pts.encoder) == {"resnet18:imagenet:minus0", "resnet18:tuned:minus0"}
    np.testing.assert_allclose(pts.X[0], store.features("s0", "resnet18", 0, "imagenet").astype(float).mean(0))
    tiles = collect_points(store, [("resnet18", 1, "tuned")], level="tile", max_tiles=60, seed=1)
    assert len(tiles.ids) == 60 and tiles.ids[0].startswith("s0:")
    with pytest.raises(AnalysisError, match="different dimensions"):
        collect_points(store, [("resnet18", 0, "imagenet"), ("resnet18", 1, "tuned")])
    paths = plot_embedding(pts, tmp_path, method="pca", color_by="label")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 6 and rows[0]["label"] == "a"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_cli(store_data, tmp_path):
    from featstore.cli import featstore_app

    store, _ = store_data
    args = ["umap", "--store", store.path, "--encoder", "resnet18:imagenet", "--encoder", "resnet18:tuned",
            "--minus", "1", "--out", str(tmp_path)]
    r = CliRunner().invoke(featstore_app, args + ["--method", "pca"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pca.png").is_file() and (tmp_path / "pca.csv").is_file()
    if not HAS_UMAP:
        r = CliRunner().invoke(featstore_app, args)
        assert r.exit_code == 1 and "umap-learn is not installed" in r.output
