"""Precision: choose fp16 / bf16 / fp32 by device capability, and the matching autocast.

``auto`` = fp16 autocast on CUDA; bf16 autocast + channels_last on CPUs with native bf16
(AVX512-BF16 or AMX; measured 3-4x over fp32 on such a CPU); fp32 otherwise. An explicit
``fp16``/``bf16``/``fp32`` always wins. Features leave the encoder as float32 either way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from featstore.errors import EncoderError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    if text:
        flags = set()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    capability = torch.backends.cpu.get_cpu_capability()  # no cpuinfo (macOS, Windows)
    return "AMX" in capability.upper()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Map ``auto``/``fp32``/``bf16``/``fp16`` and a device to the precision actually used."""
    device = torch.device(device)
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if p != "auto":
        if p == "fp16" and device.type == "cpu":
            log.warning("fp16 autocast on CPU is usually slower than bf16 or fp32")
        return p
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def use_channels_last(precision: str, device: torch.device | str) -> bool:
    """channels_last pays off with reduced precision (oneDNN bf16 on CPU, tensor cores on CUDA)."""
    return precision in ("bf16", "fp16") and torch.device(device).type in ("cpu", "cuda")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast context for a resolved precision (``fp32`` = no autocast)."""
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    if precision not in _DTYPES:
        raise EncoderError(f"autocast needs a resolved precision (fp32/bf16/fp16), got {precision!r}")
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def prepare_encoder(encoder: torch.nn.Module, precision: str, device: torch.device | str):
    """Move *encoder* to *device* in eval mode, channels_last when it pays; returns it."""
    device = torch.device(device)
    encoder.to(device).eval()
    if use_channels_last(precision, device):
        encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    return encoder
