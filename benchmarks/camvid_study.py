"""Semi-supervised study on real images: CamVid (../shared/data/camvid_small).

Label fractions x arms x split seeds, each a run of configs/camvid.py with the
same number of steps, from scratch (tiny ResNet). Writes, under --out:
  camvid_study.json   every run's val mIoU (and per-class IoU), keyed by run
  camvid_study.md     mean and spread (sample std) of mIoU per arm and fraction
  camvid_study.png    mIoU against label fraction, one line per arm
  selected_pixels.md  the paper's Table 7 analysis from one full-method run:
                      share of val pixels with sigmoid(D) >= T_semi and the
                      accuracy of S's argmax on them, for T in {0.1, 0.2, 0.3}

  python benchmarks/camvid_study.py                            # the whole study
  python benchmarks/camvid_study.py --arms=adv --fractions=1/8 --seeds=1   # one run
  python benchmarks/camvid_study.py --arms=adv --fractions=1/8 --seeds=1 \
      --workdirs=/tmp/camvid_rerun     # retrain it elsewhere: says if it reproduces
  python benchmarks/camvid_study.py --report_only              # tables from the JSON

Runs are resumable: a finished run (its workdir's results.json at the final
step) is read, not retrained. Without the data folder it prints why and exits 0.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {"baseline": "baseline", "adv": "adv", "semi": ""}   # arm -> config variant
ARM_LABELS = {"baseline": "L_ce", "adv": "+ L_adv", "semi": "+ L_adv + L_semi"}
FRACTION_VALUES = {"1/8": 0.125, "1/4": 0.25, "1/2": 0.5}
THRESHOLDS = (0.1, 0.2, 0.3)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "camvid_small"))
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--workdirs", default="/tmp/camvid_study")
  p.add_argument("--fractions", default="1/8,1/4")
  p.add_argument("--arms", default="baseline,adv,semi")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=0, help="override num_steps (0 = config's)")
  p.add_argument("--variant", default="", help="extra config variants, e.g. quick")
  p.add_argument("--report_only", action="store_true")
  return p.parse_args(argv)


def run_key(fraction, arm, seed):
  return f"{fraction}|{arm}|{seed}"


def make_config(args, fraction, arm, seed):
  from advsemiseg_jax.config import load_config
  variants = ",".join(v for v in (fraction, ARMS[arm], args.variant) if v)
  config = load_config(os.path.join(ROOT, "configs", f"camvid.py:{variants}"))
  config.unlock()
  config.data.root = os.path.abspath(args.data)
  config.data.split_seed = seed
  if args.steps:
    config.num_steps = args.steps
    config.loss.semi_start = min(config.loss.semi_start, args.steps // 3)
    config.checkpoint_every = max(args.steps // 3, 1)
  config.lock()
  return config


def run_one(args, fraction, arm, seed):
  """Trains one run (or reads its finished results) and returns the record."""
  from advsemiseg_jax.train import train_and_evaluate
  config = make_config(args, fraction, arm, seed)
  workdir = os.path.join(args.workdirs, f"{fraction.replace('/', '-')}_{arm}_seed{seed}")
  path = os.path.join(workdir, "results.json")
  start = time.time()
  if os.path.exists(path) and json.load(open(path)).get("step") == config.num_steps:
    results = json.load(open(path))
  else:
    results = train_and_evaluate(config, workdir)
  return {"fraction": fraction, "arm": arm, "seed": seed, "steps": config.num_steps,
          "miou": results["miou"], "per_class_iou": results["per_class_iou"],
          "workdir": workdir, "seconds": round(time.time() - start, 1)}


def selected_pixel_accuracy(args, record):
  """Share of val pixels kept at each T_semi and S's accuracy on them."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from advsemiseg_jax import checkpoint, models
  from advsemiseg_jax.data import streams
  from advsemiseg_jax.train import Trainer
  config = make_config(args, record["fraction"], record["arm"], record["seed"])
  trainer = Trainer(config, record["workdir"])
  mngr = checkpoint.manager(record["workdir"], config.max_to_keep)
  state = checkpoint.restore_latest(mngr, trainer.abstract_state)
  mngr.close()

  @jax.jit
  def maps(state, images):
    logits = trainer.generator.apply(trainer.eval_variables(state), images, train=False)
    logits = models.upsample_logits(logits, images.shape[1:3])
    d = trainer.discriminator.apply({"params": state.d_params}, jax.nn.softmax(logits))
    return jnp.argmax(logits, -1), jax.nn.sigmoid(models.confidence_logits(d, images.shape[1:3]))

  kept = np.zeros(len(THRESHOLDS)); correct = np.zeros(len(THRESHOLDS)); total = 0
  for batch in streams.eval_batches(trainer.source, config.data):
    pred, conf = jax.device_get(maps(state, batch["image"]))
    valid = batch["label"] != 255
    total += valid.sum()
    for i, t in enumerate(THRESHOLDS):
      sel = valid & (conf >= t)
      kept[i] += sel.sum()
      correct[i] += (sel & (pred == batch["label"])).sum()
  lines = ["| T_semi | pixels kept (%) | accuracy on kept pixels (%) |", "|---|---|---|"]
  for i, t in enumerate(THRESHOLDS):
    acc = 100 * correct[i] / max(kept[i], 1)
    lines.append(f"| {t} | {100 * kept[i] / max(total, 1):.1f} | {acc:.2f} |")
  return "\n".join(lines)


