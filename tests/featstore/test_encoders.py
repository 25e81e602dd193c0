"""Encoder zoo: registry, dims per level, truncation == full-network taps, one pass, precision."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from featstore.encoders import (
    autocast,
    create_encoder,
    get_spec,
    list_encoders,
    parse_levels,
    prepare_encoder,
    resolve_precision,
)
from featstore.encoders.precision import cpu_has_native_bf16
from featstore.errors import EncoderError, WeightsNotFoundError

# The documented table (docs/encoders.md; the issue): minus0..minus3.
DOCUMENTED = {
    "resnet18": (512, 256, 128, 64),
    "resnet34": (512, 256, 128, 64),
    "resnet50": (2048, 1024, 512, 256),
    "densenet121": (1024, 1024, 512, 256),
    "densenet169": (1664, 1280, 512, 256),
    "efficientnet_b0": (1280, 320, 112, 40),
    "efficientnet_b1": (1280, 320, 112, 40),
    "efficientnet_b2": (1408, 352, 120, 48),
    "efficientnet_b3": (1536, 384, 136, 48),
}


def _tiles(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """H&E-like tiles (pink stroma, purple nuclei), ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    img = np.empty((n, size, size, 3), np.float32)
    img[:] = (0.93, 0.72, 0.82)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(12):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(2, 6))]
            img[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.45, 0.25, 0.6)
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    t = torch.from_numpy(img.clip(0, 1)).permute(0, 3, 1, 2)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (t - mean) / std


