"""Encoder zoo: registry, truncation levels from one forward pass, offline weights, precision.

Public API (contract: docs/architecture.md, "featstore.encoders"; user guide: docs/encoders.md).
"""

from __future__ import annotations

from featstore.encoders.model import Encoder, create_encoder
from featstore.encoders.precision import (
    PRECISIONS,
    autocast,
    cpu_has_native_bf16,
    prepare_encoder,
    resolve_precision,
    use_channels_last,
)
from featstore.encoders.registry import (
    EncoderSpec,
    WeightsSpec,
    get_spec,
    list_encoders,
    parse_levels,
    register_encoder,
)
from featstore.encoders.weights import expected_paths, find_weights, read_checkpoint

__all__ = [
    "PRECISIONS",
    "Encoder",
    "EncoderSpec",
    "WeightsSpec",
    "autocast",
    "cpu_has_native_bf16",
    "create_encoder",
    "expected_paths",
    "find_weights",
    "get_spec",
    "list_encoders",
    "parse_levels",
    "prepare_encoder",
    "read_checkpoint",
    "register_encoder",
    "resolve_precision",
    "use_channels_last",
]
