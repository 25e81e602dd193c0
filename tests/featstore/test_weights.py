"""Weights: offline lookup, torchvision/timm/prefixed/safetensors/paper layouts, safety, round trip."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from featstore.checkpoint import file_sha256
from featstore.checkpoint import save_encoder as save_encoder_checkpoint
from featstore.encoders import create_encoder
from featstore.encoders.papers import LUNIT_MEAN, LUNIT_STD
from featstore.errors import EncoderError, WeightsError, WeightsNotFoundError


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path, monkeypatch):
    """Point every weights cache at empty tmp dirs: no test sees the user's files."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("FEATSTORE_WEIGHTS", raising=False)


def _hub(tmp_path: Path) -> Path:
    d = tmp_path / "torch" / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _reference(name: str, seed: int = 11) -> dict[str, torch.Tensor]:
    """A full timm state dict with weights unlike the default seed-0 init."""
    return {k: v.clone() for k, v in create_encoder(name, seed=seed).full_state_dict().items()}


def _assert_loaded(enc, ref: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = enc.full_state_dict()
    for k, v in ref.items():
        if k.startswith(skip) or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got[k], v), k


def _tv_resnet(ref):
    """torchvision ResNet keys are timm's: conv1, bn1, layerN.M.convK, downsample.0/1, fc."""
    return dict(ref)


def _tv_densenet_legacy(ref):
    """Old torchvision DenseNet files: 'norm.1', 'conv.2' ... and no num_batches_tracked."""
    pat = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")
    return {pat.sub(r"\1.\2.", k): v for k, v in ref.items() if "num_batches_tracked" not in k}


def test_torchvision_resnet_file_loads_bit_exact(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    sd = tv.models.resnet18(weights=None).state_dict()   # the real torchvision layout
    torch.save(sd, tmp_path / "tv_resnet18.pth")
    enc = create_encoder("resnet18", str(tmp_path / "tv_resnet18.pth"))
    _assert_loaded(enc, sd)
    assert enc.weights_tag == f"file-tv_resnet18-{file_sha256(tmp_path / 'tv_resnet18.pth')[:8]}"


def test_torchvision_densenet_legacy_keys_load_as_imagenet_from_torch_hub(tmp_path):
    ref = _reference("densenet121")
    sd = _tv_densenet_legacy(ref)
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    path = _hub(tmp_path) / "densenet121-a639ec97.pth"
    torch.save(sd, path)
    enc = create_encoder("densenet121", "imagenet", levels=(1,))
    _assert_loaded(enc, ref)
    prov = enc.provenance()
    assert prov["weights"] == "imagenet" and prov["weights_path"] == str(path.resolve())
    assert prov["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_safetensors_from_the_hf_cache(tmp_path):
    ref = _reference("resnet34")
    snap = tmp_path / "hf" / "hub" / "models--timm--resnet34.tv_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(ref, str(snap / "model.safetensors"))
    enc = create_encoder("resnet34", "imagenet")
    _assert_loaded(enc, ref)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "plain"])
def test_prefixed_and_wrapped_checkpoints(tmp_path, wrap):
    ref = _reference("resnet18")
    sd = {f"module.backbone.{k}": v for k, v in ref.items()}
    obj = sd if wrap == "plain" else {wrap: sd, "epoch": 3, "arch": "resnet18"}
    torch.save(obj, tmp_path / "w.pt")
    _assert_loaded(create_encoder("resnet18", str(tmp_path / "w.pt")), ref)


def test_ciga_simclr_layout(tmp_path, monkeypatch):
    ref = _reference("resnet18")
    sd = {f"model.resnet.{k}": v for k, v in ref.items() if not k.startswith("fc.")}
    sd.update({"model.resnet.fc.1.weight": torch.randn(512, 512), "model.resnet.fc.1.bias": torch.randn(512),
               "model.resnet.fc.3.weight": torch.randn(128, 512), "model.resnet.fc.3.bias": torch.randn(128)})
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save({"state_dict": sd, "epoch": 1000, "global_step": 5}, wdir / "pytorchnative_tenpercent_resnet18.ckpt")
    monkeypatch.setenv("FEATSTORE_WEIGHTS", str(wdir))
    enc = create_encoder("resnet18", "ciga-simclr", levels=(0, 2))
    _assert_loaded(enc, ref, skip=("fc.",))
    assert enc.weights_tag == "ciga-simclr" and "Ciga" in enc.provenance()["weights_citation"]


