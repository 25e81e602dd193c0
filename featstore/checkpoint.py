"""Encoder checkpoints: the ``featstore-encoder/1`` file format, its safe reading, its tag.

A fine-tuned (or pretrained) encoder is saved as a plain-data dict holding the FULL timm state
dict, the parent's weights tag and sha256, the level it was trained at and its preprocessing,
so ``featstore extract --weights PATH`` loads it at any level and records it as
``file-<stem>-<sha8>``. Every file is read with ``torch.load(weights_only=True)``: a file that
pickles code is refused with one line saying how to re-save it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from featstore.core.errors import first_line
from featstore.errors import WeightsError, WeightsNotFoundError
from featstore.tags import WeightsTag, file_sha256

CHECKPOINT_FORMAT = "featstore-encoder/1"


def file_tag(path: str | Path) -> str:
    """weights_tag of an explicit file: ``file-<stem>-<sha256[:8]>`` (see :meth:`WeightsTag.for_file`)."""
    return str(WeightsTag.for_file(path))


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; one-line :class:`WeightsError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        if not found:
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = why.group(1).strip() if why else first_line(exc)
            raise WeightsError(f"{path} is not a readable torch checkpoint: {detail}") from None
        raise WeightsError(
            f"{path} pickles Python objects beyond tensors ({found.group(0)}); refused (weights_only). "
            "If you trust it, re-save only its state_dict with torch.save()"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = first_line(exc)
        raise WeightsError(f"{path} is not a readable torch checkpoint: {first}") from None


def is_encoder_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a ``featstore-encoder/1`` checkpoint dict."""
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def read_encoder_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict of a ``featstore-encoder/1`` file (``state_dict``, ``encoder``, ``level`` ...)."""
    obj = load_torch_file(path)
    if not is_encoder_checkpoint(obj):
        raise WeightsError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; write it with "
                           "featstore.checkpoint.save_encoder")
    return dict(obj)


def save_encoder(encoder: Any, path: str | Path, *, level: int,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write *encoder* (a featstore Encoder) as a ``featstore-encoder/1`` checkpoint.

    The state dict is the FULL timm model (fine-tuned prefix + the parent's untouched deeper
    stages), so the file loads with ``--weights PATH`` at any level. *extra* must be plain
    data (str, numbers, lists, dicts) so that ``weights_only`` loading accepts it. The write
    is atomic (temporary file + rename).
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "encoder": encoder.name,
        "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.full_state_dict().items()},
        "parent_weights": encoder.weights_tag,
        "parent_sha256": encoder.weights_sha256,
        "level": int(level),
        "preprocessing": encoder.preprocessing(),
    }
    payload.update(dict(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


__all__ = ["CHECKPOINT_FORMAT", "file_sha256", "file_tag", "is_encoder_checkpoint", "load_torch_file",
           "read_encoder_checkpoint", "save_encoder"]
