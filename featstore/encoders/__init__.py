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
    register_encoder,
)
from featstore.encoders.weights import (
    CHECKPOINT_FORMAT,
    expected_paths,
    file_sha256,
    find_weights,
    read_checkpoint,
    save_encoder_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "PRECISIONS",
    "Encoder",
    "EncoderSpec",
    "WeightsSpec",
    "autocast",
    "cpu_has_native_bf16",
    "create_encoder",
    "expected_paths",
    "file_sha256",
    "find_weights",
    "get_spec",
    "list_encoders",
    "prepare_encoder",
    "read_checkpoint",
    "register_encoder",
    "resolve_precision",
    "save_encoder_checkpoint",
    "use_channels_last",
]
