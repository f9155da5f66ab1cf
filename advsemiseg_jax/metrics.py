"""Segmentation metrics from one confusion matrix.

``confusion_matrix`` runs on device (inside jit) and is summed over batches;
everything else is host-side arithmetic on the (C, C) matrix whose rows are
ground truth and columns predictions.
"""
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, label, num_classes: int):
  """(C, C) int32 counts over pixels whose label is a class (< C)."""
  valid = (label >= 0) & (label < num_classes)
  idx = jnp.where(valid, label * num_classes + pred, 0).reshape(-1)
  counts = jnp.bincount(idx, weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def summarize(conf, class_names=None):
  """Metrics (percent) from a confusion matrix (rows: ground truth).

  A class absent from both ground truth and prediction has IoU ``None`` and
  is left out of ``miou``; an all-ignore matrix gives zeros, not NaNs.

  ``miou``: mean IoU over classes present in ground truth or prediction (the
  standard definition). ``miou_nonzero_diag``: the authors' evaluation script's
  variant, averaging only classes with a non-zero diagonal entry.
  """
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  gt, pred = conf.sum(1), conf.sum(0)
  union = gt + pred - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1), np.nan)
  acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
  names = class_names or [str(i) for i in range(len(tp))]
  nonzero = tp > 0
  return {
      "miou": float(100 * np.nanmean(iou)) if present.any() else 0.0,
      "miou_nonzero_diag": float(100 * iou[nonzero].mean()) if nonzero.any() else 0.0,
      "per_class_iou": {n: (None if np.isnan(v) else float(100 * v))
                        for n, v in zip(names, iou)},
      "pixel_accuracy": float(100 * tp.sum() / max(conf.sum(), 1)),
      "mean_class_accuracy": float(100 * np.nanmean(acc)) if (gt > 0).any() else 0.0,
      "num_pixels": int(conf.sum()),
  }


def format_table(results) -> str:
  """The per-class IoU table printed after each evaluation."""
  names = list(results["per_class_iou"])
  width = max(15, max(len(n) for n in names))
  lines = [f"{'class':<{width}}  IoU (%)"]
  for name, value in results["per_class_iou"].items():
    lines.append(f"{name:<{width}}  {'  n/a' if value is None else f'{value:5.1f}'}")
  lines.append(f"{'mIoU':<{width}}  {results['miou']:5.1f}")
  if "miou_nonzero_diag" in results:
    lines.append(f"{'mIoU (authors)':<{width}}  {results['miou_nonzero_diag']:5.1f}"
                 "  (mean over classes with a non-zero diagonal)")
  lines.append(f"{'pixel acc.':<{width}}  {results['pixel_accuracy']:5.1f}")
  if "mean_class_accuracy" in results:
    lines.append(f"{'mean class acc.':<{width}}  {results['mean_class_accuracy']:5.1f}")
  if "tta" in results:
    lines.append(f"{'mIoU, TTA':<{width}}  {results['tta']['miou']:5.1f}")
  if "protocol" in results:
    lines.append(f"protocol: {results['protocol']}")
  return "\n".join(lines)
