"""One segmentation run end to end: load the datasets, train, score the held-out test split and
every out-of-domain set without retraining, write the run folder. `mil seg train` and the
study's ``task: segmentation`` both call :func:`run_segmentation`; a study loads each dataset
once (:func:`load_folder`) and hands it to every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seg.data import SegData
from seg.train import SegConfig


@dataclass
class SegDataset:
    """Loaded pairs and their semantic targets; ``name`` labels its metrics (``ood:<name>``)."""

    data: SegData
    truths: list[np.ndarray] = field(repr=False)
    name: str
    source: str

    def __len__(self) -> int:
        return len(self.data)


def dataset_of(data: SegData, name: str, source: str) -> SegDataset:
    """A loaded :class:`SegData` with its semantic targets."""
    from seg.data import semantic_masks

    return SegDataset(data, semantic_masks(data.masks, data.mask_kind), name, source)


def load_folder(images: str | Path, masks: str | Path | None, cfg: SegConfig) -> SegDataset:
    """The image/mask pairs of a folder (masks default to the sibling ``masks/``)."""
    from seg.data import discover_pairs, load_dataset

    images = Path(images)
    data = load_dataset(discover_pairs(images, masks), mask_kind=cfg.mask_kind,
                        n_classes=None if cfg.mask_kind == "instance" else cfg.classes)
    name = images.parent.name if images.name == "images" and images.parent.name else images.name
    return dataset_of(data, name, str(images))


def score(cfg: SegConfig, preds: Sequence[np.ndarray], ds: SegDataset, idx: Sequence[int]) -> dict:
    """:func:`seg.metrics.segmentation_metrics` of *preds* against images *idx* of *ds* (no per-image lists)."""
    from seg.metrics import segmentation_metrics

    inst = [ds.data.masks[i] for i in idx] if cfg.mask_kind == "instance" else None
    m = segmentation_metrics(preds, [ds.truths[i] for i in idx], instance_targets=inst, n_classes=cfg.classes,
                             n_boot=cfg.n_boot, seed=cfg.seed)
    return {k: v for k, v in m.items() if k != "per_image"}


def run_segmentation(cfg: SegConfig, train: SegDataset, out: str | Path, ood: Sequence[SegDataset] = (),
                     on_epoch: Callable | None = None, extra: dict | None = None) -> dict:
    """Train on *train*, score its test split and every *ood* set, write *out*; returns the metrics
    {``test`` | ``ood:<name>``: {...}}."""
    from seg.pictures import write_overlays
    from seg.train import evaluate_on, train_segmenter, write_run

    out = Path(out)
    data = train.data
    run = train_segmenter(cfg, data.images, train.truths, on_epoch)
    test = run.split["test"]
    run.metrics["test"] = score(cfg, run.predictions["test"], train, test)
    write_overlays(out / "pictures" / "test", [data.names[i] for i in test], [data.images[i] for i in test],
                   run.predictions["test"], [train.truths[i] for i in test])
    device = cfg.device if cfg.device != "auto" else "cpu"
    for ds in ood:
        preds = evaluate_on(run.model, ds.data.images, run.encoder.preprocessing(), device)
        run.metrics[f"ood:{ds.name}"] = score(cfg, preds, ds, range(len(ds)))
        write_overlays(out / "pictures" / f"ood-{ds.name}", ds.data.names, ds.data.images, preds, ds.truths)
    write_run(out, cfg, run, {"images": train.source, "skipped": data.skipped,
                              "test_images": [d.source for d in ood], **(extra or {})})
    return run.metrics


__all__ = ["SegDataset", "dataset_of", "load_folder", "run_segmentation", "score"]
