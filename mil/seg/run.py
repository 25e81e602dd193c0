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

from mil.seg.data import SegData
from mil.seg.errors import SegError
from mil.seg.config import SegConfig, WsiSource  # noqa: F401  (WsiSource re-exported)


@dataclass
class SegDataset:
    """Loaded pairs and their semantic targets; ``name`` labels its metrics (``ood:<name>``)."""

    data: SegData
    truths: list[np.ndarray] = field(repr=False)
    name: str
    source: str
    groups: list[str] | None = None          # the slide of each WSI patch: splits keep a slide on one side

    def __len__(self) -> int:
        return len(self.data)


def dataset_of(data: SegData, name: str, source: str) -> SegDataset:
    """A loaded :class:`SegData` with its semantic targets (and, for WSI patches, their slides)."""
    from mil.seg.data import semantic_masks

    sources = getattr(data, "sources", None)
    groups = [str(src[0]) for src in sources] if sources else None
    return SegDataset(data, semantic_masks(data.masks, data.mask_kind), name, source, groups)


def load_wsi(src: WsiSource, cfg: SegConfig, name: str | None = None) -> SegDataset:
    """The patches of *src*'s slides; a multiclass mask needs ``cfg.classes`` > its largest id."""
    from mil.seg.annotations import pair_by_stem
    from mil.seg.wsi import wsi_dataset

    if not src.slides:
        raise SegError("a whole-slide dataset needs slides (a folder of slides and annotations)")
    slides, anns = pair_by_stem(src.slides, src.annotations)
    data = wsi_dataset(slides, anns, mpp=src.mpp, patch=src.patch, stride=src.stride, classes=src.class_map(),
                       mask_kind=cfg.mask_kind, min_annotated=src.min_annotated,
                       max_patches_per_slide=src.max_patches, seed=cfg.seed, slide_mpp=src.slide_mpp,
                       default_class=src.default_class)
    if cfg.mask_kind == "multiclass" and (data.n_classes or 2) > cfg.classes:
        names = ", ".join(f"{i} {n}" for n, i in sorted(data.classes.items(), key=lambda kv: kv[1]))
        raise SegError(f"{src.slides}: the annotations hold {data.n_classes} classes with background "
                       f"(0 background, {names}); pass --classes {data.n_classes}")
    return dataset_of(data, name or _set_name(Path(src.slides)), str(src.slides))


def load_folder(images: str | Path, masks: str | Path | None, cfg: SegConfig) -> SegDataset:
    """The image/mask pairs of a folder (masks default to the sibling ``masks/``)."""
    from mil.seg.data import discover_pairs, load_dataset

    images = Path(images)
    data = load_dataset(discover_pairs(images, masks), mask_kind=cfg.mask_kind,
                        n_classes=None if cfg.mask_kind == "instance" else cfg.classes)
    return dataset_of(data, _set_name(images), str(images))


def _set_name(folder: Path) -> str:
    """A dataset's name in the metrics (``ood:<name>``): the folder's, or its parent's when the
    folder is a generic ``images`` / ``slides``."""
    return folder.parent.name if folder.name in ("images", "slides") and folder.parent.name else folder.name


def score(cfg: SegConfig, preds: Sequence[np.ndarray], ds: SegDataset, idx: Sequence[int]) -> dict:
    """:func:`mil.seg.metrics.segmentation_metrics` of *preds* against images *idx* of *ds* (no per-image lists)."""
    from mil.seg.metrics import segmentation_metrics

    inst = [ds.data.masks[i] for i in idx] if cfg.mask_kind == "instance" else None
    m = segmentation_metrics(preds, [ds.truths[i] for i in idx], instance_targets=inst, n_classes=cfg.classes,
                             n_boot=cfg.n_boot, seed=cfg.seed)
    return {k: v for k, v in m.items() if k != "per_image"}


def run_segmentation(cfg: SegConfig, train: SegDataset, out: str | Path, ood: Sequence[SegDataset] = (),
                     on_epoch: Callable | None = None, extra: dict | None = None) -> dict:
    """Train on *train*, score its test split and every *ood* set, write *out*; returns the metrics
    {``test`` | ``ood:<name>``: {...}}."""
    from mil.seg.pictures import write_overlays
    from mil.seg.train import evaluate_on, train_segmenter, write_run

    out = Path(out)
    data = train.data
    run = train_segmenter(cfg, data.images, train.truths, on_epoch, groups=train.groups)
    test = run.split["test"]
    run.metrics["test"] = score(cfg, run.predictions["test"], train, test)
    write_overlays(out / "pictures" / "test", [data.names[i] for i in test], [data.images[i] for i in test],
                   run.predictions["test"], [train.truths[i] for i in test])
    device = cfg.device if cfg.device != "auto" else "cpu"
    for ds in ood:
        preds = evaluate_on(run.model, ds.data.images, run.encoder.preprocessing(), device)
        run.metrics[f"ood:{ds.name}"] = score(cfg, preds, ds, range(len(ds)))
        write_overlays(out / "pictures" / f"ood-{ds.name}", ds.data.names, ds.data.images, preds, ds.truths)
    names = getattr(data, "classes", None)
    write_run(out, cfg, run, {"images": train.source, "skipped": data.skipped,
                              "test_images": [d.source for d in ood],
                              **({"class_ids": names, "mpp": data.mpp} if names is not None else {}),
                              **(extra or {})})
    return run.metrics


__all__ = ["SegDataset", "WsiSource", "dataset_of", "load_folder", "load_wsi", "run_segmentation", "score"]
