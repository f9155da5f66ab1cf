"""The metrics against hand-computed confusion matrices, and the authors'
non-zero-diagonal mIoU against the standard one."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from advsemiseg_jax import metrics


def test_hand_computed_matrix_with_absent_class():
  # Rows: ground truth, columns: prediction. Class 3 appears nowhere.
  conf = np.array([[5, 1, 0, 0],
                   [2, 3, 1, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
  r = metrics.summarize(conf, ["bg", "a", "b", "c"])
  # IoU: bg 5/(6+7-5)=5/8, a 3/(6+4-3)=3/7, b 0/(0+1-0)=0 (predicted, never right),
  # c absent from GT and prediction: None, not counted.
  assert r["per_class_iou"]["bg"] == pytest.approx(100 * 5 / 8)
  assert r["per_class_iou"]["a"] == pytest.approx(100 * 3 / 7)
  assert r["per_class_iou"]["b"] == 0.0
  assert r["per_class_iou"]["c"] is None
  assert r["miou"] == pytest.approx(100 * (5 / 8 + 3 / 7 + 0) / 3)
  assert r["miou_nonzero_diag"] == pytest.approx(100 * (5 / 8 + 3 / 7) / 2)
  assert r["pixel_accuracy"] == pytest.approx(100 * 8 / 12)
  # Class accuracy over classes present in GT only: bg 5/6, a 3/6.
  assert r["mean_class_accuracy"] == pytest.approx(100 * (5 / 6 + 3 / 6) / 2)
  assert r["num_pixels"] == 12


def test_all_ignore_batch_adds_nothing():
  label = jnp.full((2, 4, 4), 255, jnp.int32)
  pred = jnp.zeros((2, 4, 4), jnp.int32)
  conf = np.asarray(metrics.confusion_matrix(pred, label, 3))
  assert conf.sum() == 0
  r = metrics.summarize(conf)
  assert r["miou"] == r["miou_nonzero_diag"] == r["mean_class_accuracy"] == 0.0
  assert all(v is None for v in r["per_class_iou"].values())


def test_matrix_summed_over_batches_equals_one_pass():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, (6, 5, 7))
  label[label == 3] = 255                      # some ignore pixels
  pred = rng.integers(0, 3, (6, 5, 7))
  whole = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 3)
  step = jax.jit(metrics.confusion_matrix, static_argnums=2)
  parts = sum(np.asarray(step(jnp.asarray(pred[i:i + 2]), jnp.asarray(label[i:i + 2]), 3))
              for i in range(0, 6, 2))
  np.testing.assert_array_equal(parts, np.asarray(whole))
  # The same counts as a plain numpy histogram.
  valid = label < 3
  ref = np.zeros((3, 3), np.int64)
  np.add.at(ref, (label[valid], pred[valid]), 1)
  np.testing.assert_array_equal(parts, ref)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.int64, (5, 5), elements=st.integers(0, 6)))
def test_authors_variant_differs_exactly_where_a_class_has_no_tp(conf):
  r = metrics.summarize(conf)
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1), 0.0)
  zero_tp_present = present & (tp == 0)
  if present.any():
    assert r["miou"] == pytest.approx(100 * iou[present].mean())
  if (tp > 0).any():
    assert r["miou_nonzero_diag"] == pytest.approx(100 * iou[tp > 0].mean())
  # Equal when every present class has a true positive; otherwise the
  # authors' variant is strictly higher (it drops IoU-0 classes) as long as
  # some class has a true positive.
  if not zero_tp_present.any():
    assert r["miou_nonzero_diag"] == pytest.approx(r["miou"])
  elif (tp > 0).any():
    assert r["miou_nonzero_diag"] > r["miou"] + 1e-9
    n, k = present.sum(), (tp > 0).sum()
    assert r["miou_nonzero_diag"] == pytest.approx(r["miou"] * n / k)


def test_format_table_lists_every_number():
  conf = np.array([[3, 1, 0], [2, 0, 0], [0, 0, 4]])
  r = metrics.summarize(conf, ["road", "sky", "car"])
  r["protocol"] = "pad: padded to 8x8"
  r["tta"] = dict(r)
  table = metrics.format_table(r)
  for text in ("road", "sky", "car", "mIoU (authors)", "mean class acc.", "mIoU, TTA",
               "protocol: pad"):
    assert text in table
  assert f"{r['miou']:5.1f}" in table and f"{r['miou_nonzero_diag']:5.1f}" in table
