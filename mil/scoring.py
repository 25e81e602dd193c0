"""Scoring a MIL head over bags of embeddings: class probabilities and raw attention per slide.

One function for every caller (`mil train`'s validation and test slides, the fine-tuner's
frozen and fine-tuned heads, `mil predict`), plus the two validation numbers the training loops
monitor (mean negative log-likelihood, AUC).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from featstore.core.stats import auc

BagSource = Mapping[str, "np.ndarray | torch.Tensor"]


def _iterate(bags, slide_ids: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(slide_id, float32 tensor) in order: ``Bags.iterate`` (reads ahead) or plain indexing."""
    if hasattr(bags, "iterate"):
        yield from bags.iterate(list(slide_ids))
        return
    for s in slide_ids:
        b = bags[s]
        yield s, b if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b, dtype=np.float32))


@torch.no_grad()
def _run_head(head: nn.Module, bags, slide_ids: Sequence[str], device, convert
              ) -> tuple[list[np.ndarray], dict[str, np.ndarray | None]]:
    """Every bag through *head* in eval mode: ``convert(output)`` per slide, and raw attention."""
    param = next(head.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else None)
    head.eval()
    outs, attn = [], {}
    for sid, bag in _iterate(bags, slide_ids):
        out, a = head(bag if device is None else bag.to(device))
        outs.append(convert(out))
        attn[sid] = None if a is None else a.float().cpu().numpy()
    return outs, attn


def score_bags(head: nn.Module, bags, slide_ids: Sequence[str], device: torch.device | str | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """Class probabilities (n, C) float64 and raw attention per slide (None for mean pooling).

    *bags* is a :class:`mil.data.Bags` or any mapping slide id -> (N, D) array or tensor
    (embeddings already computed, e.g. by the fine-tuned encoder). Bags are moved to *device*
    (default: the head's).
    """
    probs, attn = _run_head(head, bags, slide_ids, device,
                            lambda logits: torch.softmax(logits.float(), -1).cpu().double().numpy())
    n_cls = getattr(head, "n_classes", 2)
    return (np.stack(probs) if probs else np.zeros((0, n_cls))), attn


def bag_outputs(head: nn.Module, bags, slide_ids: Sequence[str], device: torch.device | str | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """The head's raw outputs (n, O) float64 (logits, a risk, a value: the task reads them) and raw
    attention per slide; as :func:`score_bags` without the softmax."""
    outs, attn = _run_head(head, bags, slide_ids, device, lambda out: out.float().cpu().double().numpy())
    n_out = getattr(head, "n_classes", 1)
    return (np.stack(outs) if outs else np.zeros((0, n_out))), attn


def mean_nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-12)."""
    if len(y) == 0:
        return float("nan")
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean())


def safe_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC of (n, C) probabilities; NaN when it is undefined (no slides or one class)."""
    if len(y) == 0 or len(np.unique(y)) < 2:
        return float("nan")
    return auc(y, probs[:, 1] if probs.shape[1] == 2 else probs)


def val_metrics(head: nn.Module, bags, slide_ids: Sequence[str], y: np.ndarray,
                device: torch.device | str | None = None) -> dict[str, float]:
    """``{"val_loss", "val_auc"}`` of *head* on the validation slides (what the loops monitor)."""
    probs, _ = score_bags(head, bags, slide_ids, device)
    y = np.asarray(y, dtype=np.int64)
    return {"val_loss": mean_nll(probs, y), "val_auc": safe_auc(y, probs)}


__all__ = ["score_bags", "bag_outputs", "mean_nll", "safe_auc", "val_metrics"]
