"""featstore.checkpoint: encoder checkpoints written, read back safely, tagged by their hash."""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch

from featstore.checkpoint import (CHECKPOINT_FORMAT, file_sha256, file_tag, load_torch_file,
                                  read_encoder_checkpoint, save_encoder)
from featstore.encoders import create_encoder
from featstore.errors import WeightsError, WeightsNotFoundError


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("resnet18", "random", levels=(2,), seed=5)


def test_save_then_read_round_trips_the_full_state_and_metadata(encoder, tmp_path):
    out = save_encoder(encoder, tmp_path / "run-a" / "encoder.pt", level=2, extra={"run": "runs/a", "k": 8})
    assert out == tmp_path / "run-a" / "encoder.pt" and not (out.parent / "encoder.pt.tmp").exists()
    ckpt = read_encoder_checkpoint(out)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["encoder"] == "resnet18" and ckpt["level"] == 2
    assert ckpt["parent_weights"] == "random-s5" and ckpt["parent_sha256"] is None
    assert ckpt["preprocessing"] == encoder.preprocessing()
    assert ckpt["run"] == "runs/a" and ckpt["k"] == 8
    full = encoder.full_state_dict()
    assert set(ckpt["state_dict"]) == set(full)                      # deeper stages included
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in full.items())
    assert file_sha256(out) == hashlib.sha256(out.read_bytes()).hexdigest()
    assert file_tag(out) == f"file-run-a-{file_sha256(out)[:8]}"     # encoder.pt: named by its run


def test_reading_refuses_pickled_code_and_non_featstore_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "args": argparse.Namespace(lr=0.1)}, evil)
    with pytest.raises(WeightsError, match=r"pickles Python objects beyond tensors \(GLOBAL argparse.Namespace\); "
                                           "refused") as e:
        read_encoder_checkpoint(evil)
    assert "\n" not in str(e.value)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    assert torch.equal(load_torch_file(plain)["w"], torch.zeros(1))
    with pytest.raises(WeightsError, match="not a featstore-encoder/1 checkpoint"):
        read_encoder_checkpoint(plain)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        read_encoder_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_torch_file(tmp_path / "junk.pt")
