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


def test_a_weights_file_finds_its_stored_features_by_path(tmp_path):
    """`mil train --weights run/encoder.pt` (or a pretrain checkpoint) reads the features that
    `featstore extract --weights` stored under the file's tag; other strings pass through."""
    import numpy as np

    from featstore.store import FeatureKey, open_store
    from featstore.tags import requested_tag

    ck = tmp_path / "pretrain-simclr-demo-f1.pt"
    ck.write_bytes(b"weights")
    tag = str(WeightsTag.for_file(ck))
    st = open_store(tmp_path / "s.zarr", mode="a")
    st.set_tiling({"patch_size": 256})
    st.write_tiling("s1", np.zeros((2, 2), np.int32), np.ones(2, np.float32), {"size0": 256})
    st.write_features("s1", FeatureKey("resnet18", tag, 1), np.full((2, 3), 7.0), {})
    st.write_features("s1", FeatureKey("resnet18", "random-s0", 1), np.zeros((2, 3)), {})
    assert requested_tag(str(ck)) == tag and requested_tag("imagenet") == "imagenet"
    assert requested_tag(str(tmp_path / "missing.pt")) == str(tmp_path / "missing.pt")
    assert st.resolve_key("resnet18", 1, str(ck)).weights == tag
    assert st.features("s1", "resnet18", 1, str(ck))[0, 0] == 7.0
    ck.write_bytes(b"other weights")          # a changed file is a different tag: its features are not there
    assert st.resolve_key("resnet18", 1, str(ck)).weights != tag
