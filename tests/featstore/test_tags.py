"""WeightsTag: the one builder, parser and matcher of the store's weights strings."""

from __future__ import annotations

import hashlib

import pytest

from featstore.tags import WeightsTag


@pytest.mark.parametrize("text, kind, name, seed, sha8", [
    ("random-s3", "random", "random", 3, None),
    ("random-s0", "random", "random", 0, None),
    ("random", "random", "random", None, None),
    ("imagenet", "named", "imagenet", None, None),
    ("ciga-simclr", "named", "ciga-simclr", None, None),
    ("file-resnet18_ft-1a2b3c4d", "file", "resnet18_ft", None, "1a2b3c4d"),
    ("file-my-run-2-0badf00d", "file", "my-run-2", None, "0badf00d"),
    ("random-sx", "named", "random-sx", None, None),        # not a seed: a name like any other
    ("file-nohash", "named", "file-nohash", None, None),
])
def test_parse_every_kind_and_round_trip(text, kind, name, seed, sha8):
    tag = WeightsTag.parse(text)
    assert (tag.kind, tag.name, tag.seed, tag.sha8) == (kind, name, seed, sha8)
    assert str(tag) == text
    assert WeightsTag.parse(str(tag)) == tag


def test_random_builds_the_seeded_string():
    assert str(WeightsTag.random(7)) == "random-s7"
    assert WeightsTag.random(7) == WeightsTag.parse("random-s7")


def test_for_file_keeps_the_stem_hash_and_the_finetuned_encoder_rule(tmp_path):
    f = tmp_path / "my weights+v2.pth"
    f.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    assert str(WeightsTag.for_file(f)) == f"file-my_weights_v2-{sha[:8]}"
    run = tmp_path / "run-ft"
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"xyz")
    tag = WeightsTag.for_file(run / "encoder.pt")   # a fine-tuned encoder.pt is named by its run folder
    assert str(tag) == f"file-run-ft-{hashlib.sha256(b'xyz').hexdigest()[:8]}"
    assert WeightsTag.parse(str(tag)) == tag
    assert str(WeightsTag.for_file(f, sha256="f" * 64)) == "file-my_weights_v2-ffffffff"


def test_matching():
    r3 = WeightsTag.parse("random-s3")
    assert r3.matches("random") and r3.matches("random-s3")
    assert not r3.matches("random-s0") and not r3.matches("imagenet")
    assert WeightsTag.parse("imagenet").matches("imagenet")
    assert not WeightsTag.parse("imagenet").matches("random")
    assert not WeightsTag.parse("imagenet").matches("imagenet-v2")
    ft = WeightsTag.parse("file-a-1a2b3c4d")
    assert ft.matches("file-a-1a2b3c4d") and not ft.matches("file-a-00000000")
    assert ft.matches(WeightsTag.parse("file-a-1a2b3c4d"))


def test_pretrain_files_get_a_pretrain_tag_that_round_trips(tmp_path):
    p = tmp_path / "pretrain-mae-demo-f0.25.pt"
    p.write_bytes(b"weights")
    tag = WeightsTag.for_file(p)
    assert tag.kind == "pretrain" and str(tag).startswith("pretrain-mae-demo-f0.25-") and len(tag.sha8) == 8
    assert WeightsTag.parse(str(tag)) == tag and tag.matches(str(tag))
    other = tmp_path / "mae.pt"
    other.write_bytes(b"weights")
    assert WeightsTag.for_file(other).kind == "file"
