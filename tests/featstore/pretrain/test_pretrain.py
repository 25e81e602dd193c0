"""`featstore pretrain` end to end on a real store: MAE on a tiny ViT, SimCLR on a CNN, resume
after kill -9, the output's tag through extraction, and the errors a user meets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featstore
from featstore.cli import featstore_app
from featstore.checkpoint import read_encoder_checkpoint
from featstore.cohort import SlideRef
from featstore.encoders import create_encoder
from featstore.errors import PretrainError
from featstore.extract import ExtractConfig, Extractor
from featstore.pretrain import PretrainConfig, pretrain
from featstore.pretrain.run import STATE
from featstore.tiling import TilingConfig
from tests.featstore.pretrain.conftest import TINY, make_store

MAE = dict(epochs=4, batch_size=16, lr=2e-3, warmup=0.1, decoder_dim=32, decoder_depth=1, decoder_heads=2,
           holdout=4, precision="fp32", checkpoint_every=5)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_encoder_checkpoint(path)["state_dict"]


def test_mae_loss_falls_pictures_are_written_and_provenance_is_complete(store, tiny_vit, tmp_path):
    cfg = PretrainConfig(encoder=TINY, fractions=(0.5, 1.0), **MAE)
    res = pretrain(cfg, store, tmp_path / "mae")
    assert [r.subset for r in res] == ["f0.5", "f1"]
    for r in res:
        assert r.loss_drop >= 0.30, (r.subset, r.epoch_loss)
        assert r.holdout_loss[1] < r.holdout_loss[0]
        d = r.path.parent
        assert (d / "loss.png").stat().st_size > 1000 and (d / "reconstructions.png").stat().st_size > 1000
        assert not (d / STATE).exists()
        assert r.tag.startswith(f"pretrain-mae-mae-{r.subset}-") and len(r.tag.rsplit("-", 1)[1]) == 8
    prov = json.loads((res[1].path.parent / "provenance.json").read_text())
    for key in ("method", "encoder", "start_weights", "store_fingerprint", "tiles", "subset", "epochs", "seed",
                "loss_per_epoch", "tiles_per_slide", "lightly_version"):
        assert key in prov, key
    assert prov["method"] == "mae" and prov["start_weights"] == "random-s0" and prov["tiles"] == res[1].tiles
    counts = prov["tiles_per_slide"].values()
    assert max(counts) - min(counts) <= 1                                   # balanced across slides
    assert res[0].tiles == pytest.approx(res[1].tiles / 2, abs=1)
    assert read_encoder_checkpoint(res[1].path)["pretrain"]["subset"] == "f1"


def test_same_seed_same_weights_other_seed_other_weights(store, tiny_vit, tmp_path):
    cfg = PretrainConfig(encoder=TINY, **{**MAE, "epochs": 1})
    a = _weights(pretrain(cfg, store, tmp_path / "a")[0].path)
    b = _weights(pretrain(cfg, store, tmp_path / "b")[0].path)
    c = _weights(pretrain(PretrainConfig(encoder=TINY, seed=1, **{**MAE, "epochs": 1}), store, tmp_path / "c")[0].path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.featstore.pretrain.conftest import register_tiny
from featstore.pretrain import PretrainConfig, pretrain
register_tiny()
cfg = PretrainConfig(encoder="test_tiny_vit", **{cfg!r})
pretrain(cfg, {store!r}, {out!r})
"""


