"""Confusion-matrix metrics against brute-force loops on random arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ralis_gym.segmentation.metrics import SegmentationMetrics, confusion_matrix


def _brute(pred, gt, c, ignore):
    cm = np.zeros((c, c), dtype=np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != ignore:
            cm[g, p] += 1
    iou = []
    for k in range(c):
        tp = cm[k, k]
        union = cm[k, :].sum() + cm[:, k].sum() - tp
        iou.append(tp / union if union else np.nan)
    return cm, np.array(iou)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    c, ignore = 6, 6
    gt = rng.integers(0, c + 1, size=(3, 17, 23))
    pred = rng.integers(0, c, size=gt.shape)
    pred[pred == 4] = 0  # class 4 never predicted
    gt[gt == 5] = ignore  # class 5 never in gt
    cm_ref, iou_ref = _brute(pred, gt, c, ignore)
    m = SegmentationMetrics.from_confusion(confusion_matrix(pred, gt, c, ignore))
    assert (m.confusion == cm_ref).all()
    np.testing.assert_allclose(m.iou, iou_ref, equal_nan=True)
    assert m.miou == pytest.approx(np.nanmean(iou_ref))
    valid = gt != ignore
    assert m.pixel_accuracy == pytest.approx((pred[valid] == gt[valid]).mean())


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 0]])
    m = SegmentationMetrics.from_confusion(confusion_matrix(pred, gt, 3, 255))
    assert np.isnan(m.iou[2])
    assert m.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.to_dict(("a", "b", "c"))["per_class_iou"]["c"] is None


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError, match="target holds ids"):
        confusion_matrix(np.zeros(3, int), np.array([0, 9, 1]), 3, 255)
