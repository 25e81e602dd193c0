"""The study report states the stain setting, and with normalisation shows the QC picture and
the stain-vector angles of the features it trained on."""

from __future__ import annotations


import featstore
from featstore.cohort import discover_slides
from featstore.extract import ExtractConfig, Extractor
from featstore.synth import write_gland_slides
from featstore.tiling import TilingConfig
from mil.study.report import SlideReport, _stain_section, stain_note


def test_report_stain_section(tmp_path):
    ref, _ = write_gland_slides(tmp_path / "a", 1, seed=0, grid=3)
    other, _ = write_gland_slides(tmp_path / "b", 2, seed=1, style="he-dark", grid=3)
    extract = {"stain": "macenko", "stain_reference": str(ref / "case0.tiff"), "stain_tiles": 9}
    ex = Extractor(ExtractConfig(encoder="resnet18", weights="random", input_size=96, precision="fp32", levels=(0,),
                                 tiling=TilingConfig(patch_size=96, mpp=0.5, min_tissue=0.1), **extract))
    ex.run(discover_slides([other]), tmp_path / "s.zarr")
    study = SlideReport(name="s", out=tmp_path, new_work={}, failures=[], seconds=0.0, extract=extract,
                        weights_used={("resnet18", "random"): ex.feature_tag}, plans=[("resnet18", "random", [0])])
    lines = _stain_section(study, featstore.open_store(tmp_path / "s.zarr"), tmp_path / "report")
    text = "\n".join(lines)
    assert "**macenko**" in text and "case0.tiff" in text and "stain-qc.png" in text
    assert (tmp_path / "report" / "stain-qc.png").is_file() and study.failures == []
    rows = [ln for ln in lines if ln.startswith("| case")]
    assert len(rows) == 2 and all(float(r.split("|")[3]) < 4 < float(r.split("|")[2]) for r in rows)
    assert stain_note({}) == "Stain: raw tiles (no stain normalisation)."
