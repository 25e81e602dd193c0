"""Segmentation metrics on label arrays (plain numpy; scipy for connected components).

Semantic metrics compare two class-index maps of one image: :func:`dice`, :func:`iou`,
:func:`pixel_accuracy`. Instance metrics compare two instance maps (0 background, each positive
id one object): :func:`object_dice` (GlaS challenge) and :func:`aggregated_jaccard_index` (AJI,
MoNuSeg). :func:`label_instances` turns a binary prediction into instances so a semantic model
can be scored with them. :func:`segmentation_metrics` averages per-image values over a set of
images, with percentile bootstrap 95 % CIs that resample images. Exact definitions and the
edge cases (empty masks) are in each docstring and in docs/segmentation.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mil.seg.errors import SegError

SEMANTIC_METRICS = ("dice", "iou", "pixel_accuracy")
INSTANCE_METRICS = ("object_dice", "aji")


# ------------------------------------------------------------------ input checks
def _labels(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "b":
        return a.astype(np.int64)
    if a.dtype.kind not in "ui" and not (a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0)):
        raise SegError(f"{what} must hold integer labels, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise SegError(f"{what} has negative label {int(a.min())}; labels must be >= 0")
    return a


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.shape != t.shape:
        raise SegError(f"pred has shape {p.shape} but target has {t.shape}; they must match")
    if p.size == 0:
        raise SegError("pred and target are empty (0 pixels)")
    return p, t


def _class_counts(pred, target, n_classes: int, ignore_background: bool) -> tuple[np.ndarray, ...]:
    """(|P_c ∩ T_c|, |P_c|, |T_c|) for the scored classes c."""
    p, t = _pair(pred, target)
    if n_classes < 1 or (ignore_background and n_classes < 2):
        raise SegError(f"n_classes={n_classes} leaves no class to score (ignore_background={ignore_background})")
    top = max(int(p.max()), int(t.max()))
    if top >= n_classes:
        raise SegError(f"label {top} >= n_classes={n_classes}")
    inter = np.bincount(t[p == t].ravel(), minlength=n_classes)
    n_pred = np.bincount(p.ravel(), minlength=n_classes)
    n_true = np.bincount(t.ravel(), minlength=n_classes)
    first = 1 if ignore_background else 0
    return inter[first:], n_pred[first:], n_true[first:]


# ------------------------------------------------------------------ semantic
def dice(pred, target, n_classes: int = 2, ignore_background: bool = True) -> float:
    """Mean Dice coefficient over classes: ``2 |P_c ∩ T_c| / (|P_c| + |T_c|)``.

    *pred* and *target* are class-index maps of one image (same shape). Classes ``1..n_classes-1``
    are scored (``ignore_background=False``: also class 0). A class absent from both pred and
    target counts as 1.0 (nothing to find, nothing found), so a correctly empty prediction
    scores 1 (Dice, Ecology 1945; as in MONAI's ``ignore_empty=False``).
    """
    return float(class_dice(pred, target, n_classes, ignore_background).mean())


def class_dice(pred, target, n_classes: int = 2, ignore_background: bool = True) -> np.ndarray:
    """Dice of each scored class (classes 1..n_classes-1, or 0.. with ``ignore_background=False``);
    :func:`dice` is their mean. Same empty-class rule."""
    inter, n_pred, n_true = _class_counts(pred, target, n_classes, ignore_background)
    denom = n_pred + n_true
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def iou(pred, target, n_classes: int = 2, ignore_background: bool = True) -> float:
    """Mean intersection over union (Jaccard index) over classes: ``|P_c ∩ T_c| / |P_c ∪ T_c|``.

    Same classes and the same empty-class rule as :func:`dice` (absent from both: 1.0).
    """
    inter, n_pred, n_true = _class_counts(pred, target, n_classes, ignore_background)
    union = n_pred + n_true - inter
    per_class = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(per_class.mean())


def pixel_accuracy(pred, target) -> float:
    """Share of pixels whose predicted label equals the target label (all classes)."""
    p, t = _pair(pred, target)
    return float((p == t).mean())


# ------------------------------------------------------------------ instances
def _consecutive(ids: np.ndarray) -> np.ndarray:
    """Ids relabelled 0 (background, kept) and 1..k for the k objects present, in id order."""
    uniq, inv = np.unique(ids, return_inverse=True)
    return inv.reshape(-1) + (0 if uniq[0] == 0 else 1)


def _overlaps(pred_inst, gt_inst) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(overlap (n_gt, n_pred) pixel counts, gt areas, pred areas) over the objects present;
    ids are relabelled consecutively, so gaps in the ids do not matter."""
    p, g = (_consecutive(a.reshape(-1)) for a in _pair(pred_inst, gt_inst))
    n_p, n_g = int(p.max()) + 1, int(g.max()) + 1
    table = np.bincount(g * n_p + p, minlength=n_g * n_p).reshape(n_g, n_p)
    return table[1:, 1:], table[1:].sum(axis=1), table[:, 1:].sum(axis=0)


def _weighted_best_dice(overlap: np.ndarray, areas: np.ndarray, other_areas: np.ndarray) -> float:
    """sum_i (|A_i| / sum |A|) Dice(A_i, B*(A_i)), B* the object of maximum overlap with A_i
    (ties: the lower id; no overlap: Dice 0). Rows of *overlap* are the A objects."""
    best = overlap.argmax(axis=1)
    inter = overlap[np.arange(len(areas)), best]
    d = np.where(inter > 0, 2 * inter / (areas + other_areas[best]), 0.0)
    return float((areas / areas.sum() * d).sum())


def object_dice(pred_inst, gt_inst) -> float:
    """Object-level Dice of the GlaS challenge (Sirinukunwattana et al., Med. Image Anal. 2017).

    ``0.5 * [sum_i γ_i Dice(G_i, S*(G_i)) + sum_j σ_j Dice(S_j, G*(S_j))]`` with G_i the ground-
    truth objects, S_j the predicted ones, S*(G_i) the predicted object of maximum overlap with
    G_i (none overlapping: Dice 0), G*(S_j) likewise, γ_i = |G_i| / sum |G| and σ_j = |S_j| /
    sum |S|. A missed GT object and a spurious predicted object both lower the score in
    proportion to their area. Edge cases: both maps empty 1.0; exactly one empty 0.0.
    """
    overlap, gt_areas, pred_areas = _overlaps(pred_inst, gt_inst)
    if not len(gt_areas) or not len(pred_areas):
        return 1.0 if len(gt_areas) == len(pred_areas) else 0.0
    return 0.5 * (_weighted_best_dice(overlap, gt_areas, pred_areas)
                  + _weighted_best_dice(overlap.T, pred_areas, gt_areas))


def aggregated_jaccard_index(pred_inst, gt_inst) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017, the MoNuSeg metric).

    For each GT object G_i the predicted object S_j of maximum IoU with it is chosen (ties: the
    lower id); C += |G_i ∩ S_j|, U += |G_i ∪ S_j|, and S_j is marked used (a predicted object may
    be the match of several GT objects). A GT object overlapping no prediction adds |G_i| to U.
    Finally every unused predicted object adds its area to U. AJI = C / U. Edge cases: both maps
    empty 1.0; exactly one empty 0.0 (as the formula gives).
    """
    overlap, gt_areas, pred_areas = _overlaps(pred_inst, gt_inst)
    if not len(gt_areas) or not len(pred_areas):
        return 1.0 if len(gt_areas) == len(pred_areas) else 0.0
    unions = gt_areas[:, None] + pred_areas[None, :] - overlap
    best = (overlap / unions).argmax(axis=1)
    rows = np.arange(len(gt_areas))
    matched = overlap[rows, best] > 0
    inter = int(overlap[rows, best][matched].sum())
    union = int(unions[rows, best][matched].sum() + gt_areas[~matched].sum())
    used = np.zeros(len(pred_areas), bool)
    used[best[matched]] = True
    union += int(pred_areas[~used].sum())
    return inter / union


def label_instances(binary, connectivity: int = 8) -> np.ndarray:
    """Connected components of a foreground map (nonzero = foreground) as an instance map:
    int64, 0 background, objects 1..n (:func:`scipy.ndimage.label`). ``connectivity`` 8 (the
    default, as scikit-image's ``label``) joins diagonal neighbours, 4 only edge neighbours."""
    if connectivity not in (4, 8):
        raise SegError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    b = np.asarray(binary)
    if b.ndim != 2:
        raise SegError(f"label_instances needs a 2-D map, got shape {b.shape}")
    out, _ = ndimage.label(b != 0, structure=structure)
    return out.astype(np.int64)


# ------------------------------------------------------------------ over images
def _boot_ci(values: np.ndarray, idx: np.ndarray) -> list[float | None]:
    """Percentile 95 % CI of the mean of *values* over the resampled index rows *idx*."""
    if not len(idx):
        return [None, None]
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]


