"""Published foundation-model tags: the authors' model classes (random weights, reduced depth /
width of the same layout) saved in the authors' key layout, loaded through the tag's mapper,
must give the authors' forward (cosine >= 0.9999) at minus 0 and at a truncated level."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from featstore.encoders import create_encoder, get_spec, parse_levels, registry
from featstore.encoders.foundation import FOUNDATION_TAGS, HOPTIMUS_MEAN, HOPTIMUS_STD
from featstore.errors import WeightsNotFoundError
from tests.featstore.test_weights import _offline_caches  # autouse: empty tmp weights caches

__all__ = ["_offline_caches"]

timm = pytest.importorskip("timm")
SHAPE = {"depth": 3, "embed_dim": 96, "num_heads": 2}      # reduced instance of each layout
DEPTH = SHAPE["depth"]


@pytest.fixture
def tiny(monkeypatch):
    """``tiny(entry, tag)``: register ``test_<tag>`` = *entry* holding only *tag*, reduced to
    :data:`SHAPE`, for this test only (the registry is restored after)."""
    def make(entry: str, tag: str, wspec=None) -> str:
        spec = get_spec(entry)
        w = wspec or spec.weights[tag]
        w = replace(w, timm_kwargs={**w.timm_kwargs, **SHAPE})
        name = f"test_{tag.replace('-', '_')}"
        monkeypatch.setitem(registry._REGISTRY, name, replace(spec, name=name, weights={tag: w}))
        return name
    return make


def _scramble(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm 1/0, LayerScale 1e-5 hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def _pool(tokens: torch.Tensor, pooling: str, prefix: int) -> torch.Tensor:
    cls, mean = tokens[:, 0], tokens[:, prefix:].mean(1)
    return {"cls": cls, "cls+mean": torch.cat([cls, mean], 1)}[pooling]


def _timm_reference(model, x: torch.Tensor, pooling: str) -> dict[int, torch.Tensor]:
    """The authors' (timm) forward: minus 0 = forward_features; minus 1 = norm(block d-2)."""
    seen = {}
    h = model.blocks[DEPTH - 2].register_forward_hook(lambda m, i, o: seen.setdefault(1, o))
    with torch.no_grad():
        full = model.forward_features(x)
        trunc = model.norm(seen[1])
    h.remove()
    p = model.num_prefix_tokens
    return {0: _pool(full, pooling, p), 1: _pool(trunc, pooling, p)}


def _check(name: str, tag: str, path: Path, ref: dict[int, torch.Tensor], x: torch.Tensor) -> dict:
    enc = create_encoder(name, f"{tag}={path}", levels=(0, 1))
    with torch.no_grad():
        got = enc(x)
    for k in (0, 1):
        assert got[k].shape == ref[k].shape, k
        assert _cos(got[k], ref[k]) >= 0.9999, (tag, k, _cos(got[k], ref[k]))
    return enc.provenance()


_SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
# The published timm kwargs (model cards / TRIDENT's loaders), with the reduced SHAPE.
TIMM_CASES = {
    "uni": ("vit_large_patch16_224", {"init_values": 1e-5}, "cls"),
    "uni2-h": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "init_values": 1e-5,
               "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU}, "cls"),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                 "reg_tokens": 4, **_SWIGLU}, "cls+mean"),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5}, "cls"),
    "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "patch_size": 16,
                      "init_values": 1e-5, "mlp_ratio": 5.33334}, "cls"),
    "lunit-dino": ("vit_small_patch16_224", {}, "cls"),
    "kaiko-l14": ("vit_large_patch14_reg4_dinov2", {"img_size": 224}, "cls"),
}
_ENTRY = {"uni": "vit_large_patch16_224", "uni2-h": "vit_giant_patch14_224",
          "virchow2": "vit_huge_patch14_224", "h-optimus-0": "vit_giant_patch14_reg4_dinov2",
          "prov-gigapath": "vit_giant_patch14_reg4_dinov2", "lunit-dino": "vit_small_patch16_224",
          "kaiko-l14": "vit_large_patch14_reg4_dinov2"}


@pytest.mark.parametrize("tag", list(TIMM_CASES))
def test_timm_layout_tags_match_the_authors_timm_model(tag, tmp_path, tiny):
    arch, kwargs, pooling = TIMM_CASES[tag]
    torch.manual_seed(0)
    ref = _scramble(timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **SHAPE))
    path = tmp_path / f"{tag}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 224, 224)
    prov = _check(tiny(_ENTRY[tag], tag), tag, path, _timm_reference(ref, x, pooling), x)
    assert prov["pooling"] == pooling and prov["depth"] == DEPTH
    assert prov["timm_kwargs"]["embed_dim"] == SHAPE["embed_dim"]


