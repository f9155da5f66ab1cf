"""Demo: the full method on procedurally generated scenes, on a CPU.

Command (about 3 minutes on a 2-core CPU):
  python main.py --config=configs/demo.py --workdir=/tmp/demo

Variants (comma-separated after a colon):
  configs/demo.py:baseline   L_ce only (the paper's baseline rows)
  configs/demo.py:adv        L_ce + L_adv (no self-training)
  configs/demo.py:quick      a few dozen steps, for smoke tests
e.g. --config=configs/demo.py:baseline,quick

Expected result: see the README's demo table (val mIoU far above chance,
an all-background prediction scores about 20%).
Data: 400 training scenes (1/4 labeled, the rest unlabeled), 100 val scenes,
64x64, 4 classes; generated on the fly, nothing downloaded.
"""
from advsemiseg_jax.config import base_config, parse_variants

VARIANTS = ("baseline", "adv", "quick")


def get_config(arg: str = ""):
  variants = parse_variants(arg, VARIANTS)
  c = base_config()
  c.data.name = "demo"
  c.data.num_classes = 4
  c.data.batch_size = 8
  c.data.crop_size = (64, 64)
  c.data.eval_size = (64, 64)
  c.data.eval_batch_size = 20
  c.data.labeled_fraction = 0.25
  c.data.demo.image_size = 64
  c.data.random_scale = False
  c.model.backbone = "tiny"
  c.model.width = 16
  c.model.disc_width = 16
  c.num_steps = 1200
  c.optim.lr_g = 0.02
  c.optim.lr_d = 1e-4
  c.loss.semi_start = 400
  c.eval_every = 400
  c.checkpoint_every = 400
  c.log_every = 50
  if "baseline" in variants:
    c.loss.lambda_adv = c.loss.lambda_semi_adv = c.loss.lambda_semi = 0.0
  if "adv" in variants:
    c.loss.lambda_semi_adv = c.loss.lambda_semi = 0.0
  if "quick" in variants:
    c.num_steps = 30
    c.loss.semi_start = 10
    c.data.demo.num_train = 64
    c.data.demo.num_val = 16
    c.data.demo.image_size = 64
    c.data.crop_size = c.data.eval_size = (64, 64)
    c.data.eval_batch_size = 8
    c.data.batch_size = 4
    c.model.width = 8
    c.model.disc_width = 8
    c.eval_every = 0
    c.checkpoint_every = 20
    c.log_every = 10
  return c
