"""Fine-tuning a ViT: `--train-blocks N` gives gradients to the last N blocks (+ final norm) only,
and the whole path on generated slides: extract ViT-S/16 levels -> mil train -> mil finetune
--train-blocks 2 -> extract the fine-tuned encoder.pt -> block-wise CKA frozen vs fine-tuned.

Tiny real components: pyramidal TIFFs from featstore.synth, a real Zarr store, timm ViT-S/16 with
random weights, fp32, k=2 (checkpointed micro-batches of 1), one epoch (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featstore
from featstore.cohort import discover_slides
from featstore.encoders import create_encoder
from featstore.errors import EncoderError
from featstore.extract import ExtractConfig, Extractor
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

VIT_S = "vit_small_patch16_224"
DINO_S = "vit_small_patch14_reg4_dinov2"


def _x(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grads(enc, x: torch.Tensor) -> dict[str, torch.Tensor]:
    enc.train()
    enc.model.zero_grad(set_to_none=True)
    enc(x)[enc.levels[0]].square().sum().backward()
    return {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.grad is not None}


def test_last_two_blocks_and_the_norm_train_and_nothing_else_moves():
    x = _x()
    enc = create_encoder(VIT_S, levels=(0,), seed=3)
    full = _grads(create_encoder(VIT_S, levels=(0,), seed=3), x)       # today's default: everything
    params = enc.set_trainable(2)
    assert [n for n, _ in enc.trainable_modules(2)] == ["blocks.10", "blocks.11", "norm"]
    want = {n for n, _ in enc.model.named_parameters() if n.startswith(("blocks.10.", "blocks.11.", "norm."))}
    assert {n for n, p in enc.model.named_parameters() if p.requires_grad} == want
    seen: dict[int, bool] = {}                   # the frozen prefix runs without autograd
    hooks = [enc.model.blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.requires_grad))
             for i in (9, 10)]
    grads = _grads(enc, x)
    for h in hooks:
        h.remove()
    assert seen == {9: False, 10: True}
    assert grads.keys() == want
    for n in want:                               # the same gradient as backprop through everything
        torch.testing.assert_close(grads[n], full[n], rtol=1e-5, atol=1e-7)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    opt = torch.optim.Adam(params, lr=1e-3)
    opt.step()
    after = enc.model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == want


def test_checkpointed_micro_batches_give_the_bag_gradient_with_a_frozen_prefix():
    from mil.bagmodel import BagModel
    from mil.models import create_mil_model

    enc = create_encoder(VIT_S, levels=(0,), seed=4)
    head = create_mil_model("abmil", 384, hidden=(16,), attn_dim=8, dropout=0.0)
    model = BagModel(enc, head, 0, "fp32", micro_batch=1)
    enc.set_trainable(1)
    x, grads = _x(3, seed=2), []
    for mb in (1, 3):                            # 3 checkpointed chunks vs one plain forward
        model.micro_batch = mb
        model.zero_grad(set_to_none=True)
        model.train_mode()
        torch.nn.functional.cross_entropy(model(x)[0].unsqueeze(0), torch.tensor([1])).backward()
        grads.append({n: p.grad.clone() for n, p in enc.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(n.startswith(("blocks.11.", "norm.")) for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_train_blocks_counts_up_to_the_level_and_follows_set_levels():
    enc = create_encoder(DINO_S, levels=(4,), seed=0)   # minus 4 = block 7: blocks 0..7 run
    assert [n for n, _ in enc.trainable_modules(3)] == ["blocks.5", "blocks.6", "blocks.7", "norm"]
    assert id(enc.model.reg_token) not in {id(p) for p in enc.trainable_parameters(3)}
    assert id(enc.model.reg_token) in {id(p) for p in enc.trainable_parameters(0)}
    with pytest.raises(EncoderError, match=r"cannot train the last 9 blocks.*give 0\.\.8"):
        enc.set_trainable(9)
    enc.set_trainable(1)
    enc.set_levels((0,))                         # deeper level: the trained block moves with it
    assert {n.split(".")[1] for n, p in enc.model.named_parameters() if p.requires_grad and n.startswith("blocks.")} \
        == {"11"}


TILING = TilingConfig(patch_size=128, mpp=1.0)         # 256 level-0 px at 0.5 um/px: 4 tiles per slide
SPLIT = ["train"] * 4 + ["val"] * 2 + ["test"] * 2


def _extract(slides, store, weights: str) -> None:
    cfg = ExtractConfig(encoder=VIT_S, weights=weights, levels=(0, 4), tiling=TILING, precision="fp32",
                        batch_size=16, workers=2, device="cpu")
    report = Extractor(cfg).run(discover_slides([slides]), store)
    assert report.ok, report.failed


def test_vit_end_to_end_extract_train_finetune_last_blocks_extract_cka(tmp_path):
    from analysis.blockwise import blockwise_cka
    from featstore.cli import mil_app
    from featstore.encoders.weights import file_tag
    from mil.train import RunSpec, TrainConfig, train_run

    slides, store = tmp_path / "slides", tmp_path / "v.zarr"
    slides.mkdir()
    for i in range(len(SPLIT)):
        write_pyramid_tiff(slides / f"s{i}.tif", rectangles_slide((512, 512), [(0, 0, 512, 512)], seed=i), mpp=0.5)
    _extract(slides, store, "random")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        w.writerows([f"s{i}", ["normal", "tumor"][i % 2], s] for i, s in enumerate(SPLIT))
    run = tmp_path / "run"
    train_run(RunSpec(str(store), str(labels), str(run), VIT_S, 0, n_boot=20),
              TrainConfig(hidden=(16,), attn_dim=8, epochs=1, threads=1))
    ft = tmp_path / "run-ft"
    res = CliRunner().invoke(mil_app, [
        "finetune", "--run", str(run), "--out", str(ft), "--slides", str(slides), "--k", "2", "--epochs", "1",
        "--lr", "1e-2", "--train-blocks", "2", "--micro-batch", "1", "--precision", "fp32", "--eval-tiles", "topk",
        "--eval-batch", "8", "--threads", "2"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["train_blocks"] == 2 and cfg["encoder"] == VIT_S
    ckpt = torch.load(ft / "encoder.pt", map_location="cpu", weights_only=True)
    assert ckpt["finetune"]["trained_modules"] == ["blocks.10", "blocks.11", "norm"]
    frozen_sd = create_encoder(VIT_S, levels=(0,)).full_state_dict()
    moved = {k for k, v in ckpt["state_dict"].items() if not torch.equal(v, frozen_sd[k])}
    assert moved and {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
                      for k in moved} <= {"blocks.10", "blocks.11", "norm"}
    _extract(slides, store, str(ft / "encoder.pt"))
    st, tag = featstore.open_store(store), file_tag(ft / "encoder.pt")
    w0, b0 = frozen_sd["norm.weight"].numpy(), frozen_sd["norm.bias"].numpy()
    w1, b1 = ckpt["state_dict"]["norm.weight"].numpy(), ckpt["state_dict"]["norm.bias"].numpy()
    for s in ("s0", "s7"):
        a = {lv: st.features(s, VIT_S, lv, "random-s0").astype(np.float32) for lv in (0, 4)}
        b = {lv: st.features(s, VIT_S, lv, tag).astype(np.float32) for lv in (0, 4)}
        assert a[0].shape == b[0].shape == a[4].shape == (4, 384)
        assert np.abs(a[0] - b[0]).max() > 1e-2                   # the trained blocks changed minus 0
        # minus 4 = block 7, below the trained blocks: the same block output, only the final
        # norm's (trained) affine differs -> undo it and the frozen features come back
        assert np.abs(a[4] - b[4]).max() > 5e-2
        np.testing.assert_allclose((b[4] - b1) / w1 * w0 + b0, a[4], rtol=0, atol=5e-3)   # float16 store
    cka = blockwise_cka(st, (VIT_S, "random-s0"), (VIT_S, tag), (0, 4))
    assert cka.matrix.shape == (2, 2) and cka.n_tiles == 4 * len(SPLIT)
    assert cka.matrix[1, 1] > 0.9999 and cka.matrix[0, 0] < 0.99     # rows/cols: minus 0, minus 4
    assert (ft / "metrics.json").exists() and (ft / "predictions.csv").exists()


def test_a_study_yaml_takes_a_vit_with_block_levels_and_train_blocks(tmp_path):
    from mil.study.errors import StudyError
    from mil.study.study import StudyConfig

    base = {"slides": ["slides"], "labels": "labels.csv", "finetune": {"enabled": True, "k": 2, "train_blocks": 2}}
    cfg = StudyConfig.from_dict({**base, "encoders": [{"name": VIT_S, "levels": [0, 4, 11]}]}, tmp_path)
    assert cfg.extract_config(VIT_S, "random", [0, 4, 11]).levels == (0, 4, 11)
    assert cfg.finetune_config().train_blocks == 2
    with pytest.raises(StudyError, match=r"encoders\[0\]\.levels: encoder vit_small_patch16_224"):
        StudyConfig.from_dict({**base, "encoders": [{"name": VIT_S, "levels": [0, 12]}]}, tmp_path)
    with pytest.raises(StudyError, match="finetune.train_blocks -1 must be >= 0"):
        StudyConfig.from_dict({**base, "encoders": [VIT_S], "finetune": {"train_blocks": -1}}, tmp_path)
