"""Predicted masks as pictures: the image with the prediction filled and the truth outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

PRED = np.array([255, 40, 40], np.float32)     # predicted foreground, filled at 40 %
TRUTH = np.array([40, 220, 40], np.uint8)      # true boundaries, drawn solid


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """(H, W, 3) uint8: *pred* > 0 tinted red, the boundary of *truth* > 0 in green."""
    out = image.astype(np.float32)
    fg = pred > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * PRED
    out = out.clip(0, 255).astype(np.uint8)
    if truth is not None:
        t = truth > 0
        out[t & ~ndimage.binary_erosion(t)] = TRUTH
    return out


def write_overlays(folder: Path, names, images, preds, truths=None, limit: int = 8) -> list[Path]:
    """Up to *limit* overlays ``folder/<name>.png`` beside each predicted mask ``<name>_pred.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(list(names)[:limit]):
        truth = truths[i] if truths is not None else None
        p = folder / f"{name}.png"
        Image.fromarray(overlay(images[i], preds[i], truth)).save(p)
        Image.fromarray((np.asarray(preds[i]) * (255 // max(1, int(np.max(preds[i])) or 1))).astype(np.uint8)).save(
            folder / f"{name}_pred.png")
        paths.append(p)
    return paths


__all__ = ["overlay", "write_overlays"]