def test_virchow2_pools_cls_and_patch_mean_and_records_it(tmp_path, tiny):
    torch.manual_seed(0)
    arch, kwargs, _ = TIMM_CASES["virchow2"]
    ref = _scramble(timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **SHAPE))
    torch.save(ref.state_dict(), tmp_path / "virchow2.bin")
    enc = create_encoder(tiny(_ENTRY["virchow2"], "virchow2"), f"virchow2={tmp_path / 'virchow2.bin'}")
    assert enc.dims == {0: 2 * SHAPE["embed_dim"]} and enc.pooling == "cls+mean"
    assert enc.provenance()["prefix_tokens"] == 5          # CLS + 4 registers, excluded from the mean
    assert enc.provenance()["timm_kwargs"]["reg_tokens"] == 4


def test_hoptimus_and_gigapath_record_their_preprocessing(tmp_path, tiny):
    name = tiny("vit_giant_patch14_reg4_dinov2", "h-optimus-1")
    ref = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                            img_size=224, **SHAPE)
    torch.save(ref.state_dict(), tmp_path / "h1.pth")
    h = create_encoder(name, f"h-optimus-1={tmp_path / 'h1.pth'}")
    assert h.mean == (0.707223, 0.578729, 0.703617) and tuple(h.std) == HOPTIMUS_STD
    assert h.provenance()["preprocessing"]["mean"] == list(HOPTIMUS_MEAN)
    w = get_spec("vit_giant_patch14_reg4_dinov2").weights["prov-gigapath"]
    assert (w.resize_size, w.input_size or 224, w.interpolation) == (256, 224, "bicubic")
    assert HOPTIMUS_MEAN == tuple(get_spec("vit_giant_patch14_reg4_dinov2").weights["h-optimus-0"].mean)


def _hf_reference(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """transformers forward: minus 0 = last_hidden_state CLS; minus 1 = layernorm(hidden_states[d-1])."""
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        trunc = model.layernorm(out.hidden_states[DEPTH - 1])
    return {0: out.last_hidden_state[:, 0], 1: trunc[:, 0]}


def test_phikon_transformers_vit_layout(tmp_path, tiny):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=96, num_hidden_layers=DEPTH, num_attention_heads=2,
                       intermediate_size=384, image_size=224, patch_size=16, qkv_bias=True)
    ref = _scramble(tf.ViTModel(cfg, add_pooling_layer=True))
    path = tmp_path / "phikon.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    assert "encoder.layer.0.attention.attention.query.weight" in ref.state_dict()
    x = torch.randn(2, 3, 224, 224)
    prov = _check(tiny("vit_base_patch16_224", "phikon"), "phikon", path, _hf_reference(ref, x), x)
    assert prov["timm_kwargs"]["norm_eps"] == 1e-12


def test_phikon_v2_transformers_dinov2_layout(tmp_path, tiny):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=96, num_hidden_layers=DEPTH, num_attention_heads=2,
                          mlp_ratio=4, image_size=224, patch_size=16, layerscale_value=1e-5)
    ref = _scramble(tf.Dinov2Model(cfg))
    path = tmp_path / "phikon-v2.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    assert "encoder.layer.0.layer_scale1.lambda1" in ref.state_dict()
    x = torch.randn(2, 3, 224, 224)
    _check(tiny("vit_large_patch16_224", "phikon-v2"), "phikon-v2", path, _hf_reference(ref, x), x)


