"""Attention heatmaps: painting, normalisation, and a real pyramidal TIFF read through OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.synth import rectangles_slide, write_pyramid_tiff
from mil.errors import MilError
from mil.heatmap import combine_attention, paint
from mil.train import RunSpec, TrainConfig, train_run

from .conftest import planted_bags, write_labels, write_store


def test_paint_puts_each_score_on_its_tile():
    coords = np.array([[0, 0], [64, 0], [0, 64]])
    heat, covered = paint((8, 8), coords, 64, np.array([0.2, 0.9, 0.5]), downsample=16)
    assert heat[0, 0] == pytest.approx(0.2) and heat[0, 5] == pytest.approx(0.9) and heat[5, 1] == pytest.approx(0.5)
    assert covered[:4, :8].all() and covered[4:, :4].all() and not covered[4:, 4:].any()


def test_rank_normalisation_makes_folds_comparable():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    got = combine_attention({"fold0": a, "fold1": a * 100 - 7}, "rank")
    np.testing.assert_allclose(got, [0, 1 / 3, 2 / 3, 1])
    soft = combine_attention({"f": a}, "softmax")
    assert soft.max() == pytest.approx(1.0) and soft.argmax() == 3
    with pytest.raises(MilError, match="--norm 'z'"):
        combine_attention({"f": a}, "z")


def test_heatmap_of_a_real_slide_highlights_the_planted_lesion(tmp_path):
    pytest.importorskip("featstore.read.slide")
    from mil.heatmap import make_heatmap

    # a 1024 px slide at 0.5 um/px: tissue everywhere, a "lesion" in the top-right quarter
    rgb = rectangles_slide((1024, 1024), [(0, 0, 1024, 1024)], seed=0)
    rgb[64:448, 576:960] = (rgb[64:448, 576:960] * np.array([0.55, 0.3, 0.6])).astype(np.uint8)
    slide = write_pyramid_tiff(tmp_path / "case.tif", rgb, mpp=0.5)
    xs, ys = np.meshgrid(np.arange(16) * 64, np.arange(16) * 64)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    lesion = (coords[:, 0] >= 576) & (coords[:, 0] < 960) & (coords[:, 1] >= 64) & (coords[:, 1] < 448)
    rng = np.random.default_rng(0)
    case = rng.standard_normal((len(coords), 16)).astype(np.float32)
    case[lesion, 0] += 6.0
    bags, y = planted_bags(40, dim=16, n_inst=(20, 40), k=4, shift=6.0, seed=1)
    store = write_store(tmp_path / "s.zarr", bags)
    from featstore.store import open_store
    from .conftest import KEY
    st = open_store(store, mode="a")
    st.write_tiling("case", coords, np.ones(len(coords)), {"source": str(slide), "size0": 64, "slide_mpp": 0.5})
    st.write_features("case", KEY, case.astype(np.float16), {"encoder": KEY.encoder, "dim": 16})
    labels = write_labels(tmp_path / "l.csv", [{"slide_id": s, "label": int(c)} for s, c in zip(bags, y)])
    run = tmp_path / "run"
    train_run(RunSpec(store, labels, str(run), "resnet18", 1, n_boot=20),
              TrainConfig(hidden=(32, 16), attn_dim=8, dropout=0.0, lr=3e-3, epochs=12, threads=1))
    res = make_heatmap(run, slide, store, tmp_path / "heat.png", top_k=6, max_size=512)
    assert res.slide_id == "case" and res.scores.shape == (256,)
    assert lesion[res.top].all()                       # every top tile lies in the lesion
    assert res.scores[lesion].mean() > res.scores[~lesion].mean() + 0.3
    assert (tmp_path / "heat.png").stat().st_size > 10_000


def test_the_slide_title_names_the_true_label_and_the_score(tmp_path):
    from mil.heatmap import slide_title
    from mil.run import load_run

    bags, y = planted_bags(20, dim=8, n_inst=(10, 20), seed=4)
    store = write_store(tmp_path / "s.zarr", bags)
    labels = write_labels(tmp_path / "l.csv", [{"slide_id": s, "label": ["normal", "tumor"][int(c)]}
                                                for s, c in zip(bags, y)])
    train_run(RunSpec(store, labels, str(tmp_path / "run"), "resnet18", 1, n_boot=20),
              TrainConfig(hidden=(8,), attn_dim=4, epochs=2))
    run = load_run(tmp_path / "run")
    import csv

    row = next(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    title = slide_title(run, row["slide_id"])
    assert title == (f"{row['slide_id']}: true {row['label']}, P(tumor) = {float(row['probability']):.2f} "
                     f"({row['fold']} test)")
    assert slide_title(run, "never-scored") == "never-scored"
