"""mil.seg.metrics against hand-worked numbers and straightforward numpy on small fixed masks."""

from __future__ import annotations

import numpy as np
import pytest

from mil.seg.errors import SegError
from mil.seg.metrics import (aggregated_jaccard_index, dice, iou, label_instances, object_dice, pixel_accuracy,
                         segmentation_metrics)

# 4x4: target has 6 foreground px, pred 5, they share 4.
TARGET = np.array([[1, 1, 1, 0],
                   [1, 1, 1, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
PRED = np.array([[1, 1, 0, 0],
                 [1, 1, 0, 0],
                 [0, 0, 0, 0],
                 [0, 0, 0, 1]])


def test_dice_iou_accuracy_by_hand():
    assert dice(PRED, TARGET) == pytest.approx(2 * 4 / (5 + 6))          # 8/11
    assert iou(PRED, TARGET) == pytest.approx(4 / 7)                       # union 5 + 6 - 4
    assert pixel_accuracy(PRED, TARGET) == pytest.approx(13 / 16)          # 2 + 1 pixels wrong
    # with background: background Dice = 2*9/(11+10) = 18/21
    assert dice(PRED, TARGET, ignore_background=False) == pytest.approx((8 / 11 + 18 / 21) / 2)


def _numpy_dice(p, t, classes):
    out = []
    for c in classes:
        a, b = p == c, t == c
        s = a.sum() + b.sum()
        out.append(1.0 if s == 0 else 2 * (a & b).sum() / s)
    return float(np.mean(out))


def test_multiclass_equals_per_class_numpy_and_absent_class_counts_one():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, (16, 16))       # class 3 absent from both
    p = np.where(rng.random((16, 16)) < 0.7, t, rng.integers(0, 3, (16, 16)))
    assert dice(p, t, n_classes=4) == pytest.approx(_numpy_dice(p, t, [1, 2, 3]))
    assert dice(p, t, n_classes=4) == pytest.approx((_numpy_dice(p, t, [1]) + _numpy_dice(p, t, [2]) + 1) / 3)
    inter = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in (1, 2)]
    assert iou(p, t, n_classes=3) == pytest.approx(np.mean(inter))
    from mil.seg.metrics import class_dice, segmentation_metrics

    assert class_dice(p, t, n_classes=4) == pytest.approx([_numpy_dice(p, t, [1]), _numpy_dice(p, t, [2]), 1.0])
    m = segmentation_metrics([p, t], [t, t], n_classes=3, n_boot=0)
    assert m["dice_c2"] == pytest.approx((_numpy_dice(p, t, [2]) + 1) / 2) and "dice_c3" not in m


def test_perfect_and_empty_cases():
    assert dice(TARGET, TARGET) == iou(TARGET, TARGET) == pixel_accuracy(TARGET, TARGET) == 1.0
    empty = np.zeros((4, 4), int)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0       # absent from both: 1
    assert dice(empty, TARGET) == 0.0 and dice(TARGET, empty) == 0.0
    assert object_dice(empty, empty) == 1.0 and aggregated_jaccard_index(empty, empty) == 1.0
    assert object_dice(empty, TARGET) == 0.0 and aggregated_jaccard_index(TARGET, empty) == 0.0


def test_bad_input_is_one_seg_error():
    with pytest.raises(SegError, match="shape"):
        dice(PRED, TARGET[:3])
    with pytest.raises(SegError, match="n_classes"):
        dice(PRED * 2, TARGET)
    with pytest.raises(SegError, match="negative"):
        iou(-PRED, TARGET)


# Two GT objects (4 px each); pred: one object covering G1 plus 2 px of stroma, and a 1-px spurious
# object; G2 is missed. Ids are deliberately not 1..n.
GT_INST = np.array([[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 5, 5],
                    [0, 0, 5, 5]])
PRED_INST = np.array([[3, 3, 3, 0],
                      [3, 3, 3, 0],
                      [0, 0, 0, 0],
                      [7, 0, 0, 0]])


def test_object_dice_by_hand():
    # GT side: G1 -> S3 Dice 8/10, G2 unmatched 0; weights 4/8 each -> 0.4
    # pred side: S3 -> G1 Dice 0.8 weight 6/7, S7 unmatched 0 -> 0.8 * 6/7
    assert object_dice(PRED_INST, GT_INST) == pytest.approx(0.5 * (0.4 + 0.8 * 6 / 7))
    assert object_dice(GT_INST, GT_INST) == 1.0
    assert object_dice(PRED_INST, GT_INST) == pytest.approx(0.5428571428571429)


def test_aji_by_hand():
    # G1 -> S3: C = 4, U = 6; G2 missed: U += 4; S7 unused: U += 1 -> 4 / 11
    assert aggregated_jaccard_index(PRED_INST, GT_INST) == pytest.approx(4 / 11)
    assert aggregated_jaccard_index(GT_INST * 3, GT_INST) == 1.0


def _numpy_aji(pred, gt):
    """Kumar et al.'s loop, written out object by object."""
    c = u = 0
    used = set()
    pred_ids = [j for j in np.unique(pred) if j]
    for i in [i for i in np.unique(gt) if i]:
        g = gt == i
        ious = [((g & (pred == j)).sum() / (g | (pred == j)).sum(), j) for j in pred_ids]
        best, j = max(ious, key=lambda x: (x[0], -x[1]))
        if best > 0:
            c += (g & (pred == j)).sum()
            u += (g | (pred == j)).sum()
            used.add(j)
        else:
            u += g.sum()
    u += sum((pred == j).sum() for j in pred_ids if j not in used)
    return c / u


def _numpy_object_dice(pred, gt):
    def side(a, b):
        a_ids = [i for i in np.unique(a) if i]
        total = sum((a == i).sum() for i in a_ids)
        s = 0.0
        for i in a_ids:
            ai = a == i
            over = [((ai & (b == j)).sum(), j) for j in np.unique(b[ai]) if j]
            if over:
                _, j = max(over, key=lambda x: (x[0], -x[1]))
                s += ai.sum() / total * 2 * (ai & (b == j)).sum() / (ai.sum() + (b == j).sum())
        return s
    return 0.5 * (side(gt, pred) + side(pred, gt))


def test_instance_metrics_equal_object_loops_on_random_blobs():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gt = label_instances(rng.random((24, 24)) < 0.35, connectivity=4)
        pred = label_instances(rng.random((24, 24)) < 0.35, connectivity=4)
        assert aggregated_jaccard_index(pred, gt) == pytest.approx(_numpy_aji(pred, gt))
        assert object_dice(pred, gt) == pytest.approx(_numpy_object_dice(pred, gt))


def test_label_instances_connectivity():
    diag = np.array([[1, 0, 0],
                     [0, 1, 0],
                     [0, 0, 1]])
    assert label_instances(diag).max() == 1                      # 8-connected: one object
    four = label_instances(diag, connectivity=4)
    assert four.max() == 3 and set(np.unique(four).tolist()) == {0, 1, 2, 3}
    with pytest.raises(SegError):
        label_instances(diag, connectivity=6)


def test_segmentation_metrics_means_and_bootstrap():
    gts = [GT_INST, GT_INST, GT_INST]
    preds = [GT_INST > 0, PRED_INST > 0, np.zeros((4, 4), int)]
    m = segmentation_metrics(preds, [g > 0 for g in gts], instance_targets=gts, n_boot=500, seed=1)
    assert m["n"] == 3
    d = [1.0, dice(PRED_INST > 0, GT_INST > 0), 0.0]
    assert m["dice"] == pytest.approx(np.mean(d)) and m["per_image"]["dice"] == pytest.approx(d)
    # GT's two squares touch diagonally, so the perfect semantic map is ONE 8-connected object:
    # object Dice = 2*4/(4+8) on both sides = 2/3; AJI = (4 + 4) / (8 + 8) = 0.5
    assert m["per_image"]["object_dice"] == pytest.approx([2 / 3, object_dice(PRED_INST, GT_INST), 0.0])
    assert m["per_image"]["aji"] == pytest.approx([0.5, 4 / 11, 0.0])
    for name in ("dice", "iou", "pixel_accuracy", "object_dice", "aji"):
        lo, hi = m[f"{name}_ci"]
        assert min(m["per_image"][name]) <= lo <= m[name] <= hi <= max(m["per_image"][name])
    again = segmentation_metrics(preds, [g > 0 for g in gts], instance_targets=gts, n_boot=500, seed=1)
    assert again == m
    assert segmentation_metrics(preds, [g > 0 for g in gts], n_boot=0)["dice_ci"] == [None, None]


def test_segmentation_metrics_perfect_is_one_everywhere():
    gts = [GT_INST, PRED_INST]
    m = segmentation_metrics([g > 0 for g in gts], [g > 0 for g in gts], instance_targets=gts,
                             instance_preds=gts, n_boot=100)
    for name in ("dice", "iou", "pixel_accuracy", "object_dice", "aji"):
        assert m[name] == 1.0 and m[f"{name}_ci"] == [1.0, 1.0]
    with pytest.raises(SegError, match="one target per prediction"):
        segmentation_metrics([PRED], [], n_boot=0)