def _to_facebook_dinov2(sd: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Rename a timm DINOv2-with-registers state dict the way facebookresearch/dinov2 saves it:
    ``register_tokens``, a CLS position inside ``pos_embed`` (1 + 37 x 37 at 518 px), SwiGLU
    ``w12`` / ``w3``, and a ``mask_token``."""
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(1, 1, dim, generator=g) * 0.1
    out = {"mask_token": torch.zeros(1, dim), "register_tokens": sd["reg_token"],
           "cls_token": sd["cls_token"] - p0, "pos_embed": torch.cat([p0, sd["pos_embed"]], 1)}
    for k, v in sd.items():
        if k not in ("reg_token", "cls_token", "pos_embed"):
            out[k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")] = v
    return out


def test_facebookresearch_dinov2_layout_with_registers_swiglu_and_518px_grid(tmp_path, tiny):
    base = get_spec("vit_giant_patch14_reg4_dinov2")
    wspec = replace(base.weights["h-optimus-0"], tag="fb-dinov2", layout="dinov2", hf_repo=None,
                    files=("fb-dinov2.pth",))
    name = tiny(base.name, "fb-dinov2", wspec=wspec)
    torch.manual_seed(0)
    ref = _scramble(timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                      img_size=518, dynamic_img_size=True, **SHAPE))
    fb = _to_facebook_dinov2(ref.state_dict(), SHAPE["embed_dim"])
    assert fb["pos_embed"].shape[1] == 1 + 37 * 37 and "blocks.0.mlp.w12.weight" in fb
    path = tmp_path / "fb-dinov2.pth"
    torch.save(fb, path)
    x = torch.randn(2, 3, 224, 224)      # the reference resamples 37x37 -> 16x16 at run time
    _check(name, "fb-dinov2", path, _timm_reference(ref, x, "cls"), x)


def test_missing_gated_file_names_where_to_put_it_and_the_licence(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(WeightsNotFoundError) as err:
        create_encoder("vit_huge_patch14_224", "virchow2")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "w" / "virchow2.safetensors") in msg
    assert "models--paige-ai--Virchow2" in msg and "huggingface.co/paige-ai/Virchow2" in msg


def test_tag_file_in_featstore_weights_is_found_offline(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("FEATSTORE_WEIGHTS", str(tmp_path))
    torch.manual_seed(0)
    ref = _scramble(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **SHAPE))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "kaiko-s16.safetensors"))
    enc = create_encoder(tiny("vit_small_patch16_224", "kaiko-s16"), "kaiko-s16")
    assert enc.weights_tag == "kaiko-s16" and enc.mean == (0.5, 0.5, 0.5)
    assert torch.equal(enc.full_state_dict()["blocks.0.attn.qkv.weight"], ref.state_dict()["blocks.0.attn.qkv.weight"])


def test_every_tag_has_citation_licence_source_and_a_file_name():
    for w in FOUNDATION_TAGS:
        assert w.citation and w.licence and w.source and w.files, w.tag
        assert w.layout in ("timm", "hf-vit", "dinov2"), w.tag


def test_gigapath_tiles_are_resized_to_256_then_centre_cropped_as_torchvision(tmp_path):
    import numpy as np
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from featstore.read.slide import Slide
    from featstore.synth import rectangles_slide, write_pyramid_tiff
    from featstore.read.tilesource import TileSource

    write_pyramid_tiff(tmp_path / "s.tif", rectangles_slide((768, 768), [(0, 0, 768, 768)], seed=2),
                       mpp=0.5, compression="deflate")
    w = get_spec("vit_giant_patch14_reg4_dinov2").weights["prov-gigapath"]
    pre = {"input_size": 224, "resize_size": w.resize_size, "interpolation": w.interpolation,
           "mean": [0.0] * 3, "std": [1 / 255] * 3}           # normalise to the raw 0..255 values
    xy, size0 = (100, 60), 300
    with TileSource(pre) as src, Slide(tmp_path / "s.tif") as s:
        src.add("s", tmp_path / "s.tif", size0)
        got = src.read("s", np.array([xy]))[0].numpy().astype(np.float64)
        region = torch.from_numpy(s.read_region(xy, 0, (size0, size0))).permute(2, 0, 1)
        plain = s.read_patch(xy, size0, 224, "bicubic").astype(np.float64)
    ref = TF.center_crop(TF.resize(region, [256, 256], InterpolationMode.BICUBIC, antialias=True), [224, 224])
    ref = ref.numpy().astype(np.float64)
    err = np.abs(got - ref).mean()
    assert got.shape == (3, 224, 224) and err <= 0.15, err       # the same resize + crop (PIL rounding)
    assert np.abs(plain.transpose(2, 0, 1) - ref).mean() > 5 * max(err, 0.05)   # no crop differs


def test_minus_all_follows_the_depth_of_the_tag():
    assert parse_levels("all", "vit_giant_patch14_224", weights="uni2-h") == (0, 4, 8, 12, 16, 20)
    assert parse_levels("all", "vit_giant_patch14_224", weights="uni2-h=/x/f.bin")[-1] == 20
    assert parse_levels("all", "vit_giant_patch14_224")[-1] == 36      # the plain 40-block entry
    assert parse_levels("all", "vit_huge_patch14_224", weights="virchow2")[-1] == 28


def test_uni2h_tag_builds_24_blocks_of_1536_with_8_registers():
    spec = get_spec("vit_giant_patch14_224")
    t = registry.tagged_spec(spec, spec.weights["uni2-h"])
    assert len(t.taps) == 24 and set(t.dims) == {1536} and t.taps[0] == "blocks.23"
    assert t.timm_kwargs["reg_tokens"] == 8 and t.timm_kwargs["mlp_layer"] == "swiglu_packed"
    assert registry.tagged_spec(spec, None) is spec and len(spec.taps) == 40   # the entry is unchanged


def test_gigapath_encoder_preprocessing_carries_the_centre_crop_to_every_reader(tmp_path, tiny):
    """The tag's resize 256 -> crop 224 reaches Encoder.preprocessing(), which the extractor and
    the fine-tuner hand to TileSource; entries without a crop keep today's dict."""
    from featstore.read.tilesource import TileSource

    arch, kwargs, _ = TIMM_CASES["prov-gigapath"]
    ref = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **SHAPE)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "g.safetensors"))
    enc = create_encoder(tiny(_ENTRY["prov-gigapath"], "prov-gigapath"),
                         f"prov-gigapath={tmp_path / 'g.safetensors'}")
    pre = enc.preprocessing()
    assert (pre["resize_size"], pre["input_size"], pre["interpolation"]) == (256, 224, "bicubic")
    assert enc.provenance()["preprocessing"]["resize_size"] == 256
    with TileSource(pre) as src:
        assert src.resize_size == 256
    assert "resize_size" not in create_encoder("resnet18").preprocessing()
