"""ViT encoders: registry entries, block truncation == the full network's blocks, pooling,
one pass up to the deepest block, fine-tuning coverage, bf16, extract and checkpoint round trip.

Small models only (ViT-S/16, ViT-S/14 DINOv2 with 4 registers) at 224 px, batch 2, fp32;
ViT-H/g are checked as specs built on the meta device (no memory, no weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from featstore.encoders import create_encoder, get_spec, list_encoders, parse_levels
from featstore.encoders.precision import autocast, cpu_has_native_bf16, prepare_encoder
from featstore.encoders.runners import runner_class
from featstore.errors import EncoderError
from featstore.synth import rectangles_slide

VIT_S = "vit_small_patch16_224"
DINO_S = "vit_small_patch14_reg4_dinov2"
# name -> (depth, token width, prefix tokens = CLS + registers)
ARCH = {
    "vit_small_patch16_224": (12, 384, 1),
    "vit_base_patch16_224": (12, 768, 1),
    "vit_large_patch16_224": (24, 1024, 1),
    "vit_huge_patch14_224": (32, 1280, 1),
    "vit_giant_patch14_224": (40, 1408, 1),
    "vit_small_patch14_reg4_dinov2": (12, 384, 5),
    "vit_base_patch14_reg4_dinov2": (12, 768, 5),
    "vit_large_patch14_reg4_dinov2": (24, 1024, 5),
    "vit_giant_patch14_reg4_dinov2": (40, 1536, 5),
}


def _tiles(n: int = 2, seed: int = 0) -> torch.Tensor:
    """*n* H&E-like 224 px tiles from featstore.synth, ImageNet-normalised."""
    rgb = rectangles_slide((224 * n, 224), [(0, 0, 224 * n, 224)], seed=seed)
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    t = torch.stack(t.split(224, dim=2))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (t - mean) / std


def _normed_blocks(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """norm(blocks[i] output) for every block, hooked in timm's own full forward_features."""
    got: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: got.__setitem__(j, o.clone()))
             for j, b in enumerate(model.blocks)]
    with torch.no_grad():
        final = model.forward_features(x)
        normed = {j: model.norm(o) for j, o in got.items()}
    for h in hooks:
        h.remove()
    assert torch.equal(normed[len(model.blocks) - 1], final)
    return normed


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return _tiles(2, seed=1)


def test_registry_has_one_entry_per_vit_architecture_with_block_levels():
    assert set(ARCH) <= set(list_encoders("vit_*"))
    for name, (depth, dim, _) in ARCH.items():
        spec = get_spec(name)
        assert spec.levels == tuple(range(depth)) and spec.dims == (dim,) * depth, name
        assert spec.taps[0] == f"blocks.{depth - 1}" and spec.taps[-1] == "blocks.0"
        assert spec.all_levels == tuple(range(0, depth, 4)) and spec.pooling == "cls"
        assert spec.timm_kwargs["num_classes"] == 0 and runner_class(spec).__name__ == "TokenRunner"
    assert parse_levels("all", VIT_S) == (0, 4, 8)
    assert parse_levels("all", "vit_large_patch16_224") == (0, 4, 8, 12, 16, 20)
    assert len(parse_levels("all", "vit_giant_patch14_reg4_dinov2")) == 10
    assert get_spec("resnet18").all_levels == get_spec("resnet18").levels   # CNNs: every level
    with pytest.raises(EncoderError, match="levels 0..11"):
        create_encoder(VIT_S, levels=(12,))


