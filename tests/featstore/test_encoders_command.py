"""`featstore encoders`: each weights tag is listed with its own dim (and depth / pooling) where
it differs from the entry's, computed from the registry without building a model."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from featstore.encoders import get_spec, list_encoders
from featstore.encoders.foundation import build_kwargs
from featstore.encoders.registry import tagged_spec
from featstore.encoders.runners import runner_class
from featstore.encoders.vit import POOLINGS


@pytest.fixture
def listing(tmp_path, monkeypatch):
    """Run `featstore encoders PATTERN --no-paths` with no weights file anywhere; the output."""
    from featstore.cli import featstore_app

    for var in ("FEATSTORE_WEIGHTS", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("COLUMNS", "250")

    def run(pattern: str) -> str:
        res = CliRunner().invoke(featstore_app, ["encoders", pattern, "--no-paths"])
        assert res.exit_code == 0, res.output
        return res.output

    return run


def test_foundation_tags_show_their_own_dim(listing):
    out = listing("vit_giant_patch14_224")
    assert "0: 1408  blocks.39" in out                      # the entry's own levels, unchanged
    assert "uni2-h (1536-d, 24 blocks)  missing" in out      # width 1536, depth 24
    out = listing("vit_huge_patch14_224")
    assert "0: 1280  blocks.31" in out and "cls (default)" in out
    assert "virchow2 (2560-d, cls+mean)  missing" in out     # CLS + patch mean, 2 x 1280
    out = listing("vit_large_patch16_224")
    assert "uni  missing" in out and "phikon-v2  missing" in out   # same dim: no note
    out = listing("vit_giant_patch14_reg4_dinov2")
    assert "h-optimus-0  missing" in out and "prov-gigapath  missing" in out  # 16 px patches: same dim


def test_cnn_rows_are_unchanged(listing):
    out = listing("resnet50")
    assert "0: 2048  layer4" in out and "4:   64  act1" in out and "avg (default)" in out
    assert "imagenet  missing" in out and "mormont-mtdp  missing" in out and "kang-bt  missing" in out
    assert "-d" not in out and "blocks)" not in out


def _meta_note(name: str, tag: str) -> str:
    """The note the listing should show, from the tagged model built on the meta device."""
    import timm

    spec = get_spec(name)
    tagged = tagged_spec(spec, spec.weights[tag])
    with torch.device("meta"):
        model = timm.create_model(tagged.timm_name, pretrained=False,
                                  **build_kwargs(runner_class(tagged).build_kwargs(tagged)))
    assert model.num_features == tagged.dims[0]
    dim = model.num_features * POOLINGS[tagged.pooling].width
    parts = [f"{dim}-d"] if dim != spec.dims[0] * POOLINGS[spec.pooling].width else []
    if len(model.blocks) != len(spec.taps):
        parts.append(f"{len(model.blocks)} blocks")
    if tagged.pooling != spec.pooling:
        parts.append(tagged.pooling)
    return f" ({', '.join(parts)})" if parts else ""


def test_every_tag_note_matches_the_model_built_on_meta(listing, monkeypatch):
    vit_tags = [(n, t) for n in list_encoders("vit_*") for t in get_spec(n).weights]
    assert ("vit_huge_patch14_224", "virchow2") in vit_tags and len(vit_tags) >= 10
    want = {(n, t): _meta_note(n, t) for n, t in vit_tags}
    assert want[("vit_giant_patch14_224", "uni2-h")] == " (1536-d, 24 blocks)"
    assert want[("vit_huge_patch14_224", "virchow2")] == " (2560-d, cls+mean)"

    import timm

    def no_build(*a, **k):
        raise AssertionError("`featstore encoders` must not build a model")

    monkeypatch.setattr(timm, "create_model", no_build)
    out = listing("*")
    for (name, tag), note in want.items():
        assert f"{tag}{note}  missing" in out, (name, tag, note)
    cnn_tags = {t for n in list_encoders("*") if not n.startswith("vit_") for t in get_spec(n).weights}
    for tag in cnn_tags:
        assert f"{tag}  missing" in out, tag