@pytest.mark.parametrize("arch", ["densenet121", "resnet50"])
def test_mormont_mtdp_layout(tmp_path, arch):
    ref = _reference(arch)
    # MultiHead state dict: the shared torchvision network under 'features.' + task heads.
    sd = {f"features.{k}": v for k, v in ref.items()}
    sd.update({"heads.bach.linear.weight": torch.randn(4, 8),
               "heads.bach.linear.bias": torch.randn(4)})
    name = f"{arch}-mh-best-191205-141200.pth"
    torch.save(sd, _hub(tmp_path) / name)
    _assert_loaded(create_encoder(arch, "mormont-mtdp"), ref)
    # the authors' file name given as a path keeps the tag (and its layout)
    assert create_encoder(arch, str(_hub(tmp_path) / name)).weights_tag == "mormont-mtdp"
    # renamed, it is a plain file: the unknown head keys are refused unless strict=False
    (tmp_path / "renamed.pth").write_bytes((_hub(tmp_path) / name).read_bytes())
    with pytest.raises(WeightsError, match=r"2 unexpected keys \[heads.bach"):
        create_encoder(arch, str(tmp_path / "renamed.pth"))


def test_kang_barlow_twins_layout_and_its_normalisation(tmp_path):
    ref = _reference("resnet50")
    sd = {k: v for k, v in ref.items() if not k.startswith("fc.")}   # ResNetTrunk: fc deleted
    path = tmp_path / "elsewhere" / "bt_rn50_ep200.torch"
    path.parent.mkdir()
    torch.save(sd, path)
    enc = create_encoder("resnet50", f"kang-bt={path}")
    _assert_loaded(enc, ref, skip=("fc.",))
    assert enc.mean == LUNIT_MEAN and enc.std == LUNIT_STD
    assert enc.provenance()["preprocessing"]["mean"] == list(LUNIT_MEAN)


def test_missing_key_is_refused_unless_not_strict(tmp_path):
    ref = _reference("resnet18")
    sd = {k: v for k, v in ref.items() if k != "layer4.1.conv2.weight"}
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"1 missing keys \[layer4.1.conv2.weight\]") as err:
        create_encoder("resnet18", str(tmp_path / "partial.pth"))
    assert "\n" not in str(err.value)
    enc = create_encoder("resnet18", str(tmp_path / "partial.pth"), strict=False)
    _assert_loaded(enc, {k: v for k, v in ref.items() if k != "layer4.1.conv2.weight"})


def test_wrong_architecture_is_refused_with_shapes(tmp_path):
    torch.save(_reference("resnet18"), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="wrong shape for resnet50"):
        create_encoder("resnet50", str(tmp_path / "r18.pth"), strict=False)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="pickles Python objects beyond tensors.*refused"):
        create_encoder("resnet18", str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_missing_imagenet_cache_fails_fast_naming_the_files(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        create_encoder("densenet121", "imagenet")
    assert time.perf_counter() - start < 0.5
    msg = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth") in msg
    assert "models--timm--densenet121.tv_in1k" in msg and "--allow-download" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_bad_weights_values(tmp_path):
    with pytest.raises(EncoderError, match="unknown weights 'dino'"):
        create_encoder("resnet18", "dino")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_encoder("resnet18", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        create_encoder("resnet18", str(tmp_path / "junk.pth"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nodict.pth")
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        create_encoder("resnet18", str(tmp_path / "nodict.pth"))


def test_sha256_is_cached_by_path_mtime_and_size(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 10)
    assert file_sha256(p) == hashlib.sha256(b"a" * 10).hexdigest()
    p.write_bytes(b"b" * 11)
    assert file_sha256(p) == hashlib.sha256(b"b" * 11).hexdigest()


def test_finetuned_checkpoint_round_trip(tmp_path):
    parent = tmp_path / "parent.pth"
    torch.save(_reference("resnet18", seed=2), parent)
    enc = create_encoder("resnet18", str(parent), levels=(1,))
    with torch.no_grad():                          # "fine-tune" the trained prefix only
        for p in enc.trainable_parameters():
            p.add_(0.01)
    expected = {k: v.clone() for k, v in enc.full_state_dict().items()}
    assert torch.equal(expected["layer4.0.conv1.weight"], _reference("resnet18", seed=2)["layer4.0.conv1.weight"])
    out = save_encoder_checkpoint(enc, tmp_path / "ft" / "resnet18_ft.pt", level=1, extra={"run": "runs/a"})
    again = create_encoder("resnet18", str(out), levels=(0, 1))
    _assert_loaded(again, expected)
    prov = again.provenance()
    assert prov["weights"] == f"file-resnet18_ft-{file_sha256(out)[:8]}"
    assert prov["finetuned"]["parent_weights"] == f"file-parent-{file_sha256(parent)[:8]}"
    assert prov["finetuned"]["parent_sha256"] == file_sha256(parent)
    assert prov["finetuned"]["level"] == 1 and prov["finetuned"]["run"] == "runs/a"
    with pytest.raises(WeightsError, match="checkpoint of encoder 'resnet18', not 'resnet34'"):
        create_encoder("resnet34", str(out))
