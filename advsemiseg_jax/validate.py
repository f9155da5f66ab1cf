"""Start-up checks of a config: fail in seconds with one clear line, before
any compile or data read."""
import os
import tempfile

from advsemiseg_jax.data import files, sources
from advsemiseg_jax.models import DISCRIMINATORS, DTYPES, STAGE_SIZES
from advsemiseg_jax.models.discriminator import NUM_DOWNSAMPLINGS
from advsemiseg_jax.models.layers import BN_BACKWARDS, BN_MODES, CONV_IMPLS
from advsemiseg_jax.faults import NONFINITE_POLICIES

MODES = ("train", "evaluate", "predict")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate_config(config, workdir: str = None):
  _check(config.mode in MODES, f"mode must be one of {MODES}, got {config.mode!r}")
  m, d, l, o = config.model, config.data, config.loss, config.optim
  _check(m.backbone in STAGE_SIZES,
         f"model.backbone must be one of {sorted(STAGE_SIZES)}, got {m.backbone!r}")
  _check(m.bn_mode in BN_MODES, f"model.bn_mode must be one of {BN_MODES}, got {m.bn_mode!r}")
  _check(m.discriminator in DISCRIMINATORS,
         f"model.discriminator must be one of {sorted(DISCRIMINATORS)}, got {m.discriminator!r}")
  _check(m.aspp_branches in (1, 2, 3, 4), f"model.aspp_branches must be 1..4, got {m.aspp_branches}")
  _check(m.width > 0 and m.disc_width > 0, "model.width and model.disc_width must be positive")
  _check(m.compute_dtype in DTYPES,
         f"model.compute_dtype must be one of {sorted(DTYPES)}, got {m.compute_dtype!r}")
  _check(m.conv_impl in ("auto",) + CONV_IMPLS,
         f"model.conv_impl must be one of {('auto',) + CONV_IMPLS}, got {m.conv_impl!r}")
  _check(m.bn_backward in ("auto",) + BN_BACKWARDS,
         f"model.bn_backward must be one of {('auto',) + BN_BACKWARDS}, got {m.bn_backward!r}")
  _check(all(s in (1, 2, 3, 4) for s in m.remat_stages),
         f"model.remat_stages must name stages 1..4, got {tuple(m.remat_stages)}")
  _check(o.iter_size >= 1 and d.batch_size % o.iter_size == 0,
         f"data.batch_size={d.batch_size} must be a multiple of optim.iter_size={o.iter_size}")
  _check(config.num_steps > 0, f"num_steps must be positive, got {config.num_steps}")
  _check(0.0 < d.labeled_fraction <= 1.0,
         f"data.labeled_fraction must be in (0, 1], got {d.labeled_fraction}")
  _check(0.0 <= l.t_semi <= 1.0, f"loss.t_semi must be in [0, 1], got {l.t_semi}")
  for name in ("lambda_adv", "lambda_semi_adv", "lambda_semi"):
    _check(l[name] >= 0, f"loss.{name} must be >= 0, got {l[name]}")
  if l.lambda_semi > 0:
    _check(0 <= l.semi_start <= config.num_steps,
           f"loss.semi_start={l.semi_start} is beyond num_steps={config.num_steps}: "
           "L_semi would never switch on")
  if l.lambda_semi_adv > 0:
    _check(0 <= l.semi_start_adv <= config.num_steps,
           f"loss.semi_start_adv={l.semi_start_adv} is beyond "
           f"num_steps={config.num_steps}")
  min_size = 2**NUM_DOWNSAMPLINGS
  crop = tuple(d.crop_size)
  _check(len(crop) == 2 and all(isinstance(v, int) for v in crop),
         f"data.crop_size={crop} must be (height, width), two integers")
  _check(min(crop) >= min_size,
         f"data.crop_size={crop}: both sides must be >= {min_size} "
         f"(the discriminator downsamples by {min_size})")
  _check(len(tuple(d.eval_size)) == 2 and min(d.eval_size) >= 8,
         f"data.eval_size={tuple(d.eval_size)} must be (height, width) >= 8")
  _check(d.batch_size > 0 and d.eval_batch_size > 0, "data batch sizes must be positive")
  _check(o.lr_g >= 0 and o.lr_d >= 0 and o.weight_decay >= 0,
         "optim learning rates and weight decay must be >= 0")
  for name in ("eval_every", "checkpoint_every", "log_every"):
    _check(config[name] >= 0, f"{name} must be >= 0")
  _check(config.checkpoint_every > 0 and config.log_every > 0,
         "checkpoint_every and log_every must be positive")
  _check(config.max_to_keep >= 1, "max_to_keep must be >= 1")
  _check(config.checkpoint_write_mib >= 0,
         "checkpoint_write_mib must be >= 0 (0: no limit)")
  _check(config.nonfinite_policy in NONFINITE_POLICIES,
         f"nonfinite_policy must be one of {NONFINITE_POLICIES}, "
         f"got {config.nonfinite_policy!r}")
  _validate_devices(d)
  _validate_num_classes(d)
  _validate_data(d)
  _validate_eval(config)
  if workdir is not None:
    try:
      os.makedirs(workdir, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=workdir):
        pass
    except OSError as e:
      raise ConfigError(f"workdir {workdir!r} cannot be written: {e}") from e


