"""The encoder inside the segmentation model computes exactly what the registry's encoder
computes for the same weights (random seeds, a weights file), for several CNN families."""

from __future__ import annotations

import pytest
import torch

from featstore import create_encoder
from featstore.checkpoint import save_encoder
from mil.seg.errors import SegError
from mil.seg.model import build_segmenter


@pytest.mark.parametrize("name, level", [("resnet18", 0), ("densenet121", 0), ("efficientnet_b0", 1)])
def test_the_decoder_sees_the_registry_encoders_features(name, level):
    model, _ = build_segmenter("unet", name, "random", seed=3)
    ref = create_encoder(name, "random", levels=(level,), seed=3).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        deepest = model.encoder(x)[-1]
        pooled, want = deepest.mean((2, 3)), ref(x)[level]
        other = create_encoder(name, "random", levels=(level,), seed=4).eval()(x)[level]
    scale = want.abs().max()
    assert (pooled - want).abs().max() <= 1e-5 * scale
    assert (other - want).abs().max() > 0.1 * scale                    # another seed: other weights, other output


def test_a_weights_file_lands_in_the_segmenter_and_unetplusplus_builds(tmp_path):
    enc = create_encoder("resnet18", "random", levels=(0,), seed=11)
    path = save_encoder(enc, tmp_path / "ft" / "encoder.pt", level=0)
    model, built = build_segmenter("unetplusplus", "resnet18", str(path), seed=0)
    src = enc.full_state_dict()
    assert built.weights_tag.startswith("file-ft-")
    for key, value in model.encoder.model.state_dict().items():
        assert torch.equal(value, src[key]), key
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_refusals_name_the_problem():
    with pytest.raises(SegError, match="--arch 'fpnx'"):
        build_segmenter("fpnx", "resnet18")
    with pytest.raises(SegError, match="ViT"):
        build_segmenter("unet", "vit_small_patch16_224")