def _per_image(preds: Sequence, targets: Sequence, instance_targets: Sequence | None,
               instance_preds: Sequence | None, n_classes: int) -> dict[str, np.ndarray]:
    """Each metric of each image, as arrays over images."""
    out: dict[str, list[float]] = {m: [] for m in SEMANTIC_METRICS}
    for p, t in zip(preds, targets):
        per_class = class_dice(p, t, n_classes)
        out["dice"].append(float(per_class.mean()))
        if n_classes > 2:                      # multi-class: each class's Dice too (dice_c1, dice_c2, ...)
            for c, v in enumerate(per_class, start=1):
                out.setdefault(f"dice_c{c}", []).append(float(v))
        out["iou"].append(iou(p, t, n_classes))
        out["pixel_accuracy"].append(pixel_accuracy(p, t))
    if instance_targets is not None:
        inst = instance_preds if instance_preds is not None else [label_instances(np.asarray(p) > 0) for p in preds]
        out["object_dice"] = [object_dice(s, g) for s, g in zip(inst, instance_targets)]
        out["aji"] = [aggregated_jaccard_index(s, g) for s, g in zip(inst, instance_targets)]
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def segmentation_metrics(preds: Sequence, targets: Sequence, *, instance_targets: Sequence | None = None,
                         instance_preds: Sequence | None = None, n_classes: int = 2, n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Per-image metrics averaged over images, with bootstrap 95 % CIs over images.

    *preds*, *targets*: class-index maps, one per image. With *instance_targets* (GT instance
    maps) also ``object_dice`` and ``aji``, the predicted instances being *instance_preds* or,
    by default, the 8-connected components of ``pred > 0`` (:func:`label_instances`). Returns
    ``n`` (images), ``<metric>`` (mean over images), ``<metric>_ci`` = [lo, hi] (percentile
    bootstrap: *n_boot* resamples of the images with replacement, one seeded draw shared by all
    metrics; ``n_boot=0``: [None, None]) and ``per_image`` {metric: list}. Deterministic for *seed*.
    """
    preds, targets = list(preds), list(targets)
    if not preds or len(preds) != len(targets):
        raise SegError(f"need one target per prediction and at least one image; got {len(preds)} "
                       f"predictions and {len(targets)} targets")
    for extra, what in ((instance_targets, "instance_targets"), (instance_preds, "instance_preds")):
        if extra is not None and len(extra) != len(preds):
            raise SegError(f"{what} has {len(extra)} maps for {len(preds)} images")
    values = _per_image(preds, targets, instance_targets, instance_preds, n_classes)
    n = len(preds)
    idx = np.random.default_rng(seed).integers(0, n, (max(0, n_boot), n))
    out: dict = {"n": n}
    for name, v in values.items():
        out[name] = float(v.mean())
        out[f"{name}_ci"] = _boot_ci(v, idx)
    out["per_image"] = {name: v.tolist() for name, v in values.items()}
    return out


__all__ = ["INSTANCE_METRICS", "SEMANTIC_METRICS", "aggregated_jaccard_index", "class_dice", "dice", "iou",
           "label_instances", "object_dice", "pixel_accuracy", "segmentation_metrics"]
