"""Fixtures of the pretraining tests: a tiny ViT entry and a real store of tiled slides."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from featstore.cohort import SlideRef
from featstore.encoders import get_spec, registry
from featstore.encoders.registry import block_levels
from featstore.extract import ExtractConfig, Extractor
from featstore.synth import he_image, write_pyramid_tiff
from featstore.tiling import TilingConfig

TINY = "test_tiny_vit"


def tiny_vit_spec():
    """ViT-S/16's entry reduced to 2 blocks x 64 at 64 px (16 patches): same code paths, fast."""
    spec = get_spec("vit_small_patch16_224")
    return replace(spec, name=TINY, **block_levels(2, 64, 4), input_size=64, weights={},
                   timm_kwargs={**spec.timm_kwargs, "img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2})


def register_tiny() -> str:
    """Register the tiny entry for this process (subprocess tests call it)."""
    registry._REGISTRY[TINY] = tiny_vit_spec()
    return TINY


TINY_CNN = "test_r18_64"


@pytest.fixture
def tiny_cnn(monkeypatch) -> str:
    """resnet18's entry at 64 px input: the CNN methods' code paths at 1/12 of the pixels."""
    monkeypatch.setitem(registry._REGISTRY, TINY_CNN, replace(get_spec("resnet18"), name=TINY_CNN, input_size=64,
                                                             weights={}))
    return TINY_CNN


@pytest.fixture
def tiny_vit(monkeypatch) -> str:
    monkeypatch.setitem(registry._REGISTRY, TINY, tiny_vit_spec())
    return TINY


def make_store(d: Path, n_slides: int = 3, side: int = 512) -> Path:
    """*n_slides* H&E-like slides tiled into 64-px patches at 0.5 µm/px (an extraction's store)."""
    refs = []
    for i in range(n_slides):
        rgb = he_image(np.ones((side // 16, side // 16), bool), (side, side), np.random.default_rng(i))
        refs.append(SlideRef(f"s{i}", write_pyramid_tiff(d / f"s{i}.tif", rgb, 0.5)))
    cfg = ExtractConfig(encoder="resnet18", levels=(0,), input_size=32, precision="fp32", batch_size=64,
                        tiling=TilingConfig(patch_size=64, mpp=0.5, min_tissue=0.0))
    Extractor(cfg).run(refs, d / "store.zarr")
    return d / "store.zarr"


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("pretrain"))