def _full_taps(enc, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Pooled outputs of the tap modules during the FULL timm model's own forward()."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for k in enc.spec.levels:
        mod = enc.model.get_submodule(enc.spec.taps[k])
        handles.append(mod.register_forward_hook(
            lambda m, i, o, k=k: got.__setitem__(k, o.float().mean(dim=(2, 3)).clone())))
    with torch.no_grad():
        enc.model(x)
    for h in handles:
        h.remove()
    return got


def test_registry_lists_the_zoo_with_wildcards():
    assert set(DOCUMENTED) <= set(list_encoders())
    assert list_encoders("res*") == ["resnet18", "resnet34", "resnet50"]
    assert list_encoders("efficientnet_b[0-1]") == ["efficientnet_b0", "efficientnet_b1"]
    with pytest.raises(EncoderError, match="unknown encoder 'vgg16'"):
        get_spec("vgg16")


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_encoder_has_the_documented_dims(name):
    spec = get_spec(name)
    assert spec.dims[:4] == DOCUMENTED[name]
    enc = create_encoder(name, levels=spec.levels)
    with torch.no_grad():
        out = enc(_tiles(2, 64))
    assert sorted(out) == list(spec.levels)
    for k, feats in out.items():
        assert feats.shape == (2, spec.dims[k]) and feats.dtype == torch.float32
        assert torch.isfinite(feats).all()
    assert enc.dims == dict(zip(spec.levels, spec.dims))


def test_spec_preprocessing_matches_the_imagenet_weights_config():
    from timm.models import get_pretrained_cfg

    for name in DOCUMENTED:
        spec = get_spec(name)
        cfg = get_pretrained_cfg(spec.weights["imagenet"].hf_repo.split("/", 1)[1])
        assert cfg.input_size[-1] == spec.input_size, name
        assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std, name


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_truncated_levels_equal_the_full_network_taps(name):
    spec = get_spec(name)
    x = _tiles(2, 64, seed=1)
    enc = create_encoder(name, seed=3)
    full = _full_taps(enc, x)
    for k in spec.levels:
        enc.set_levels((k,))            # truncated: runs only the steps up to taps[k]
        with torch.no_grad():
            got = enc(x)[k]
        torch.testing.assert_close(got, full[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_one_pass_multi_level_equals_single_level_forwards(name):
    x = _tiles(2, 64, seed=2)
    enc = create_encoder(name, levels=(0, 1, 2, 3), seed=5)
    with torch.no_grad():
        together = enc(x)
        for k in (0, 1, 2, 3):
            enc.set_levels((k,))
            torch.testing.assert_close(enc(x)[k], together[k], rtol=0, atol=1e-6)


def test_minus3_alone_does_not_run_deeper_stages():
    enc = create_encoder("densenet121", levels=(3,))
    ran: list[str] = []
    for name, module in enc.model.named_children():
        for sub, m in module.named_children():
            m.register_forward_hook(lambda *a, n=f"{name}.{sub}": ran.append(n))
    with torch.no_grad():
        enc(_tiles(1, 64))
    assert ran[-1] == "features.denseblock1"
    assert not {"features.transition1", "features.denseblock2", "features.norm5"} & set(ran)
    deep = {"features.denseblock2", "features.denseblock3", "features.denseblock4"}
    assert not deep & {n for n, _ in enc.stage_modules()}


def test_levels_are_validated():
    with pytest.raises(EncoderError, match="levels 0..4"):
        create_encoder("resnet18", levels=(7,))
    with pytest.raises(EncoderError, match="at least one level"):
        create_encoder("resnet18", levels=())


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_encoder("resnet18", seed=7)
    after = torch.rand(1)
    b = create_encoder("resnet18", seed=7)
    c = create_encoder("resnet18", seed=8)
    assert torch.equal(before, after)
    sa, sb, sc = a.full_state_dict(), b.full_state_dict(), c.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert a.weights_tag == "random-s7" and a.provenance()["seed"] == 7


def test_trainable_prefix_and_batchnorm_eval_for_fine_tuning():
    enc = create_encoder("resnet18", levels=(1,))
    names = [n for n, _ in enc.stage_modules()]
    assert names[-1] == "layer3" and "layer4" not in names
    ids = {id(p) for p in enc.trainable_parameters()}
    assert id(enc.model.layer3[0].conv1.weight) in ids
    assert id(enc.model.layer4[0].conv1.weight) not in ids
    enc.train()
    enc.set_batchnorm_eval()
    assert enc.model.layer1[0].conv1.training and not enc.model.layer1[0].bn1.training


def test_resolve_precision_by_device_and_override():
    assert resolve_precision("auto", "cuda") == "fp16"
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("BF16", "cpu") == "bf16"
    with pytest.raises(EncoderError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_bf16_features_are_float32_and_close_to_fp32(name):
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16/amx); auto precision is fp32 here")
    x = _tiles(4, 96, seed=4)
    enc = create_encoder(name, levels=(0, 1, 2, 3))
    with torch.no_grad():
        ref = enc(x)
        prepare_encoder(enc, "bf16", "cpu")
        with autocast("bf16", "cpu"):
            low = enc(x)
    assert enc.channels_last
    for k in ref:
        assert low[k].dtype == torch.float32
        cos = F.cosine_similarity(low[k], ref[k], dim=1)
        assert cos.min().item() >= 0.999, (k, cos)


def test_cli_lists_encoders_levels_and_weights(tmp_path, monkeypatch):
    from featstore.cli import featstore_app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("COLUMNS", "200")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(create_encoder("resnet18").full_state_dict(), ckpt / "resnet18-f37072fd.pth")
    res = CliRunner().invoke(featstore_app, ["encoders", "resnet1*"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "resnet18" in out and "resnet34" not in out
    assert "0:  512" in out and "3:   64" in out
    assert "imagenet  present" in out and "ciga-simclr  missing" in out
    assert "pytorchnative_tenpercent_resnet18.ckpt" in out
    res = CliRunner().invoke(featstore_app, ["encoders", "vgg*"])
    assert res.exit_code == 1


def test_parse_levels_one_parser_for_every_command():
    assert parse_levels("1") == (1,)
    assert parse_levels("3, 0,1,1") == (0, 1, 3)          # sorted, unique
    assert parse_levels(None) is None and parse_levels("") is None and parse_levels("  ") is None
    assert parse_levels("all", "resnet18") == (0, 1, 2, 3, 4)
    assert parse_levels("ALL", "efficientnet_b0") == tuple(get_spec("efficientnet_b0").levels)
    assert parse_levels("all") == (0, 1, 2, 3)
    with pytest.raises(EncoderError, match=r"--minus '0,x': give levels as comma-separated integers"):
        parse_levels("0,x")
    with pytest.raises(EncoderError, match=r"--levels '-1': levels are integers >= 0"):
        parse_levels("-1", option="--levels")
    with pytest.raises(EncoderError, match="integers"):
        parse_levels(",")
    with pytest.raises(EncoderError, match="unknown encoder 'vgg'"):
        parse_levels("all", "vgg")


def test_create_encoder_leaves_the_hub_setting_alone_and_fails_fast_offline(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from featstore.core.runtime import hub_offline as offline

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("FEATSTORE_WEIGHTS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with offline():      # huggingface_hub reads only its import-time copy: both are set inside
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    create_encoder("resnet18")
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="resnet18 weights 'imagenet' not found offline; put the file at") as e:
        create_encoder("resnet18", "imagenet")
    assert time.perf_counter() - t0 < 2.0 and "\n" not in str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(e.value)
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")       # the caller's own setting is put back as it was
    create_encoder("resnet18")
    assert os.environ["HF_HUB_OFFLINE"] == "0"