def report(records, out):
  """Mean and spread table, and the plot."""
  import numpy as np
  fractions = [f for f in FRACTION_VALUES if any(r["fraction"] == f for r in records)]
  arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
  lines = ["| arm | " + " | ".join(f"{f} labeled" for f in fractions) + " |",
           "|---|" + "---|" * len(fractions)]
  curves = {}
  for arm in arms:
    cells, curve = [], []
    for f in fractions:
      values = [r["miou"] for r in records if r["arm"] == arm and r["fraction"] == f]
      if not values:
        cells.append("-"); curve.append(None); continue
      std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
      spread = f" ± {std:.1f}" if len(values) > 1 else ""
      cells.append(f"{np.mean(values):.1f}{spread} (n={len(values)})")
      curve.append((FRACTION_VALUES[f], float(np.mean(values)), std))
    lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    curves[arm] = [c for c in curve if c]
  table = "\n".join(lines)
  with open(os.path.join(out, "camvid_study.md"), "w") as f:
    f.write(table + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for arm, curve in curves.items():
    xs, ys, es = zip(*curve)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=ARM_LABELS[arm])
  ax.set_xscale("log", base=2)
  ax.set_xticks([FRACTION_VALUES[f] for f in fractions], fractions)
  ax.set_xlabel("labeled fraction of CamVid train"); ax.set_ylabel("val mIoU (%)")
  ax.legend(); ax.grid(alpha=0.3); fig.tight_layout()
  fig.savefig(os.path.join(out, "camvid_study.png"), dpi=110)
  return table


def main(argv=None):
  args = parse_args(argv)
  if not os.path.isdir(args.data):
    print(f"camvid study: no data folder at {args.data} (expected train.txt, val.txt, "
          "train/, trainannot/, val/, valannot/); nothing to do.")
    return 0
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "camvid_study.json")
  records = json.load(open(json_path)) if os.path.exists(json_path) else {}
  if not args.report_only:
    runs = [(f, a, int(s)) for s in args.seeds.split(",")
            for f in args.fractions.split(",") for a in args.arms.split(",")]
    # Seed by seed, so that a study cut short still covers every arm.
    for fraction, arm, seed in runs:
      record = run_one(args, fraction, arm, seed)
      key = run_key(fraction, arm, seed)
      if key in records and records[key]["workdir"] != record["workdir"]:
        stored = records[key]["miou"]
        same = abs(stored - record["miou"]) <= 1e-6
        print(f"{key}: retrained in {record['workdir']}: mIoU {record['miou']:.4f} "
              f"{'reproduces' if same else 'DIFFERS FROM'} the stored {stored:.4f}")
        continue   # The stored record (and its workdir) stays the study's.
      records[key] = record
      print(f"{key}: mIoU {record['miou']:.2f} ({record['seconds']} s)", flush=True)
      with open(json_path, "w") as f:
        json.dump(records, f, indent=1)
  print(report(list(records.values()), args.out))
  semi = [r for r in records.values() if r["arm"] == "semi" and os.path.isdir(r["workdir"])]
  if semi and not args.report_only:
    table = selected_pixel_accuracy(args, semi[0])
    header = (f"Run: {semi[0]['fraction']} labeled, full method, split seed "
              f"{semi[0]['seed']}, {semi[0]['steps']} steps.\n\n")
    with open(os.path.join(args.out, "selected_pixels.md"), "w") as f:
      f.write(header + table + "\n")
    print(header + table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
