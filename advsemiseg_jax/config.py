"""The config schema: every field a user can set, with its default.

Config files in ``configs/`` start from ``base_config()`` and override fields;
the result is locked, so a misspelt ``--config.x.y=...`` fails at start-up.
"""
import ml_collections

from advsemiseg_jax import optim


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"              # train | evaluate | predict (a folder of images, see c.predict)
  c.seed = 0                    # model initialisation and data order
  c.num_steps = 20000           # training iterations (the poly schedule's length)
  c.init_from = ""              # checkpoint directory to start from ("" = none)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet101"  # resnet101 | resnet50 | tiny
  c.model.width = 64              # channels of the stem (ResNet: 64)
  c.model.aspp_branches = 4       # 4 = the paper; 2 = the authors' code (early return)
  c.model.bn_mode = "batch_stats"  # batch_stats | frozen
  # S's convolutions and matmuls: float32 | bfloat16 (parameters, BN statistics,
  # softmax, losses and D stay float32).
  c.model.compute_dtype = "float32"
  # auto: dot on CPU and GPU, xla on TPU | xla (lax.conv everywhere) | dot (1x1
  # convs and ASPP as GEMMs, 3x3 and D's 4x4 kernel gradients as GEMMs: faster
  # on CPU and GPU).
  c.model.conv_impl = "auto"
  # How training-mode BatchNorm is differentiated. auto: recompute on CPU,
  # autodiff elsewhere | written (keeps what torch keeps: less memory on
  # XLA:CPU) | recompute (written, and a BN + ReLU feeding a convolution keeps
  # only its input, as does a bottleneck's last BN: less still) |
  # recompute_act (recompute's BN + ReLU outputs only: a bottleneck's conv3
  # output is kept, not computed again; 6.7% fewer FLOPs per step, faster on a
  # CPU for more memory: docs/performance.md, Options) | autodiff (JAX's
  # derivative: faster on GPU). Same values up to rounding.
  c.model.bn_backward = "auto"
  # Backbone stages 1..4 recomputed in the backward pass, e.g. (3,): less
  # memory for more time (docs/performance.md, CPU memory and Options).
  c.model.remat_stages = ()
  c.model.discriminator = "fc"    # fc (the paper) | image ("no FCD" ablation)
  c.model.disc_width = 64

  c.data = ml_collections.ConfigDict()
  c.data.name = "demo"            # demo | voc | cityscapes | tfds | folder
  c.data.root = ""                # dataset folder (real datasets)
  c.data.num_classes = 5
  c.data.batch_size = 10          # global batch of each stream
  c.data.crop_size = (321, 321)   # (height, width) of training crops
  c.data.eval_size = (505, 505)   # evaluation pads bottom/right to this size
  c.data.eval_protocol = "pad"    # pad (to eval_size) | whole (largest val image, rounded to 8) | sliding
  c.data.eval_window = (512, 1024)  # sliding: (h, w) window over the eval_size canvas
  c.data.eval_stride = (341, 683)   # sliding: (h, w) step between windows (last window ends at the edge)
  c.data.eval_batch_size = 1
  c.data.labeled_fraction = 1.0   # first fraction of a seeded permutation is labeled
  c.data.split_seed = 0           # seed of that permutation
  c.data.random_scale = True      # scale by 0.5, 0.6, ..., 1.6
  c.data.random_mirror = True
  c.data.prefetch = 2
  c.data.train_list = ""          # list file of training examples ("" = the dataset's default)
  c.data.val_list = ""            # list file of val examples ("" = the dataset's default)
  c.data.image_dir = "images"     # folder: images of one-name list lines (ROOT/image_dir/NAME.*)
  c.data.label_dir = "labels"     # folder: labels of one-name list lines (ROOT/label_dir/NAME.png)
  c.data.class_names = ()         # folder/tfds: class names (default class_0, class_1, ...)
  c.data.label_map = ""           # raw label remapping "SRC:DST,..." (e.g. "11:255") or "cityscapes"
  c.data.resize = ()              # (h, w): resize training images on read (Cityscapes 512x1024); () = native
  c.data.eval_resize = ()         # (h, w): resize val images on read; () = native (full resolution)
  c.data.val_limit = 0            # use only the first N val examples (0 = all; quick runs)
  c.data.cache = "auto"           # auto | memory | none: decoded examples in memory (auto: if < half free RAM)
  c.data.skip_bad_files = False   # drop unreadable/invalid examples (counted, logged) instead of failing
  c.data.threads = 0              # tf.data and decode threads (0 = all cores)
  c.data.gt_rescale = True        # GT stream: rescale until no padding is needed (authors' VOCGTDataSet)
  c.data.split_file = ""          # reload a split: our split.json, a text file of ids, or an index .pkl/.npy/.json
  c.data.tfds = ml_collections.ConfigDict()
  c.data.tfds.name = ""           # e.g. oxford_iiit_pet, cityscapes/semantic_segmentation (data.root = data_dir)
  c.data.tfds.train_split = "train"       # TFDS split trained on
  c.data.tfds.val_split = "validation"    # TFDS split evaluated on
  c.data.tfds.image_key = "image"  # name of the image feature
  c.data.tfds.label_key = "segmentation_mask"  # name of the mask feature (HxW or HxWx1)
  c.data.demo = ml_collections.ConfigDict()
  c.data.demo.num_train = 400
  c.data.demo.num_val = 100
  c.data.demo.image_size = 96

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_adv = 0.01        # labeled adversarial weight
  c.loss.lambda_semi_adv = 0.001  # unlabeled adversarial weight
  c.loss.lambda_semi = 0.1        # masked self-training weight
  c.loss.t_semi = 0.2             # D confidence threshold of the self-training mask
  c.loss.semi_start = 5000        # L_semi from this step on
  c.loss.semi_start_adv = 0       # unlabeled adversarial term from this step on
  c.loss.d_remain = True          # D also sees the unlabeled predictions as fake
  # The authors' code back-propagates nothing from the unlabeled batch in an
  # iteration where no pixel passes T_semi (not even the adversarial term).
  c.loss.skip_unlabeled_when_mask_empty = False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_g = 2.5e-4
  c.optim.lr_d = 1e-4
  c.optim.momentum = 0.9
  c.optim.nesterov = True         # the paper; the authors' code uses False
  c.optim.weight_decay = 1e-4     # the paper (Table 9); the code uses 5e-4
  c.optim.power = 0.9             # poly decay exponent
  c.optim.adam_b1 = 0.9
  c.optim.adam_b2 = 0.99
  c.optim.g_rules = optim.DEFAULT_G_RULES
  # Gradient accumulation (the authors' --iter-size): each step splits the
  # batch into iter_size microbatches (own BN statistics each) and applies the
  # mean of their gradients once.
  c.optim.iter_size = 1
  # S's unlabeled gradient is computed before the labeled pass starts (as the
  # authors' two backward() calls): the two passes' activations are never
  # alive together, and one loop body holds S's passes (a third fewer HLO
  # instructions). None (auto): on for a CPU, off elsewhere (not measured
  # there) | True | False. CPU, ResNet-101, batch 2: peak RSS 4.76 -> 3.44 GiB
  # at 321x321 and 2.12 -> 1.91 at 161, step time -1% and +1%, when the
  # passes were unrolled; 1.78 -> 1.63 at 161 with the loop
  # (docs/performance.md). Same result up to rounding.
  c.optim.sequential_passes = ml_collections.config_dict.placeholder(bool)

  c.eval_every = 1000             # steps between evaluations (0 = only at the end)
  c.checkpoint_every = 1000
  c.log_every = 50
  c.max_to_keep = 3               # newest training checkpoints kept in WORKDIR/checkpoints
  # Checkpoints written in the background while training goes on. None (auto):
  # in the background unless the devices are CPUs. A background save first
  # copies the whole state (training then overwrites the donated buffers): on
  # a GPU or TPU into host memory, on a CPU a second copy in the same memory
  # (0.4 GiB at ResNet-101) | True | False.
  c.checkpoint_async = ml_collections.config_dict.placeholder(bool)
  # At most this many MiB of the state encoded for writing at once (raised to
  # the largest array if that is larger; 0: no limit, Orbax's default). With
  # no limit a save holds an encoded copy of the whole state while it writes.
  # VOC state (0.36 GiB), CPU, inline: a save's extra memory 0.32 -> 0.08 GiB,
  # its time 3.2 -> 3.6 s (benchmarks/checkpoint_save.py; docs/performance.md,
  # twenty-fourth session).
  c.checkpoint_write_mib = 64
  # A non-finite loss or gradient: "stop" ends the run naming the step (the
  # last good checkpoint stays); "skip" drops that update and counts it.
  c.nonfinite_policy = "stop"
  c.eval_pictures = 3            # fixed val images (input, GT, prediction, D confidence) to TensorBoard per eval

  c.tta = ml_collections.ConfigDict()
  c.tta.flip = False              # test-time horizontal flip (probabilities averaged; results.json "tta")
  c.tta.scales = ()               # test-time scales, e.g. (0.75, 1.0, 1.25); () = 1.0 only

  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""            # mode=predict: folder of JPEG/PNG images (searched recursively)
  c.predict.output = ""           # mode=predict: output folder (labels/, color/, ...)
  c.predict.heatmaps = False      # also write softmax-confidence and D-confidence heat maps
  c.predict.overlay = False       # also write the colour prediction blended over the input
  c.predict.overlay_alpha = 0.5   # weight of the colour map in the overlay
  return c


