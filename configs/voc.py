"""PASCAL VOC 2012 + SBD ("aug"): the paper's main experiment (Table 1, 3).

Command (1/8 of the 10,582 train_aug images labeled, the full method):
  python main.py --config=configs/voc.py --workdir=/tmp/voc \
      --config.data.root=/data/VOCdevkit

Variants (comma-separated after a colon), e.g. configs/voc.py:1/4,adv
  label fraction (one of): 1/8 (default), 1/4, 1/2, full
  arm (at most one):       baseline  L_ce only
                           adv       L_ce + L_adv (no self-training)
                           (none)    L_ce + L_adv + L_semi, the full method
  noaug   no random scale (the authors' README command: random crop only)
  quick   tiny model, 64x64 crops, 30 steps, 20 val images: a CPU smoke run
`full` labels every image, so it has no unlabeled terms (L_semi, unlabeled
L_adv); the paper reports no full-data L_semi row either.

Expected val mean IoU (%, published, DeepLab-v2 ResNet-101 initialised from
the authors' ImageNet+COCO weights; start from converted weights with
--config.init_from=DIR, see the README):
  |                  | 1/8  | 1/4  | 1/2  | full |
  | baseline         | 66.0 | 68.3 | 69.8 | 73.6 |
  | adv              | 67.6 | 71.0 | 72.6 | 74.9 |
  | (full method)    | 69.5 | 72.1 | 73.8 |  -   |

Follows the paper: batch 10, 20k steps, 321x321 crops, random scale
0.5..1.6 and crop (no mirror), SGD lr 2.5e-4 (head 10x) with Nesterov and
weight decay 1e-4, Adam 1e-4 for D, lambda_adv 0.01, lambda_semi 0.1,
lambda_semi_adv 0.001, T_semi 0.2, L_semi from step 5000. Evaluation pads
each val image to 505x505 (the authors' protocol). The split of labeled
images is drawn with data.split_seed and saved to WORKDIR/split.json; the
authors' train_id.pkl can be reused with --config.data.split_file=PATH.
"""
from advsemiseg_jax.config import base_config, parse_variants

FRACTIONS = {"1/8": 0.125, "1/4": 0.25, "1/2": 0.5, "full": 1.0}
VARIANTS = tuple(FRACTIONS) + ("baseline", "adv", "noaug", "quick")


def apply_arm(c, variants):
  """The paper's rows: baseline (L_ce), adv (+L_adv), default (+L_semi)."""
  if {"baseline", "adv"} <= variants:
    raise ValueError("choose at most one of the variants baseline, adv")
  if "baseline" in variants:
    c.loss.lambda_adv = c.loss.lambda_semi_adv = c.loss.lambda_semi = 0.0
  if "adv" in variants or c.data.labeled_fraction == 1.0:
    c.loss.lambda_semi_adv = c.loss.lambda_semi = 0.0


def apply_fraction(c, variants):
  chosen = [v for v in variants if v in FRACTIONS]
  if len(chosen) > 1:
    raise ValueError(f"choose one label fraction, got {sorted(chosen)}")
  c.data.labeled_fraction = FRACTIONS[chosen[0] if chosen else "1/8"]


def get_config(arg: str = ""):
  variants = parse_variants(arg, VARIANTS)
  c = base_config()
  c.data.name = "voc"
  c.data.num_classes = 21
  c.data.batch_size = 10
  c.data.crop_size = (321, 321)
  c.data.eval_size = (505, 505)
  c.data.eval_batch_size = 1
  c.data.random_scale = True
  c.data.random_mirror = False
  c.model.backbone = "resnet101"
  c.model.bn_mode = "batch_stats"
  c.num_steps = 20000
  c.loss.semi_start = 5000
  c.eval_every = 5000
  c.checkpoint_every = 1000
  apply_fraction(c, variants)
  apply_arm(c, variants)
  if "noaug" in variants:
    c.data.random_scale = c.data.random_mirror = False
  if "quick" in variants:
    c.model.backbone = "tiny"
    c.model.width = 8
    c.model.disc_width = 8
    c.data.batch_size = 2
    c.data.crop_size = (64, 64)
    c.data.val_limit = 20
    c.num_steps = 30
    c.loss.semi_start = 10
    c.optim.lr_g = 2.5e-3
    c.eval_every = 0
    c.checkpoint_every = 20
    c.log_every = 10
  return c
