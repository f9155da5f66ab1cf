"""Training curves from the scalars a run logged to TensorBoard.

  python -m advsemiseg_jax.plot WORKDIR [--output PATH]

Draws, against the step, the losses (L_ce, L_adv, L_adv on unlabeled images,
L_semi, D's loss), the semi-mask ratio (fraction of unlabeled pixels kept by
T_semi) and the validation mIoU (with TTA when logged) into one PNG
(default WORKDIR/curves.png). A scalar the run did not log leaves its panel
saying so.
"""
import argparse
import os
import sys

import numpy as np

SEGMENTATION = (("train/loss_ce", "L_ce"), ("train/loss_semi", "L_semi"))
ADVERSARIAL = (("train/loss_adv", "L_adv (labeled)"),
               ("train/loss_semi_adv", "L_adv (unlabeled)"), ("train/loss_d", "D loss"))
RATIO = (("train/semi_ratio", "semi-mask ratio"),)
MIOU = (("val/miou", "val mIoU"), ("val/miou_nonzero_diag", "val mIoU (authors' variant)"),
        ("val/tta_miou", "val mIoU, TTA"))
PANELS = (("segmentation losses", SEGMENTATION, "loss"),
          ("adversarial losses", ADVERSARIAL, "loss"),
          ("semi-mask ratio", RATIO, "fraction of unlabeled pixels"),
          ("validation", MIOU, "mIoU (%)"))

def read_scalars(workdir: str):
  """{tag: (steps, values)} of every scalar in ``workdir``'s event files.

  A step logged twice (a resumed run repeats a few) keeps its latest value.
  """
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  acc = ea.EventAccumulator(workdir, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
  acc.Reload()
  tags = acc.Tags()
  out = {}
  for tag in tags.get("tensors", []):
    events = sorted(acc.Tensors(tag), key=lambda e: e.wall_time)
    values = {}
    for e in events:
      v = tensor_util.make_ndarray(e.tensor_proto)
      if v.dtype.kind in "fiu" and v.size == 1:
        values[e.step] = float(v.reshape(()))
    if values:
      steps = np.array(sorted(values))
      out[tag] = (steps, np.array([values[s] for s in steps]))
  for tag in tags.get("scalars", []):
    values = {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
    steps = np.array(sorted(values))
    out[tag] = (steps, np.array([values[s] for s in steps]))
  return out


def plot(workdir: str, output: str = "") -> str:
  """Writes the curves PNG and returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no such directory: {workdir!r}")
  scalars = read_scalars(workdir)
  if not scalars:
    raise FileNotFoundError(f"no TensorBoard scalars in {workdir!r} (is it a training "
                            "workdir?)")
  output = output or os.path.join(workdir, "curves.png")
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.6))
  for ax, (title, series, ylabel) in zip(axes, PANELS):
    drawn = False
    for tag, label in series:
      if tag in scalars:
        steps, values = scalars[tag]
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None,
                markersize=3, label=label)
        drawn = True
    if drawn:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center",
              transform=ax.transAxes, color="gray")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m advsemiseg_jax.plot",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="training workdir (holds events.out.tfevents.*)")
  parser.add_argument("--output", default="", help="PNG path (default WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  try:
    path = plot(args.workdir, args.output)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