def _validate_devices(d):
  """Every global batch is split evenly over the devices (and hosts)."""
  import jax  # pylint: disable=import-outside-toplevel
  n = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    _check(d[name] % n == 0,
           f"data.{name}={d[name]} is not divisible by the {n} devices "
           f"({jax.process_count()} host(s)); use a multiple of {n}")


# File datasets whose class count is fixed, checked before any file is read
# (folder and tfds take data.num_classes; the demo's generated source is
# checked by the trainer right after it is built, still before any compile).
FIXED_NUM_CLASSES = {"voc": len(sources.VOC_CLASSES),
                     "cityscapes": len(sources.CITYSCAPES_CLASSES)}


def _validate_num_classes(d):
  _check(d.num_classes >= 1, f"data.num_classes must be >= 1, got {d.num_classes}")
  fixed = FIXED_NUM_CLASSES.get(d.name)
  _check(fixed is None or d.num_classes == fixed,
         f"data.num_classes={d.num_classes} but dataset {d.name!r} has {fixed} classes")


def _validate_data(d):
  """The data fields of issue 3 (dataset name, root, sizes, cache, files)."""
  _check(d.name in sources.SOURCES,
         f"data.name must be one of {sorted(sources.SOURCES)}, got {d.name!r}")
  _check(d.name in ("demo", "tfds") or bool(d.root),
         f"data.name={d.name!r} needs --config.data.root=DATASET_FOLDER")
  _check(d.name != "tfds" or bool(d.tfds.name),
         "data.name='tfds' needs data.tfds.name (e.g. oxford_iiit_pet)")
  for name in ("resize", "eval_resize"):
    size = tuple(d[name])
    _check(size == () or (len(size) == 2 and min(size) > 0),
           f"data.{name}={size} must be () or (height, width)")
  _check(d.cache in ("auto", "memory", "none"),
         f"data.cache must be auto, memory or none, got {d.cache!r}")
  _check(d.val_limit >= 0 and d.threads >= 0, "data.val_limit and data.threads must be >= 0")
  _check(not d.split_file or os.path.isfile(d.split_file),
         f"data.split_file not found: {d.split_file!r}")
  if d.label_map not in sources.NAMED_LABEL_MAPS:
    try:
      files.parse_label_map(d.label_map)
    except files.DataError as e:
      raise ConfigError(str(e)) from None


def _validate_eval(config):
  """Evaluation protocol, TTA, TensorBoard pictures and predict fields (issue 4)."""
  from advsemiseg_jax.evaluate import PROTOCOLS
  d, t, p = config.data, config.tta, config.predict
  _check(d.eval_protocol in PROTOCOLS,
         f"data.eval_protocol must be one of {PROTOCOLS}, got {d.eval_protocol!r}")
  if d.eval_protocol == "sliding":
    window, stride = tuple(d.eval_window), tuple(d.eval_stride)
    _check(len(window) == 2 and min(window) >= 32,
           f"data.eval_window={window} must be (height, width) >= 32")
    _check(len(stride) == 2 and min(stride) >= 1 and stride[0] <= window[0]
           and stride[1] <= window[1],
           f"data.eval_stride={stride} must be positive and at most data.eval_window="
           f"{window} (windows must overlap or touch)")
  _check(all(s > 0 for s in t.scales), f"tta.scales must be positive, got {tuple(t.scales)}")
  _check(config.eval_pictures >= 0, f"eval_pictures must be >= 0, got {config.eval_pictures}")
  _check(0.0 <= p.overlay_alpha <= 1.0,
         f"predict.overlay_alpha must be in [0, 1], got {p.overlay_alpha}")
  if config.mode == "predict":
    _check(bool(p.input) and os.path.isdir(p.input),
           f"mode=predict needs --config.predict.input=FOLDER of images, got {p.input!r}")
    _check(bool(p.output), "mode=predict needs --config.predict.output=FOLDER")
    _check(os.path.abspath(p.output) != os.path.abspath(p.input),
           "predict.output must differ from predict.input")