def test_kill_9_then_rerun_gives_the_uninterrupted_weights(store, tiny_vit, tmp_path):
    kw = {**MAE, "epochs": 6, "checkpoint_every": 3}
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(root=str(Path(__file__).resolve().parents[3]), cfg=kw, store=str(store),
                                     out=str(tmp_path / "killed")))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    state = tmp_path / "killed" / "f1" / STATE
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and len(torch.load(state, weights_only=True)["losses"]) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "f1" / "provenance.json").exists()
    resumed = pretrain(PretrainConfig(encoder=TINY, **kw), store, tmp_path / "killed")[0]
    clean = pretrain(PretrainConfig(encoder=TINY, **kw), store, tmp_path / "clean")[0]
    assert resumed.resumed_at >= 6 and clean.resumed_at == 0
    a, b = _weights(resumed.path), _weights(clean.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epoch_loss == clean.epoch_loss


def test_rerun_of_a_finished_run_trains_nothing(store, tiny_vit, tmp_path):
    cfg = PretrainConfig(encoder=TINY, **{**MAE, "epochs": 1})
    first = pretrain(cfg, store, tmp_path / "o")[0]
    mtime = first.path.stat().st_mtime_ns
    again = pretrain(cfg, store, tmp_path / "o")[0]
    assert again.tag == first.tag and first.path.stat().st_mtime_ns == mtime


def test_simclr_on_a_cnn_and_the_tag_goes_through_extraction(store, tmp_path):
    cfg = PretrainConfig(encoder="resnet18", weights="random", epochs=1, batch_size=16, lr=1e-3, tiles=48,
                         holdout=4, precision="fp32")
    r = pretrain(cfg, store, tmp_path / "cnn")[0]
    assert r.subset == "tiles48" and r.tiles == 48 and np.isfinite(r.epoch_loss).all()
    assert json.loads((r.path.parent / "provenance.json").read_text())["method"] == "simclr"
    enc = create_encoder("resnet18", str(r.path))
    assert enc.weights_tag == r.tag
    st = featstore.open_store(store)
    sid = st.slide_ids()[0]
    ex = ExtractConfig(encoder="resnet18", weights=str(r.path), levels=(0,), input_size=32, precision="fp32",
                       tiling=TilingConfig.from_dict(st.tiling))
    Extractor(ex).run([SlideRef(sid, st.slide_info(sid)["source"])], store)
    st = featstore.open_store(store)
    assert st.has_features(sid, "resnet18", 0, r.tag)
    assert st.provenance(sid, "resnet18", 0, r.tag)["weights"] == r.tag


def test_barlow_twins_loss_falls_and_is_deterministic(store, tiny_cnn, tmp_path):
    """The CNN methods are registry entries: Barlow Twins trains with the same loop and seeding
    (resnet18 at 64 px: the same code at a fraction of the cost)."""
    cfg = PretrainConfig(encoder=tiny_cnn, method="barlowtwins", epochs=4, batch_size=16, lr=5e-4, tiles=32,
                         holdout=0, precision="fp32")
    a = pretrain(cfg, store, tmp_path / "a")[0]
    b = pretrain(cfg, store, tmp_path / "b")[0]
    assert json.loads((a.path.parent / "provenance.json").read_text())["method"] == "barlowtwins"
    assert a.epoch_loss[-1] < a.epoch_loss[0]
    wa, wb = _weights(a.path), _weights(b.path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_errors_name_the_problem(store, tiny_vit, tmp_path):
    with pytest.raises(PretrainError, match="mae needs a ViT"):
        pretrain(PretrainConfig(encoder="resnet18", method="mae", epochs=1), store, tmp_path / "x")
    empty = featstore.store.open_store_writer(tmp_path / "empty.zarr")
    empty.set_tiling(TilingConfig().to_dict())
    with pytest.raises(PretrainError, match="no tiles.*featstore extract"):
        pretrain(PretrainConfig(encoder=TINY, epochs=1), tmp_path / "empty.zarr", tmp_path / "y")
    with pytest.raises(PretrainError, match="fraction"):
        PretrainConfig(encoder=TINY, fractions=(0.0, 1.5))
    pretrain(PretrainConfig(encoder=TINY, **{**MAE, "epochs": 2, "checkpoint_every": 1}), store, tmp_path / "z")
    state_dir = tmp_path / "z2"
    # an interrupted run's folder refuses a different config
    (state_dir / "f1").mkdir(parents=True)
    torch.save({"config": json.dumps({"other": 1}), "model": {}, "opt": {}, "losses": []}, state_dir / "f1" / STATE)
    with pytest.raises(PretrainError, match="different config"):
        pretrain(PretrainConfig(encoder=TINY, **{**MAE, "epochs": 1}), store, state_dir)


def test_cli_prints_the_table_and_the_extract_line(store, tiny_vit, tmp_path):
    res = CliRunner().invoke(featstore_app, ["pretrain", "--store", str(store), "--out", str(tmp_path / "c"),
                                             "--encoder", TINY, "--epochs", "1", "--batch-size", "16",
                                             "--fraction", "0.5", "--precision", "fp32", "--decoder-depth", "1"])
    assert res.exit_code == 0, res.output
    flat = "".join(res.output.split())                      # rich folds long paths and tags
    tag = json.loads((tmp_path / "c" / "f0.5" / "provenance.json").read_text())["weights_tag"]
    assert tag.startswith("pretrain-mae-c-f0.5-") and tag in flat
    assert f"--encoder{TINY}--weights{tmp_path / 'c' / 'f0.5' / 'pretrain-mae-c-f0.5.pt'}" in flat


def test_another_store_slide_set(tmp_path, tiny_vit):
    """Two slides of different sizes: still balanced, still learns."""
    st = make_store(tmp_path, n_slides=2, side=384)
    r = pretrain(PretrainConfig(encoder=TINY, **MAE), st, tmp_path / "o")[0]
    assert r.loss_drop >= 0.30
