"""Top-k tile selection by raw (pre-softmax) attention, the first step of HistoTransfer's fine-tune.

The selection is a pure function of a slide's attention scores (:func:`select_topk`); the
frozen run's scores come from its head over the store's features (:func:`head_attention`),
so training slides (whose attention `mil train` does not save) are handled like test slides.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mil.errors import MilError


def select_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the *k* highest scores, highest first (ties: lower index first).

    A slide with fewer than *k* tiles gives all of its tiles. NaN scores rank last.
    """
    if k < 1:
        raise MilError(f"--k {k}: the number of tiles per slide must be >= 1")
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="stable")
    return order[: min(k, len(s))].astype(np.int64)


@torch.no_grad()
def head_attention(head: nn.Module, features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Raw attention (N,) float32 of *head* on one bag of embeddings (N, D); MilError if it has none."""
    head.eval()
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features, np.float32))
    param = next(head.parameters(), None)
    if param is not None:
        x = x.to(param.device, torch.float32)
    _, attn = head(x)
    if attn is None:
        raise MilError(f"MIL head {getattr(head, 'config', {}).get('name', type(head).__name__)!r} has no "
                       "attention; top-k fine-tuning needs a run trained with abmil, abmil-gated or max")
    return attn.float().cpu().numpy()


def frozen_topk(head: nn.Module, bags: Mapping[str, np.ndarray] | object, slide_ids: Sequence[str],
                k: int) -> dict[str, np.ndarray]:
    """{slide_id: top-k row indices} of the frozen *head* over each slide's stored embeddings.

    *bags* is anything indexable by slide id giving an (N, D) array or tensor (``mil.data.Bags``).
    """
    return {s: select_topk(head_attention(head, bags[s]), k) for s in slide_ids}


__all__ = ["select_topk", "head_attention", "frozen_topk"]
