"""mIoU and friends against hand-computed confusion matrices."""
import jax.numpy as jnp
import numpy as np
import pytest

from advsemiseg_jax import metrics


def test_confusion_matrix_counts_and_ignores():
  label = jnp.array([[0, 1, 2, 255], [1, 1, 0, 3]])
  pred = jnp.array([[0, 2, 2, 1], [1, 0, 0, 2]])
  conf = np.asarray(metrics.confusion_matrix(pred, label, 3))
  expected = np.array([[2, 0, 0], [1, 1, 1], [0, 0, 1]])   # label 255 and 3 (>= C) ignored
  np.testing.assert_array_equal(conf, expected)


def test_summary_hand_computed():
  conf = np.array([[2, 0, 0], [1, 1, 1], [0, 0, 1]])
  r = metrics.summarize(conf, ["a", "b", "c"])
  iou = [2 / 3, 1 / 3, 1 / 2]
  assert r["per_class_iou"] == pytest.approx({"a": 100 * iou[0], "b": 100 * iou[1],
                                              "c": 100 * iou[2]})
  assert r["miou"] == pytest.approx(100 * np.mean(iou))
  assert r["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
  assert r["mean_class_accuracy"] == pytest.approx(100 * np.mean([1, 1 / 3, 1]))


def test_absent_class_and_code_variant():
  # Class 2 absent from GT and prediction; class 1 present but never right.
  conf = np.array([[3, 1, 0], [2, 0, 0], [0, 0, 0]])
  r = metrics.summarize(conf)
  assert r["per_class_iou"]["2"] is None
  assert r["miou"] == pytest.approx(100 * np.mean([3 / 6, 0.0]))
  assert r["miou_nonzero_diag"] == pytest.approx(100 * 3 / 6)   # only class 0 counted


def test_all_ignore_is_finite():
  r = metrics.summarize(np.zeros((3, 3), np.int64))
  assert r["miou"] == 0.0 and r["pixel_accuracy"] == 0.0 and r["num_pixels"] == 0


def test_format_table_names_classes():
  r = metrics.summarize(np.array([[1, 0], [0, 1]]), ["road", "sky"])
  table = metrics.format_table(r)
  assert "road" in table and "sky" in table and "100.0" in table
