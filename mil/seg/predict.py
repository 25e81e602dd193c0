"""Apply a trained segmentation run to new images: the run's architecture and encoder are rebuilt
from its config.json, its model.pt (weights only) loaded, and every image segmented whole."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from featstore.core.errors import first_line
from mil.seg.errors import SegError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_run(run: str | Path) -> tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode, its config, the encoder's preprocessing) of a `mil seg train` folder."""
    from mil.seg.model import build_segmenter

    run = Path(run)
    try:
        cfg = json.loads((run / "config.json").read_text())
        state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError) as exc:
        raise SegError(f"{run}: not a finished `mil seg train` run ({exc})") from None
    if cfg.get("kind") != "segmentation":
        raise SegError(f"{run}/config.json is not a segmentation run")
    model, enc = build_segmenter(cfg["arch"], cfg["encoder"], "random", classes=int(cfg["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SegError(f"{run}/model.pt does not fit {cfg['arch']} on {cfg['encoder']}: "
                       f"{first_line(exc)}") from None
    return model.eval(), cfg, enc.preprocessing()


def predict_folder(run: str | Path, images: str | Path, out: str | Path) -> tuple[dict | None, int]:
    """Segment every image of *images* into *out*; when ``images/../masks`` pairs exist, score them.
    Returns (metrics or None, images segmented)."""
    from featstore.read.images import load_rgb
    from mil.seg.pictures import write_overlays
    from mil.seg.train import evaluate_on

    model, cfg, pre = load_run(run)
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SegError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = [np.asarray(load_rgb(p)) for p in files]
    preds = evaluate_on(model, arrays, pre)
    write_overlays(Path(out), [p.stem for p in files], arrays, preds, limit=len(files))
    masks = Path(images).parent / "masks"
    if not masks.is_dir():
        return None, len(files)
    from mil.seg.data import discover_pairs, load_dataset, semantic_masks
    from mil.seg.metrics import segmentation_metrics

    data = load_dataset(discover_pairs(images, masks), mask_kind=cfg["mask_kind"],
                        n_classes=None if cfg["mask_kind"] == "instance" else int(cfg["classes"]))
    by_name = dict(zip([p.stem for p in files], preds))
    m = segmentation_metrics([by_name[n] for n in data.names], semantic_masks(data.masks, cfg["mask_kind"]),
                             n_classes=int(cfg["classes"]), n_boot=0)
    return {k: v for k, v in m.items() if k != "per_image"}, len(files)


__all__ = ["load_run", "predict_folder"]
