"""featstore.core.runtime: one device resolver with one-line errors; every context restores what it changed."""

from __future__ import annotations

import os

import pytest
import torch

from featstore.core.errors import ConfigError, CoreError
from featstore.core.runtime import cpu_threads, deterministic, env, hub_offline, resolve_device, tuned_malloc


def test_resolve_device_names_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available on this machine; use --device cpu"):
            resolve_device("cuda:0")
    assert issubclass(ConfigError, CoreError) and issubclass(ConfigError, ValueError)


def test_cpu_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with cpu_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_deterministic_seeds_inside_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with deterministic(7):
        a = torch.rand(3)
    with deterministic(7):
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_env_sets_unsets_and_restores(monkeypatch):
    monkeypatch.setenv("FEATSTORE_TEST_A", "old")
    monkeypatch.delenv("FEATSTORE_TEST_B", raising=False)
    with env(FEATSTORE_TEST_A=None, FEATSTORE_TEST_B="new"):
        assert "FEATSTORE_TEST_A" not in os.environ and os.environ["FEATSTORE_TEST_B"] == "new"
    assert os.environ["FEATSTORE_TEST_A"] == "old" and "FEATSTORE_TEST_B" not in os.environ


def test_hub_offline_sets_the_variable_and_the_hub_constant_then_restores(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    with hub_offline(False):  # a download was asked for: nothing changes
        assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False


def test_tuned_malloc_is_nestable_and_a_noop_when_disabled():
    with tuned_malloc(False) as active:
        assert active is False
    with tuned_malloc() as outer:
        with tuned_malloc() as inner:
            assert inner == outer
    # after the outermost block the defaults are back: a big allocation freed is returned to the OS again
    import platform

    if platform.system() == "Linux":
        from featstore.core import runtime

        assert runtime._malloc_depth == 0
