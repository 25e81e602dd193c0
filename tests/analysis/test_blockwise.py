"""Block-wise CKA over a real store, and the `featstore cka` command."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from analysis.blockwise import blockwise_cka, parse_set
from featstore.encoders import parse_levels
from featstore.errors import EncoderError
from analysis.cka import linear_cka, rbf_cka
from analysis.errors import AnalysisError


def test_parsers():
    assert parse_set("resnet18") == ("resnet18", None)
    assert parse_set("resnet18:tuned") == ("resnet18", "tuned")
    assert parse_levels("0, 2,3") == (0, 2, 3)
    assert parse_levels(None) is None
    with pytest.raises(EncoderError, match="integers"):
        parse_levels("0,x")


def test_linear_matrix_matches_pairwise_cka(store_data):
    store, feats = store_data
    res = blockwise_cka(store, ("resnet18", "imagenet"), ("resnet18", "tuned"))
    assert [r[2] for r in res.rows] == [0, 1] and [c[1] for c in res.cols] == ["tuned", "tuned"]
    assert res.n_tiles == sum(len(store.coords(s)) for s in store.slide_ids())
    for i, r in enumerate(res.rows):
        for j, c in enumerate(res.cols):
            assert res.matrix[i, j] == pytest.approx(linear_cka(feats[r], feats[c]), rel=1e-9)


def test_subsample_and_rbf(store_data):
    store, feats = store_data
    sub = blockwise_cka(store, ("resnet18", "imagenet"), ("resnet18", "imagenet"), [0, 1], max_tiles=50)
    assert sub.n_tiles == 50
    np.testing.assert_allclose(np.diag(sub.matrix), 1.0)
    assert sub.matrix[0, 1] == pytest.approx(sub.matrix[1, 0])
    rbf = blockwise_cka(store, ("resnet18", "imagenet"), ("resnet18", "tuned"), [0], kernel="rbf")
    k = ("resnet18", "imagenet", 0), ("resnet18", "tuned", 0)
    assert rbf.matrix[0, 0] == pytest.approx(rbf_cka(feats[k[0]], feats[k[1]]), rel=1e-9)


def test_unknown_encoder(store_data):
    store, _ = store_data
    with pytest.raises(AnalysisError, match="no features for densenet121"):
        blockwise_cka(store, ("densenet121", None), ("resnet18", "tuned"))


def test_cli_prints_table_and_writes_files(store_data, tmp_path):
    from featstore.cli import featstore_app

    store, feats = store_data
    out = tmp_path / "out"
    r = CliRunner().invoke(featstore_app, ["cka", "--store", store.path, "--a", "resnet18:imagenet",
                                           "--b", "resnet18:tuned", "--levels", "0,1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "resnet18:tuned" in r.output and "minus1" in r.output
    rows = list(csv.DictReader((out / "cka.csv").open()))
    assert len(rows) == 4
    first = rows[0]
    assert (first["a"], first["b"]) == ("resnet18:imagenet:minus0", "resnet18:tuned:minus0")
    ref = linear_cka(feats[("resnet18", "imagenet", 0)], feats[("resnet18", "tuned", 0)])
    assert float(first["cka"]) == pytest.approx(ref, rel=1e-9)
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_error_is_one_line(store_data, tmp_path):
    from featstore.cli import featstore_app

    store, _ = store_data
    r = CliRunner().invoke(featstore_app, ["cka", "--store", store.path, "--a", "resnet18",
                                           "--b", "resnet18:tuned", "--out", str(tmp_path)])
    assert r.exit_code == 1
    assert "several weights" in r.output


def test_the_random_family_name_finds_its_stored_seed_beside_other_weights(tmp_path):
    """`--weights random` is stored as random-s0; asking for `random` (cka, train) finds it even
    when other weights of the encoder are stored, and a store with two is refused naming --weights."""
    from featstore.errors import StoreError
    from featstore.store import FeatureKey, open_store
    from tests.mil.conftest import planted_bags, write_store

    bags, _ = planted_bags(4, dim=8, n_inst=(6, 9), seed=0)
    path = write_store(tmp_path / "s.zarr", bags, key=FeatureKey("resnet18", "random-s0", 1))
    st = open_store(path, mode="a")
    for sid, x in bags.items():
        for key in (FeatureKey("resnet18", "random-s0", 2), FeatureKey("resnet18", "imagenet", 1)):
            st.write_features(sid, key, x.astype(np.float16), {"encoder": "resnet18", "weights": key.weights,
                                                              "minus": key.minus, "dim": 8})
    store = open_store(path)
    res = blockwise_cka(store, ("resnet18", "random"), ("resnet18", "random"))
    assert [r[1] for r in res.rows] == ["random-s0", "random-s0"] and [r[2] for r in res.rows] == [1, 2]
    assert store.resolve_key("resnet18", 1, "random").weights == "random-s0"
    with pytest.raises(StoreError, match=r"several weights \(imagenet, random-s0\); choose one with --weights"):
        store.resolve_key("resnet18", 1)
