"""Cityscapes: the paper's second experiment (Table 2).

Command (1/8 of the 2,975 training images labeled, the full method):
  python main.py --config=configs/cityscapes.py --workdir=/tmp/cityscapes \
      --config.data.root=/data/cityscapes

Variants (comma-separated after a colon), e.g. configs/cityscapes.py:1/4,adv
  label fraction (one of): 1/8 (default), 1/4, 1/2, full
  arm (at most one):       baseline  L_ce only
                           adv       L_ce + L_adv (no self-training)
                           (none)    L_ce + L_adv + L_semi, the full method
  fullres  evaluate at full resolution (1024x2048) instead of 512x1024
  quick    tiny model, images resized to 64x128, 30 steps, 20 val images
`full` labels every image and so has no unlabeled terms.

Expected val mean IoU (%, published, DeepLab-v2 ResNet-101 from the
authors' ImageNet+COCO weights, evaluated at 512x1024):
  |                  | 1/8  | 1/4  | 1/2  | full |
  | baseline         | 55.5 | 59.9 | 64.1 | 66.4 |
  | adv              | 57.1 | 61.8 | 64.6 | 67.7 |
  | (full method)    | 58.8 | 62.3 | 65.7 |  -   |

Follows the paper: every image and label resized to 512x1024 (image
bilinear, label nearest), no random scale, crop or mirror, batch 2, 40k
steps, the VOC optimiser and loss weights. With batch 2, BatchNorm uses its
running averages in training too (model.bn_mode=frozen), a sensible choice
the paper does not state. Labels go through the official labelId -> trainId
table (19 classes, others 255). File lists are sorted, so split indices are
portable between machines.
"""
from advsemiseg_jax.config import base_config, parse_variants
from configs.voc import FRACTIONS, apply_arm, apply_fraction

VARIANTS = tuple(FRACTIONS) + ("baseline", "adv", "fullres", "quick")


def get_config(arg: str = ""):
  variants = parse_variants(arg, VARIANTS)
  c = base_config()
  c.data.name = "cityscapes"
  c.data.num_classes = 19
  c.data.resize = (512, 1024)
  c.data.eval_resize = (512, 1024)
  c.data.crop_size = (512, 1024)
  c.data.eval_size = (512, 1024)
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.data.random_scale = False
  c.data.random_mirror = False
  c.model.backbone = "resnet101"
  c.model.bn_mode = "frozen"
  c.num_steps = 40000
  c.loss.semi_start = 5000
  c.eval_every = 5000
  c.checkpoint_every = 1000
  apply_fraction(c, variants)
  apply_arm(c, variants)
  if "fullres" in variants:
    c.data.eval_resize = ()
    c.data.eval_size = (1024, 2048)
    c.data.eval_batch_size = 1
  if "quick" in variants:
    c.model.backbone = "tiny"
    c.model.width = 8
    c.model.disc_width = 8
    c.data.resize = c.data.eval_resize = (64, 128)
    c.data.crop_size = c.data.eval_size = (64, 128)
    c.data.val_limit = 20
    c.num_steps = 30
    c.loss.semi_start = 10
    c.optim.lr_g = 2.5e-3
    c.eval_every = 0
    c.checkpoint_every = 20
    c.log_every = 10
  return c
