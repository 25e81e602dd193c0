"""The process runtime as explicit, restorable contexts: device, CPU threads, determinism,
glibc allocator tuning and hub offline mode.

Library code never changes process-wide state behind the caller's back: each setting here is
a context manager that puts the previous value back on exit (also on error), so a notebook that
trains a head and then runs an extraction sees its own thread count, RNG state, allocator and
environment afterwards.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from featstore.core.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...

    An unknown name or an unavailable CUDA device raises :class:`ConfigError` with one line
    saying what to pass instead (``torch.device``'s own RuntimeError never escapes).
    """
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(name))
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Use *n* torch CPU threads inside the block (0 keeps torch's setting); restored after."""
    prev = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextmanager
def deterministic(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch inside a forked RNG (the caller's RNG state is left alone).

    On CUDA, deterministic algorithms are switched on for the duration (restored after). The CPU
    kernels used here are deterministic already, and switching the flag on imports torch's
    compiler stack (~4 s), so on CPU only the seeding is done.
    """
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type != "cuda":
            yield
            return
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# glibc mallopt parameters and their documented defaults (mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_TUNED = {_M_TRIM_THRESHOLD: 1 << 36, _M_MMAP_MAX: 0}
_malloc_lock = threading.Lock()
_malloc_depth = 0


def _mallopt(values: dict[int, int]) -> bool:
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(k, v) == 1 for k, v in values.items())
    except (OSError, AttributeError):
        return False


@contextmanager
def tuned_malloc(enabled: bool = True) -> Iterator[bool]:
    """Keep glibc from returning big activation buffers to the OS after every batch.

    Measured (FACTS.md): the default malloc re-faults the buffers each batch, costing up to
    half the run in the kernel on CPU; M_MMAP_MAX=0 + a huge M_TRIM_THRESHOLD removes that at
    the price of higher peak memory. Yields whether the tuning is active. On exit of the
    outermost block glibc's documented defaults are put back. No-op off glibc.
    """
    global _malloc_depth
    if not enabled:
        yield False
        return
    with _malloc_lock:
        ok = _mallopt(_TUNED) if _malloc_depth == 0 else True
        if ok:
            _malloc_depth += 1
    try:
        yield ok
    finally:
        if ok:
            with _malloc_lock:
                _malloc_depth -= 1
                if _malloc_depth == 0:
                    _mallopt(_GLIBC_DEFAULTS)


_env_lock = threading.Lock()


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables inside the block; restored after."""
    with _env_lock:
        prev = {k: os.environ.get(k) for k in values}
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield
    finally:
        with _env_lock:
            for k, v in prev.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Hugging Face hub offline mode inside the block, unless a download was asked for.

    With no cached file, asking timm for pretrained weights otherwise hangs ~46 s retrying
    the hub (FACTS.md); offline it fails in 0.2 s. huggingface_hub reads ``HF_HUB_OFFLINE`` once,
    at import, into ``huggingface_hub.constants.HF_HUB_OFFLINE`` and consults only that copy
    afterwards, so both the variable and the constant are set; both are restored on exit.
    """
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub library: the variable alone is all there is
        constants = None
    prev = getattr(constants, "HF_HUB_OFFLINE", None)
    with env(HF_HUB_OFFLINE="1"):
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            if constants is not None:
                constants.HF_HUB_OFFLINE = prev


__all__ = ["resolve_device", "cpu_threads", "deterministic", "tuned_malloc", "env", "hub_offline"]
