"""`featstore extract --stain`: a normaliser fitted to a reference slide, applied to every tile
before the encoder; normalised features keyed beside the raw ones, the setting in provenance,
and tiles read again (fine-tuning) normalised the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featstore
from featstore.cohort import discover_slides
from featstore.errors import FeatstoreError
from featstore.extract import ExtractConfig, Extractor
from featstore.stain import normaliser_of, stain_angle, stain_vectors
from featstore.synth import write_gland_slides
from featstore.tags import WeightsTag
from featstore.tiling import TilingConfig
from featstore.read.tilesource import TileSource

TILING = TilingConfig(patch_size=96, mpp=0.5, min_tissue=0.1)
ENC = dict(encoder="resnet18", weights="random", input_size=96, precision="fp32", batch_size=8, levels=(0,),
           tiling=TILING)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    ref, _ = write_gland_slides(root / "a", 1, seed=0, style="he", grid=3)
    other, _ = write_gland_slides(root / "b", 2, seed=1, style="he-dark", grid=3)
    return ref / "case0.tiff", other


def _angles(tiles: np.ndarray, ref_vectors: np.ndarray) -> list[float]:
    return [stain_angle(stain_vectors(t), ref_vectors) for t in tiles]


def test_macenko_features_beside_raw_ones_and_the_tiles_move_to_the_reference(sites, tmp_path):
    ref_slide, other = sites
    refs = discover_slides([other])
    store = tmp_path / "b.zarr"
    Extractor(ExtractConfig(**ENC)).run(refs, store)
    ex = Extractor(ExtractConfig(**ENC, stain="macenko", stain_reference=str(ref_slide), stain_tiles=9))
    report = ex.run(refs, store)
    assert not report.failed
    tag = WeightsTag.parse(ex.feature_tag)
    assert tag.weights == "random-s0" and tag.stain.startswith("macenko-")
    st = featstore.open_store(store)
    assert {k.weights for k in st.encoders()} == {"random-s0", ex.feature_tag}
    assert st.resolve_key("resnet18", 0, "random-s0-stain-macenko").weights == ex.feature_tag
    assert st.resolve_key("resnet18", 0, "random-s0").weights == "random-s0"     # raw stays reachable
    sid = st.slide_ids()[0]
    raw, normed = st.features(sid, "resnet18", 0, "random-s0"), st.features(sid, "resnet18", 0, ex.feature_tag)
    assert raw.shape == normed.shape and not np.allclose(raw, normed)
    prov = st.provenance(sid, "resnet18", 0, ex.feature_tag)
    assert prov["stain"]["method"] == "macenko" and prov["stain"]["sha256"][:8] == tag.stain.split("-")[1]
    assert "case0.tiff" in prov["stain"]["source"] and prov["weights"] == "random-s0"
    assert st.provenance(sid, "resnet18", 0, "random-s0")["stain"] == {"method": "none"}
    # the tiles as fine-tuning reads them again: normalised by the recorded normaliser, their
    # stain vectors close to the reference slide's, the raw ones far from them
    norm = normaliser_of(prov)
    ref_vec = stain_vectors(np.concatenate([t for t in _reference(ref_slide)], axis=0))
    identity = {"input_size": 96, "mean": (0, 0, 0), "std": (1 / 255,) * 3}     # read() gives 0-255 back
    with TileSource.from_store(st, [sid], identity) as plain, \
            TileSource.from_store(st, [sid], identity, stain=norm) as stained:
        coords = st.coords(sid)[:6]
        before = plain.read(sid, coords).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        after = stained.read(sid, coords).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    a0, a1 = _angles(before, ref_vec), _angles(after, ref_vec)
    assert min(a0) > 8 and max(a1) < 4, (a0, a1)      # measured: 18.7-22.4 degrees before, 0.6-0.8 after


def _reference(path):
    from featstore.stain.reference import reference_tiles

    return reference_tiles(path, tiles=9, tiling=TILING, input_size=96)


def test_bad_stain_settings_are_one_line(sites, tmp_path):
    with pytest.raises(FeatstoreError, match="needs --stain-reference"):
        ExtractConfig(**ENC, stain="macenko")
    with pytest.raises(FeatstoreError, match="--stain 'vahadane'"):
        ExtractConfig(**ENC, stain="vahadane", stain_reference="x.png")
    with pytest.raises(FeatstoreError, match="not found"):
        Extractor(ExtractConfig(**ENC, stain="reinhard", stain_reference=str(tmp_path / "nope.png")))
    white = tmp_path / "white.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(white)
    with pytest.raises(FeatstoreError) as e:
        Extractor(ExtractConfig(**ENC, stain="macenko", stain_reference=str(white)))
    assert "white.png" in str(e.value) or "tissue" in str(e.value)


def test_stain_qc_uses_the_recorded_normaliser_and_refuses_raw_features(sites, tmp_path):
    from typer.testing import CliRunner

    from featstore.cli import featstore_app

    ref_slide, other = sites
    store = tmp_path / "q.zarr"
    refs = discover_slides([other])
    Extractor(ExtractConfig(**ENC)).run(refs, store)
    Extractor(ExtractConfig(**ENC, stain="macenko", stain_reference=str(ref_slide), stain_tiles=9)).run(refs, store)
    r = CliRunner().invoke(featstore_app, ["stain-qc", "--store", str(store), "--encoder", "resnet18", "--weights",
                                           "random-s0-stain-macenko", "--out", str(tmp_path / "qc.png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(tmp_path / "qc.png").size[1] > 2 * 96     # two slides' rows
    from featstore.stain.qc import stain_qc

    qc = stain_qc(featstore.open_store(store), "resnet18", 0, "random-s0-stain-macenko")
    assert len(qc.angles) == 2 and all(before > 8 and after < 4 for before, after in qc.angles.values()), qc.angles
    r = CliRunner().invoke(featstore_app, ["stain-qc", "--store", str(store), "--encoder", "resnet18", "--weights",
                                           "random-s0", "--out", str(tmp_path / "raw.png")])
    assert r.exit_code == 1 and "raw tiles" in r.output
