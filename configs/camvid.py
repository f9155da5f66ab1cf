"""CamVid road scenes (11 classes) from a plain folder: a CPU-sized semi-
supervised study (benchmarks/camvid_study.py) and a template for any
folder dataset.

Command (1/8 of the 367 train images labeled, the full method):
  python main.py --config=configs/camvid.py --workdir=/tmp/camvid \
      --config.data.root=/data/camvid_small

Layout (the SegNet tutorial's CamVid, e.g. downscaled to 240x180):
  ROOT/train.txt, ROOT/val.txt   lines "train/NAME.png trainannot/NAME.png"
  labels: class ids 0..10, 11 = void (mapped to 255, ignored)

Variants (comma-separated after a colon), e.g. configs/camvid.py:1/4,adv
  label fraction (one of): 1/8 (default), 1/4, 1/2, full
  arm (at most one): baseline (L_ce), adv (+L_adv), none = +L_adv +L_semi
  quick   30 steps on 64x64 crops, 20 val images: a smoke run

A tiny ResNet trained from scratch (no pretrained weights), 128x128 random
crops of randomly scaled and mirrored images, batch 8, 300 steps, L_semi
from step 100 (sized so that the 18-run study fits in about 75 minutes on
a 2-core CPU). Expected result: see the CamVid study table in the README
(val mIoU around 20-25 at this scale; it is not a paper setting).
"""
from advsemiseg_jax.config import base_config, parse_variants
from configs.voc import FRACTIONS, apply_arm, apply_fraction

VARIANTS = tuple(FRACTIONS) + ("baseline", "adv", "quick")
CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
               "Fence", "Car", "Pedestrian", "Bicyclist")


def get_config(arg: str = ""):
  variants = parse_variants(arg, VARIANTS)
  c = base_config()
  c.data.name = "folder"
  c.data.num_classes = len(CLASS_NAMES)
  c.data.class_names = CLASS_NAMES
  c.data.label_map = "11:255"
  c.data.train_list = "train.txt"
  c.data.val_list = "val.txt"
  c.data.batch_size = 8
  c.data.crop_size = (128, 128)
  c.data.eval_size = (184, 240)
  c.data.eval_batch_size = 8
  c.data.random_scale = True
  c.data.random_mirror = True
  c.model.backbone = "tiny"
  c.model.width = 16
  c.model.disc_width = 16
  # The stored study (benchmarks/results/camvid_study.json) was trained with
  # lax.conv; pinned so that a rerun on any machine reproduces its rows
  # (``auto`` would pick ``dot`` on a CPU: same model, other rounding).
  c.model.conv_impl = "xla"
  c.num_steps = 300
  c.optim.lr_g = 0.02
  c.loss.semi_start = 100
  c.eval_every = 0
  c.checkpoint_every = 100
  c.log_every = 50
  apply_fraction(c, variants)
  apply_arm(c, variants)
  if "quick" in variants:
    c.num_steps = 30
    c.loss.semi_start = 10
    c.data.crop_size = (64, 64)
    c.data.batch_size = 4
    c.data.val_limit = 20
    c.model.width = 8
    c.model.disc_width = 8
    c.checkpoint_every = 20
    c.log_every = 10
  return c