@pytest.mark.parametrize("name", sorted(ARCH))
def test_spec_builds_the_published_architecture(name):
    """Built on the meta device: depth, width, registers, LayerScale, SwiGLU as published."""
    import timm

    spec = get_spec(name)
    with torch.device("meta"):
        m = timm.create_model(spec.timm_name, pretrained=False, **runner_class(spec).build_kwargs(spec))
    depth, dim, prefix = ARCH[name]
    assert (len(m.blocks), m.embed_dim, m.num_prefix_tokens) == (depth, dim, prefix)
    dino = spec.family == "dinov2"
    assert isinstance(m.blocks[0].ls1, torch.nn.Identity) != dino      # LayerScale only in DINOv2
    patch = 14 if "patch14" in name else 16
    assert m.pos_embed.shape[1] == (224 // patch) ** 2 + (0 if dino else 1)   # 224 px grid
    swiglu = name == "vit_giant_patch14_reg4_dinov2"
    assert (type(m.blocks[0].mlp).__name__ == "GluMlp") == swiglu
    if swiglu:
        assert m.blocks[0].mlp.fc1.weight.shape == (8192, 1536)


@pytest.mark.parametrize("name", [VIT_S, DINO_S])
def test_truncated_levels_equal_the_full_network_blocks_fp32(name, x):
    enc = create_encoder(name, levels=get_spec(name).levels, seed=3)
    ref = _normed_blocks(enc.model, x)
    depth = len(enc.model.blocks)
    with torch.no_grad():
        together = enc(x)                       # every level from one pass
        for k in (0, 5, depth - 1):
            enc.set_levels((k,))                # truncated: blocks after depth-1-k never run
            assert torch.equal(enc(x)[k], ref[depth - 1 - k][:, 0])
    for k, feats in together.items():
        assert feats.dtype == torch.float32 and torch.equal(feats, ref[depth - 1 - k][:, 0]), k
    with torch.no_grad():
        timm_cls = enc.model.forward_head(enc.model.forward_features(x), pre_logits=True)
    assert torch.equal(together[0], timm_cls)    # minus 0 = timm's own CLS embedding


def test_mean_pooling_excludes_register_tokens(x):
    enc = create_encoder(DINO_S, levels=(0, 6), pooling="mean", seed=4)
    model = enc.model
    assert model.num_prefix_tokens == 5
    with torch.no_grad():
        out = enc(x)
        tokens = model.forward_features(x)                 # (B, 1 + 4 + 256, D)
        model.global_pool = "avg"                          # timm's own patch-token mean
        timm_avg = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(out[0], timm_avg, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], tokens[:, 5:].mean(dim=1), rtol=0, atol=1e-6)
    assert (out[0] - tokens[:, 1:].mean(dim=1)).abs().max() > 1e-4    # registers would change it
    ref = _normed_blocks(model, x)
    torch.testing.assert_close(out[6], ref[11 - 6][:, 5:].mean(dim=1), rtol=0, atol=1e-6)


def test_cls_plus_mean_doubles_the_dim_and_provenance_records_pooling(x):
    both = create_encoder(DINO_S, levels=(0, 4), pooling="cls+mean", seed=2)
    cls = create_encoder(DINO_S, levels=(0, 4), seed=2)
    mean = create_encoder(DINO_S, levels=(0, 4), pooling="mean", seed=2)
    assert both.dims == {0: 768, 4: 768} and cls.dims == {0: 384, 4: 384}
    with torch.no_grad():
        b, c, m = both(x), cls(x), mean(x)
    for k in (0, 4):
        assert b[k].shape == (2, 768)
        assert torch.equal(b[k][:, :384], c[k]) and torch.equal(b[k][:, 384:], m[k])
    prov = both.provenance()
    assert prov["pooling"] == "cls+mean" and "registers excluded" in prov["pooling_note"]
    assert prov["final_norm"] == "every level" and prov["blocks"] == {"0": 11, "4": 7}
    assert prov["dims"] == {"0": 768, "4": 768} and prov["timm_kwargs"]["reg_tokens"] == 4
    assert prov["preprocessing"]["interpolation"] == "bicubic"
    assert create_encoder("resnet18").provenance()["pooling"] == "global average (float32)"
    with pytest.raises(EncoderError, match="pooling 'max' is not one of cls, mean, cls\\+mean"):
        create_encoder(VIT_S, pooling="max")
    with pytest.raises(EncoderError, match="pooling 'cls' is not one of avg"):
        create_encoder("resnet18", pooling="cls")


def test_one_pass_runs_each_block_once_and_stops_at_the_deepest(x):
    enc = create_encoder(VIT_S, levels=(4, 8), seed=1)
    calls = [0] * 12
    for j, b in enumerate(enc.model.blocks):
        b.register_forward_hook(lambda *a, j=j: calls.__setitem__(j, calls[j] + 1))
    norms: list[int] = []
    enc.model.norm.register_forward_hook(lambda *a: norms.append(1))
    with torch.no_grad():
        enc(x)
    assert calls == [1] * 8 + [0] * 4 and len(norms) == 2     # blocks 0..7 (minus 4 = block 7)
    calls[:] = [0] * 12
    enc.set_levels((0, 4, 8))
    with torch.no_grad():
        enc(x)
    assert calls == [1] * 12


