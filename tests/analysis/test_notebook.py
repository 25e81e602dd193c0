"""CI executes docs/notebooks/explore_store.ipynb on a small generated demo cohort."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from featstore.cohort import discover_slides
from featstore.demo import make_demo_cohort
from featstore.extract import ExtractConfig, Extractor
from featstore.tiling import TilingConfig

NOTEBOOK = Path(__file__).parents[2] / "docs" / "notebooks" / "explore_store.ipynb"


def test_explore_store_notebook_runs_on_the_demo_cohort(tmp_path, monkeypatch):
    labels = make_demo_cohort(tmp_path / "demo", n_slides=6, seed=3)
    cfg = ExtractConfig(encoder="resnet18", levels=(0, 1, 2), input_size=64, precision="fp32",
                        tiling=TilingConfig(patch_size=512, mpp=1.0))
    report = Extractor(cfg).run(discover_slides([tmp_path / "demo" / "slides"]), tmp_path / "cohort.zarr")
    assert report.ok
    monkeypatch.setenv("FEATSTORE_STORE", str(tmp_path / "cohort.zarr"))
    monkeypatch.setenv("FEATSTORE_LABELS", str(labels))
    monkeypatch.setenv("FEATSTORE_NB_PLOT", str(tmp_path / "cka.png"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert (tmp_path / "cka.png").stat().st_size > 1000
    text = "".join(o.get("text", "") for o in outputs)
    assert "resnet18" in text
