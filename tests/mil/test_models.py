"""MIL heads: shapes, masks, registry, config round trip."""

from __future__ import annotations

import pytest
import torch

from mil.errors import MilError
from mil.models import ABMIL, create_mil_model, list_models, model_from_config


@pytest.mark.parametrize("name", ["abmil", "abmil-gated", "mean", "max"])
def test_single_bag_and_masked_batch_agree(name):
    torch.manual_seed(0)
    m = create_mil_model(name, 12, 3, hidden=(16, 8), dropout=0.0).eval()
    a, b = torch.randn(5, 12), torch.randn(9, 12)
    la, aa = m(a)
    assert la.shape == (3,)
    assert (aa is None) == (name == "mean")
    if aa is not None:
        assert aa.shape == (5,)
    batch = torch.zeros(2, 9, 12)
    batch[0, :5], batch[1] = a, b
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    lb, ab = m(batch, mask)
    assert lb.shape == (2, 3)
    torch.testing.assert_close(lb[0], la)          # padding must not change the bag's logits
    torch.testing.assert_close(lb[1], m(b)[0])
    if aa is not None:
        torch.testing.assert_close(ab[0, :5], aa)


def test_abmil_defaults_are_histotransfer_widths_and_clam_widths_work():
    m = ABMIL(1024)
    assert [l.out_features for l in m.features if isinstance(l, torch.nn.Linear)] == [256, 64]
    assert m.attn_w.in_features == 32 and m.attn_u is None
    clam = create_mil_model("abmil-gated", 1024, 2, hidden=(512,), attn_dim=256)
    assert clam.attn_u is not None and clam.attn_w.in_features == 256
    assert clam(torch.randn(7, 1024))[0].shape == (2,)


def test_attention_is_permutation_equivariant():
    m = create_mil_model("abmil", 8, 2, dropout=0.0).eval()
    x = torch.randn(10, 8)
    perm = torch.randperm(10)
    l1, a1 = m(x)
    l2, a2 = m(x[perm])
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(a1[perm], a2)


@pytest.mark.parametrize("name", list_models())
def test_config_round_trip_rebuilds_the_same_function(name):
    m = create_mil_model(name, 6, 2, hidden=(5,), attn_dim=4, dropout=0.1).eval()
    clone = model_from_config(m.config)
    clone.load_state_dict(m.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(clone.eval()(x)[0], m(x)[0])


def test_registry_errors_are_one_line():
    with pytest.raises(MilError, match="unknown MIL model 'transmil'; choose one of abmil"):
        create_mil_model("transmil", 8)
    with pytest.raises(MilError, match="bad option"):
        create_mil_model("abmil", 8, 2, widths=3)
    with pytest.raises(MilError, match="dropout"):
        create_mil_model("mean", 8, 2, dropout=1.5)