def test_trainable_parameters_are_exactly_those_forward_uses(x):
    enc = create_encoder(DINO_S, levels=(8,), seed=0)
    names = [n for n, _ in enc.stage_modules()]
    assert names == ["patch_embed", "pos_drop", "patch_drop", "norm_pre",
                     "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm"]
    trainable = {id(p) for p in enc.trainable_parameters()}
    enc.train()
    enc.model.zero_grad(set_to_none=True)
    enc(x)[8].square().sum().backward()
    got_grad = {id(p) for p in enc.model.parameters() if p.grad is not None}
    assert got_grad == trainable
    assert id(enc.model.reg_token) in trainable and id(enc.model.blocks[4].attn.qkv.weight) not in trainable


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx)")
def test_bf16_levels_are_close_to_fp32():
    x = _tiles(2, seed=5)
    enc = create_encoder(VIT_S, levels=(0, 4, 8), seed=6)
    with torch.no_grad():
        ref = enc(x)
        prepare_encoder(enc, "bf16", "cpu")
        with autocast("bf16", "cpu"):
            low = enc(x)
    for k in ref:
        assert low[k].dtype == torch.float32
        cos = F.cosine_similarity(low[k], ref[k], dim=1)
        assert cos.min().item() >= 0.999, (k, cos)


def test_save_encoder_round_trip_keeps_the_timm_layout(tmp_path, x):
    from featstore.checkpoint import save_encoder

    enc = create_encoder(VIT_S, levels=(0, 4, 8), seed=2)
    with torch.no_grad():                       # a "fine-tuned" first block
        enc.model.blocks[0].mlp.fc1.weight.mul_(1.5)
        want = enc(x)
    sd = enc.full_state_dict()
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(sd)
    path = save_encoder(enc, tmp_path / "vit.pt", level=4)
    back = create_encoder(VIT_S, str(path), levels=(0, 4, 8))
    with torch.no_grad():
        got = back(x)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert back.provenance()["finetuned"]["level"] == 4


def test_extract_a_vit_into_a_store_equals_a_direct_forward(tmp_path):
    import featstore
    from featstore.cohort import discover_slides
    from featstore.extract import ExtractConfig, Extractor
    from featstore.read.slide import Slide
    from featstore.synth import write_pyramid_tiff
    from featstore.tiling import TilingConfig, tile_slide

    tiling = TilingConfig(patch_size=128, mpp=1.0)
    (tmp_path / "in").mkdir()
    write_pyramid_tiff(tmp_path / "in" / "v1.tif",
                       rectangles_slide((768, 512), [(0, 0, 768, 512)], seed=7), mpp=0.5)
    cfg = ExtractConfig(encoder=VIT_S, weights="random", levels=(0, 4, 8), tiling=tiling,
                        precision="fp32", batch_size=4, workers=1)
    refs = discover_slides([tmp_path / "in"])
    assert Extractor(cfg).run(refs, tmp_path / "v.zarr").ok
    st = featstore.open_store(tmp_path / "v.zarr")
    enc = create_encoder(VIT_S, levels=(0, 4, 8))
    with Slide(refs[0].path) as slide:
        tiles = tile_slide(slide, tiling)
        batch = np.stack([slide.read_patch(tuple(c), tiles.size0, 224, interpolation="bicubic")
                          for c in tiles.coords[:2]])
    xb = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    xb = (xb - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = enc(xb)
    for lv in (0, 4, 8):
        got = st.features("v1", VIT_S, lv)[:2].astype(np.float32)
        assert got.shape == (2, 384)
        np.testing.assert_allclose(got, want[lv].numpy().astype(np.float16).astype(np.float32),
                                   rtol=0, atol=2e-3)
    prov = st.provenance("v1", VIT_S, 4)
    assert prov["pooling"] == "cls" and prov["final_norm"] == "every level"
    assert prov["minus"] == 4 and prov["blocks"]["4"] == 7 and prov["dim"] == 384


def test_cli_lists_vits_with_levels_and_pooling(monkeypatch):
    from featstore.cli import featstore_app

    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(featstore_app, ["encoders", "vit_large_patch16*"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "vit_large_patch16_224" in out and "vit_small" not in out
    assert "0: 1024  blocks.23" in out and "20: 1024  blocks.3" in out and "blocks.22" not in out
    assert "any 0..23" in out and "cls (default)" in out and "cls+mean" in out