def parse_variants(arg: str, known) -> set:
  """``"baseline,quick"`` -> {"baseline", "quick"}; unknown names fail at once."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - set(known)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; "
                     f"this config knows {sorted(known)}")
  return variants


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/demo.py:baseline,quick"`` -> the locked ConfigDict, as main.py
  would build it (for tests, notebooks and scripts)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_advsemiseg_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  return config


TRUE_WORDS, FALSE_WORDS, AUTO_WORDS = ("1", "true", "yes"), ("0", "false", "no"), ("none", "auto")


def parse_value(text: str, old, nullable: bool = False):
  """``text`` in the type of the field value ``old`` it replaces: true/false
  (1/0, yes/no) for a bool, and also auto (None) for an unset field or one
  whose schema default is auto (``nullable``, e.g.
  ``optim.sequential_passes``); comma-separated ints for a tuple
  (``model.remat_stages=3,4``, empty for none); else ``type(old)(text)``."""
  word = text.lower()
  if old is None or isinstance(old, bool):
    words = TRUE_WORDS + FALSE_WORDS + (AUTO_WORDS if old is None or nullable else ())
    if word not in words:
      raise ValueError(f"{text!r} is none of {', '.join(words)}")
    return None if word in AUTO_WORDS else word in TRUE_WORDS
  if isinstance(old, (tuple, list)):
    return tuple(int(v) for v in text.split(",") if v) if text else ()
  return type(old)(text)


def _field(config, key: str):
  """(the ConfigDict holding ``key``'s field, the field's name, its value)."""
  *path, name = key.split(".")
  node = config
  for part in path:
    node = node[part]
  return node, name, node[name]


def apply_overrides(config, overrides):
  """Sets each ``FIELD=VALUE`` of ``overrides`` (``"model.bn_backward=written"``)
  on ``config``, the value parsed by ``parse_value`` (the benchmarks'
  ``--set``; main.py takes absl's ``--config.FIELD=VALUE``). A field the
  config does not have, or a value that does not parse, raises ValueError
  naming the item. A string holds items separated by spaces."""
  if isinstance(overrides, str):
    overrides = overrides.split()
  schema = base_config()
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"{item!r}: expected FIELD=VALUE, e.g. model.bn_backward=written")
    try:
      node, name, old = _field(config, key)
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"{item!r}: the config has no field {key!r}") from None
    try:
      nullable = _field(schema, key)[2] is None
    except (KeyError, AttributeError, TypeError):
      nullable = False   # A field that a config file adds to the schema's.
    try:
      node[name] = parse_value(value, old, nullable)
    except (ValueError, TypeError) as error:
      raise ValueError(f"{item!r}: {error}") from None
