"""The segmentation init table from >= 3 seeds: Welch p against the baseline init equals scipy's
on the per-seed Dice values, in-domain and out-of-domain rows side by side, the plot written."""

from __future__ import annotations

import csv

import numpy as np
from scipy import stats

from featstore import create_encoder
from featstore.checkpoint import save_encoder
from featstore.synth import write_gland_dataset
from mil.seg.run import load_folder, run_segmentation
from mil.seg.compare import compare_seg, read_seg_records
from mil.seg.train import SegConfig


def test_init_table_with_welch_p_from_three_seeds(tmp_path):
    write_gland_dataset(tmp_path / "he", 12, seed=0, size=(64, 64))
    write_gland_dataset(tmp_path / "dark", 4, seed=1, size=(64, 64), style="he-dark")
    other = save_encoder(create_encoder("resnet18", "random", levels=(0,), seed=99), tmp_path / "other" / "encoder.pt",
                         level=0)
    for weights in ("random", str(other)):
        for seed in (0, 1, 2):
            cfg = SegConfig(encoder="resnet18", weights=weights, epochs=1, crop=64, batch_size=4, seed=seed,
                            n_boot=0, val=0.2, test=0.25)
            run_segmentation(cfg, load_folder(tmp_path / "he" / "images", None, cfg),
                             tmp_path / "runs" / f"{len(weights)}-{seed}", [load_folder(tmp_path / "dark" / "images", None, cfg)])
    records = read_seg_records([tmp_path / "runs"])
    assert len(records) == 12 and {r["method"] for r in records} == {"unet test", "unet ood:dark"}
    files = compare_seg(records, tmp_path / "cmp")
    rows = list(csv.DictReader(open(files["table_csv"])))
    assert len(rows) == 4            # 2 inits x 2 evaluation sets
    for method in ("unet test", "unet ood:dark"):
        base = [r["dice"] for r in records if r["method"] == method and r["weights"] == "random"]
        alt = [r["dice"] for r in records if r["method"] == method and r["weights"] != "random"]
        row = next(r for r in rows if r["method"] == method and r["weights"] != "random")
        want = stats.ttest_ind(alt, base, equal_var=False).pvalue
        assert row["baseline"] == "random" and row["seeds"] == "0;1;2"
        assert (np.isnan(want) and row["dice_p_welch"] in ("", "nan")) or abs(float(row["dice_p_welch"]) - want) < 1e-6
    assert files["dice_plot"].stat().st_size > 0 and "Segmentation transfer" in files["table_md"].read_text()
