"""Images/s of the VOC-style training input pipeline on this machine.

  python benchmarks/input_pipeline.py                 # a fake VOC tree of real JPEGs
  python benchmarks/input_pipeline.py --root=/data/VOCdevkit --threads=1,4,16

Measures the three training streams together (labeled, unlabeled, GT; batch
10 each, 321x321 crops, random scale and mirror, the GT stream's rescale
rule), as the trainer consumes them, in two modes: ``cache=none`` (JPEG and
PNG decode plus augmentation at every step) and ``cache=memory`` (decoded
once at start-up; augmentation only). Prints images/s and images/s per
thread. The GPU target of ~22 steps/s needs 3 x 10 x 22 = 660 images/s.
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

from advsemiseg_jax.data import fake, sources, splits, streams  # noqa: E402
from configs import voc  # noqa: E402

TARGET_IMAGES_PER_S = 3 * 10 * 22


def measure(cfg, steps: int, warmup: int = 3):
  """(images/s, start-up seconds) of ``train_batches`` for ``cfg``."""
  start = time.perf_counter()
  src = sources.get_source(cfg)
  lab, unl = splits.make_split(src.splits["train"], cfg, write=False)
  batches = streams.train_batches(src, cfg, lab, unl, seed=0)
  for _ in itertools.islice(batches, warmup):
    pass
  setup = time.perf_counter() - start
  start = time.perf_counter()
  n = 0
  for batch in itertools.islice(batches, steps):
    n += sum(len(batch[k]) for k in ("image", "unlabeled_image", "gt_label"))
  return n / (time.perf_counter() - start), setup


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="", help="a VOC folder (default: a fake one)")
  parser.add_argument("--num_images", type=int, default=60,
                      help="size of the fake VOC tree (500x375 JPEGs)")
  parser.add_argument("--threads", default=str(os.cpu_count()),
                      help="comma-separated tf.data thread counts to try")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--modes", default="none,memory")
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root or fake.write_voc(tmp, num_train=args.num_images, num_val=1,
                                       size=(375, 500))
    print(f"root {root}; {os.cpu_count()} cores; target {TARGET_IMAGES_PER_S} images/s")
    print(f"{'cache':>7} {'threads':>7} {'images/s':>9} {'per thread':>10} {'setup s':>8}")
    for mode in args.modes.split(","):
      for threads in (int(t) for t in args.threads.split(",")):
        cfg = voc.get_config("1/2").data
        cfg.root, cfg.cache, cfg.threads = root, mode, threads
        cfg.random_mirror = True
        rate, setup = measure(cfg, args.steps)
        print(f"{mode:>7} {threads:>7} {rate:9.1f} {rate / threads:10.1f} {setup:8.1f}",
              flush=True)


if __name__ == "__main__":
  main()
