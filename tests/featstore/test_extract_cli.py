"""`featstore extract`'s options come from the ExtractConfig / TilingConfig declarations; the command runs."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

import featstore
from featstore.cli import featstore_app
from featstore.config import ExtractConfig
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

#: The command's options before they were generated (names and defaults users rely on).
OPTIONS = {
    "--store": None, "--encoder": None, "--minus": "0", "--weights": "random", "--mpp": None, "--patch-size": None,
    "--overlap": None, "--min-tissue": None, "--mask": None, "--mask-weights": None, "--qc": None, "--resize": None, "--batch-size": 32, "--workers": 0,
    "--precision": "auto", "--device": "auto", "--slide-mpp": None, "--seed": 0, "--allow-download": False,
    "--strict-weights": True, "--cluster": None, "--storage-options": None, "--reader": "auto",
    "--images": None, "--shard-size": 1024, "--stain": "none", "--stain-reference": None, "--stain-tiles": 32,
}


def _params():
    cmd = typer.main.get_command(featstore_app).commands["extract"]
    return {p.opts[0]: p for p in cmd.params if p.opts[0].startswith("--")}


def test_every_option_keeps_its_name_and_default():
    params = _params()
    assert set(params) == set(OPTIONS)
    for name, default in OPTIONS.items():
        assert params[name].default == default, name
    assert "-e" in params["--encoder"].opts and "-m" in params["--minus"].opts and "-s" in params["--store"].opts


def test_help_texts_are_the_declared_ones():
    params = _params()
    ex = {f.name: f.metadata["help"] for f in dataclasses.fields(ExtractConfig)}
    til = {f.name: f.metadata["help"] for f in dataclasses.fields(TilingConfig)}
    assert params["--batch-size"].help == ex["batch_size"]
    assert params["--resize"].help == ex["input_size"]
    assert params["--minus"].help == ex["levels"]
    assert params["--patch-size"].help.startswith(til["patch_size"].rstrip("."))
    assert "or the store's tiling" in params["--patch-size"].help


@pytest.fixture()
def slide_dir(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    write_pyramid_tiff(d / "s1.tif", rectangles_slide((512, 512), [(0, 0, 384, 384)], seed=0), mpp=0.5)
    return d


def test_options_reach_the_config_and_unset_tiling_takes_the_stores(slide_dir, tmp_path):
    store = tmp_path / "c.zarr"
    common = ["extract", str(slide_dir), "--store", str(store), "--encoder", "resnet18", "--resize", "32",
              "--precision", "fp32", "--batch-size", "4", "--workers", "1"]
    res = CliRunner().invoke(featstore_app, [*common, "--minus", "0,2", "--patch-size", "64", "--mpp", "1.0"])
    assert res.exit_code == 0, res.output
    st = featstore.open_store(store)
    assert st.tiling == TilingConfig(patch_size=64, mpp=1.0).to_dict()
    assert {str(k) for k in st.encoders()} == {"resnet18:random-s0:minus0", "resnet18:random-s0:minus2"}
    assert st.provenance("s1", "resnet18", 2)["preprocessing"]["input_size"] == 32
    # no tiling options: the store's tiling is used (the declared 512 px default would be refused)
    res = CliRunner().invoke(featstore_app, [*common, "--minus", "1"])
    assert res.exit_code == 0, res.output
    assert featstore.open_store(store).has_features("s1", "resnet18", 1)


def test_bad_values_are_one_line_before_any_work(slide_dir, tmp_path):
    store = tmp_path / "bad.zarr"
    res = CliRunner().invoke(featstore_app, ["extract", str(slide_dir), "--store", str(store), "--encoder",
                                             "resnet18", "--batch-size", "0"])
    assert res.exit_code == 1 and "--batch-size 0 must be >= 1" in res.stderr
    assert not store.exists()
    res = CliRunner().invoke(featstore_app, ["extract", str(slide_dir), "--store", str(store), "--encoder",
                                             "resnet18", "--minus", "0,x"])
    assert res.exit_code == 1 and "--minus '0,x'" in res.stderr
