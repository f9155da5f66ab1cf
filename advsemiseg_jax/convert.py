"""PyTorch state dicts (and Orbax checkpoints) -> Flax variables of our models.

Accepted sources:

* the authors' DeepLab-v2 layout: ``conv1``, ``bn1``,
  ``layer{1..4}.N.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}``,
  ``layer5.conv2d_list.{0..3}`` (their ImageNet+COCO initialisation
  ``resnet101COCO-*.pth`` and their trained models), with any ``module.``
  (DataParallel) or ``Scale.`` (pytorch-deeplab-resnet's MS_Deeplab wrapper)
  prefix removed;
* their FCDiscriminator layout: ``conv1..conv4``, ``classifier``;
* torchvision's ImageNet ResNet-101/50. Its parameters have the same names and
  shapes as the Caffe-style network's, but it is a different network: its
  blocks subsample in the 3x3 ``conv2`` (ours in the first 1x1 ``conv1``),
  its layer3/layer4 are strided (ours dilated), and it expects inputs scaled
  to [0, 1] and divided by the ImageNet std (ours are 0..255 minus the mean).
  We copy every tensor one to one (the stride position and the dilation are
  not parameters), fold the input scale into ``conv1`` (each input channel's
  weights divided by 255 * std), drop ``fc`` and leave the ASPP head at
  initialisation. The features differ from torchvision's until fine-tuning
  adapts them, as in every DeepLab started from these weights.

Like the authors' loader, tensors are copied only where name AND shape match
(a 21-class head is skipped when training 19 classes); everything else is
reported in a ``ConversionReport``: copied, skipped (with the reason), and
the model variables left at their initial value.

A ``.pth`` file is a pickle, which could run code when loaded: it is read with
``torch.load(path, map_location="cpu", weights_only=True)``, which refuses
anything but tensors and plain containers. torch is needed only here and is
imported lazily (``pip install -r requirements-convert.txt``).

CLI (writes an Orbax checkpoint usable as ``--config.init_from``)::

  python -m advsemiseg_jax.convert SRC.pth DST_DIR --config=configs/voc_reference.py
"""
import dataclasses
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from advsemiseg_jax import models

# Wrapping keys under which training scripts commonly store a state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network",
                "generator", "module", "weights", "params")
# Name prefixes of common wrappers (DataParallel; MS_Deeplab).
PREFIXES = ("module.", "Scale.")
# torchvision's input normalisation (RGB, applied to [0, 1] images).
TORCHVISION_STD = (0.229, 0.224, 0.225)

_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_BN_COUNTER = "BatchNorm step counter; unused (the momentum is fixed)"


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did, tensor by tensor.

  ``copied``: (source name, model path) pairs. ``skipped``: source name ->
  why it was not used. ``left_at_init``: model paths (``collection/path``)
  that kept their initial value. ``layout``: the detected source layout.
  ``notes``: layout changes applied (e.g. torchvision's input scale).
  """
  source: str
  layout: str
  copied: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
  left_at_init: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  def summary(self, max_lines: int = 20) -> str:
    lines = [f"{self.source} ({self.layout}): copied {len(self.copied)} tensors, "
             f"skipped {len(self.skipped)}, left {len(self.left_at_init)} model "
             f"variables at initialisation"]
    lines += [f"  note: {n}" for n in self.notes]
    counters = [k for k, v in self.skipped.items() if v == _BN_COUNTER]
    skipped = [f"{k}: {v}" for k, v in self.skipped.items() if v != _BN_COUNTER]
    if counters:
      skipped.append(f"{len(counters)} x *.num_batches_tracked: {_BN_COUNTER}")
    for title, items in (
        ("skipped", skipped),
        ("left at initialisation", list(self.left_at_init))):
      if items:
        lines.append(f"  {title}:")
        lines += [f"    {item}" for item in items[:max_lines]]
        if len(items) > max_lines:
          lines.append(f"    ... and {len(items) - max_lines} more")
    return "\n".join(lines)

  def __str__(self):
    return self.summary()


# ---------------------------------------------------------------------------
# Reading state dicts.


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "converting PyTorch checkpoints needs torch, an optional dependency: "
        "pip install -r requirements-convert.txt") from e
  return torch


def _is_array(x) -> bool:
  if isinstance(x, np.ndarray):
    return True
  return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _describe(obj, depth: int = 0) -> str:
  """A short description of what a loaded object holds."""
  if _is_array(obj):
    return f"tensor{tuple(obj.shape)}"
  if isinstance(obj, Mapping):
    if depth > 0:
      return f"dict({len(obj)} entries)"
    items = list(obj.items())
    shown = ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in items[:6])
    more = f", ... ({len(items)} entries)" if len(items) > 6 else ""
    return "a dict {" + shown + more + "}"
  if isinstance(obj, (list, tuple)):
    return f"{type(obj).__name__}({len(obj)} items)" if depth else (
        f"a {type(obj).__name__} of {len(obj)} items")
  return type(obj).__name__ if depth else f"a {type(obj).__name__}"


def _is_state_dict(obj) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0
          and all(isinstance(k, str) and _is_array(v) for k, v in obj.items()))


def unwrap_state_dict(obj, source: str = "the checkpoint") -> Dict[str, Any]:
  """The state dict held by ``obj``: ``obj`` itself, or a state dict under one
  of ``WRAPPER_KEYS``. Prefixes in ``PREFIXES`` are removed from the names.

  Raises ValueError saying what ``obj`` holds when it is neither.
  """
  found = None
  if _is_state_dict(obj):
    found = obj
  elif isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if _is_state_dict(obj.get(key)):
        found = obj[key]
        break
  if found is None:
    raise ValueError(
        f"{source} holds {_describe(obj)}, not a state dict (a dict of named "
        f"tensors) nor a dict wrapping one under any of {list(WRAPPER_KEYS)}")
  out = {}
  for name, value in found.items():
    stripped = name
    changed = True
    while changed:
      changed = False
      for prefix in PREFIXES:
        if stripped.startswith(prefix):
          stripped, changed = stripped[len(prefix):], True
    out[stripped] = value
  return out


def load_state_dict(path_or_state_dict) -> Tuple[Dict[str, Any], str]:
  """(state dict, source description) from a ``.pth`` path or a mapping.

  A mapping may hold torch tensors or numpy arrays (then torch is not needed).
  """
  if isinstance(path_or_state_dict, Mapping):
    return unwrap_state_dict(path_or_state_dict, "the given mapping"), "state dict"
  path = os.fspath(path_or_state_dict)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  torch = _import_torch()
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f"refused to load {path}: it holds objects other than tensors and plain "
        f"containers, which only a full unpickling (able to run code from the "
        f"file) could build. torch's weights-only loader said: {first}. If you "
        f"trust the file, re-save just its tensors, e.g. "
        f"torch.save(obj.state_dict(), 'weights.pth').") from None
  except RuntimeError as e:
    raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None
  return unwrap_state_dict(obj, path), path


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.float()
  return value.numpy()


def detect_layout(names) -> str:
  """'torchvision', 'authors-deeplab', 'fc-discriminator' or 'unknown'."""
  names = set(names)
  if "fc.weight" in names and "conv1.weight" in names:
    return "torchvision"
  if any(n.startswith(("layer1.", "bn1.")) for n in names):
    return "authors-deeplab"
  if "classifier.weight" in names and all(
      re.match(r"^(conv[1-4]|classifier)\.(weight|bias)$", n) for n in names):
    return "fc-discriminator"
  return "unknown"


# ---------------------------------------------------------------------------
# Matching tensors to model variables.


def torch_to_flax_path(name: str) -> Optional[Tuple[str, ...]]:
  """Candidate ``collection/path`` keys of a torch parameter name, or None."""
  module, _, leaf = name.rpartition(".")
  if not module:
    return None
  path = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2/", module)
  path = re.sub(r"(^|/)downsample\.0$", r"\1downsample_conv", path)
  path = re.sub(r"(^|/)downsample\.1$", r"\1downsample_bn", path)
  path = re.sub(r"conv2d_list\.(\d+)", r"conv2d_list_\1", path)
  path = path.replace(".", "/")
  if leaf == "weight":
    return (f"params/{path}/kernel", f"params/{path}/scale")
  if leaf == "bias":
    return (f"params/{path}/bias",)
  if leaf in _BN_STATS:
    return (f"batch_stats/{path}/{_BN_STATS[leaf]}",)
  return None


def _torch_shape(flax_key: str, shape) -> Tuple[int, ...]:
  """The torch-layout shape of a Flax variable (for messages)."""
  shape = tuple(shape)
  if flax_key.endswith("/kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if flax_key.endswith("/kernel") and len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _to_flax_layout(flax_key: str, value: np.ndarray) -> np.ndarray:
  if flax_key.endswith("/kernel") and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if flax_key.endswith("/kernel") and value.ndim == 2:
    return np.transpose(value, (1, 0))  # (out, in) -> (in, out)
  return value


def _skip_reason(name: str, layout: str) -> str:
  leaf = name.rpartition(".")[2]
  if leaf == "num_batches_tracked":
    return _BN_COUNTER
  if layout == "torchvision" and name.startswith("fc."):
    return "torchvision's ImageNet classifier; DeepLab has no counterpart"
  return "no variable of this name in the model"


def match_names(shapes: Mapping[str, Tuple[int, ...]], template_shapes: Mapping[str, Any],
                layout: str):
  """Matches torch names to Flax keys by name and shape, without data.

  ``shapes``: torch name -> torch-layout shape; ``template_shapes``: Flax
  ``collection/path`` -> shape. Returns (plan {torch name: flax key},
  skipped {torch name: reason}, left [flax keys not provided]).
  """
  plan, skipped, filled = {}, {}, {}
  for name, shape in shapes.items():
    key = next((c for c in torch_to_flax_path(name) or () if c in template_shapes), None)
    if key is None:
      skipped[name] = _skip_reason(name, layout)
      continue
    if key in filled:
      skipped[name] = f"duplicate of {filled[key]}"
      continue
    needed = _torch_shape(key, template_shapes[key])
    if tuple(shape) != needed:
      skipped[name] = f"shape {tuple(shape)} in the file, the model needs {needed}"
      continue
    plan[name] = key
    filled[key] = name
  left = [k for k in template_shapes if k not in filled]
  return plan, skipped, left


def merge_state_dict(state_dict: Mapping[str, Any], template, source: str = "state dict"):
  """Copies the tensors of a torch ``state_dict`` into ``template`` (Flax
  variables, or their shapes from ``jax.eval_shape``) where name and shape
  match. Returns (variables, report)."""
  layout = detect_layout(state_dict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template), sep="/")
  plan, skipped, left = match_names(
      {name: tuple(value.shape) for name, value in state_dict.items()},
      {key: tuple(leaf.shape) for key, leaf in flat.items()}, layout)
  report = ConversionReport(source=source, layout=layout, skipped=skipped,
                            left_at_init=left)
  new = dict(flat)
  for name, key in plan.items():
    array = _to_flax_layout(key, _to_numpy(state_dict[name]))
    new[key] = jnp.asarray(array, dtype=flat[key].dtype)
    report.copied.append((name, key))
  if layout == "torchvision" and "params/conv1/kernel" in plan.values():
    std = np.asarray(TORCHVISION_STD, np.float32) * 255.0
    new["params/conv1/kernel"] = new["params/conv1/kernel"] / std[None, None, :, None]
    report.notes.append(
        "torchvision ResNet: same tensor names and shapes, different network "
        "(stride on the 3x3 conv2, strided layer3/4); copied one to one into the "
        "Caffe-style dilated network; conv1 divided by 255 * ImageNet std per "
        "input channel, since our inputs are 0..255 minus the mean")
  return flax.traverse_util.unflatten_dict(new, sep="/"), report


def merge_variables(loaded, template, source: str = "checkpoint"):
  """Copies Flax ``loaded`` variables into ``template`` where path and shape
  match (e.g. an Orbax checkpoint of another class count). Returns
  (variables, report)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template), sep="/")
  flat_loaded = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")
  report = ConversionReport(source=source, layout="flax")
  new = dict(flat)
  for key, value in flat_loaded.items():
    if key not in flat:
      report.skipped[key] = "no variable of this name in the model"
    elif tuple(np.shape(value)) != tuple(flat[key].shape):
      report.skipped[key] = (f"shape {tuple(np.shape(value))} in the checkpoint, the "
                             f"model needs {tuple(flat[key].shape)}")
    else:
      new[key] = jnp.asarray(value, dtype=flat[key].dtype)
      report.copied.append((key, key))
  copied = {k for _, k in report.copied}
  report.left_at_init = [k for k in flat if k not in copied]
  return flax.traverse_util.unflatten_dict(new, sep="/"), report


# ---------------------------------------------------------------------------
# Public API.


def _num_classes(config) -> int:
  return int(config.data.num_classes)


def init_generator(config, rng=None):
  """(generator module, fresh variables) for ``config``."""
  generator = models.build_generator(config.model, _num_classes(config))
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  x = jnp.zeros((1, 33, 33, 3), jnp.float32)
  return generator, jax.jit(lambda r: generator.init(r, x, train=False))(rng)


def init_discriminator(config, rng=None):
  """(discriminator module, fresh variables) for ``config``."""
  discriminator = models.build_discriminator(config.model)
  rng = jax.random.PRNGKey(config.seed + 1) if rng is None else rng
  p = jnp.zeros((1, 64, 64, _num_classes(config)), jnp.float32)
  return discriminator, jax.jit(lambda r: discriminator.init(r, p))(rng)


def _load(state_dict, source, template, with_report: bool, kind: str, init_fn=None):
  """Checks the layout, then merges into ``template``. A template of shapes
  (``jax.eval_shape``) is replaced by ``init_fn()``'s real variables only when
  something is left at initialisation."""
  layout = detect_layout(state_dict)
  expected = ("fc-discriminator",) if kind == "discriminator" else (
      "authors-deeplab", "torchvision")
  if layout not in expected:
    raise ValueError(
        f"{source} does not look like a {kind} checkpoint (detected layout "
        f"{layout!r}; first names: {list(state_dict)[:5]})")
  variables, report = merge_state_dict(state_dict, template, source)
  if report.left_at_init and init_fn is not None:
    variables, report = merge_state_dict(state_dict, init_fn(), source)
  log_report(report)
  return (variables, report) if with_report else variables


def _convert(state_dict, source, config, kind, init_variables, with_report):
  if init_variables is not None:
    return _load(state_dict, source, init_variables, with_report, kind)
  if kind == "generator":
    module = models.build_generator(config.model, _num_classes(config))
    x = jnp.zeros((1, 33, 33, 3), jnp.float32)
    init_fn = lambda: init_generator(config)[1]
  else:
    module = models.build_discriminator(config.model)
    x = jnp.zeros((1, 64, 64, _num_classes(config)), jnp.float32)
    init_fn = lambda: init_discriminator(config)[1]
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  return _load(state_dict, source, abstract, with_report, kind, init_fn)


def load_torch_generator(path_or_state_dict, config, init_variables=None,
                         with_report: bool = False):
  """Flax variables ``{"params", "batch_stats"}`` of ``build_generator(config.model,
  config.data.num_classes)``, from a PyTorch DeepLab or torchvision ResNet
  checkpoint (a ``.pth`` path, or a mapping of names to tensors/arrays).

  Variables the checkpoint does not provide keep their values from
  ``init_variables`` (default: a fresh init with ``config.seed``, computed
  only if needed). With ``with_report=True`` returns ``(variables,
  ConversionReport)``.
  """
  state_dict, source = load_state_dict(path_or_state_dict)
  return _convert(state_dict, source, config, "generator", init_variables, with_report)


def load_torch_discriminator(path_or_state_dict, config, init_variables=None,
                             with_report: bool = False):
  """Flax variables ``{"params"}`` of ``build_discriminator(config.model)`` from
  the authors' FCDiscriminator checkpoint; as ``load_torch_generator``."""
  state_dict, source = load_state_dict(path_or_state_dict)
  return _convert(state_dict, source, config, "discriminator", init_variables,
                  with_report)


def log_report(report: ConversionReport):
  logging.info("weights from %s", report.summary())


# ---------------------------------------------------------------------------
# Orbax checkpoints and ``config.init_from``.


def save_converted(path: str, generator=None, discriminator=None):
  """Writes ``{"generator": ..., "discriminator": ...}`` (those given) as an
  Orbax PyTree checkpoint at ``path`` (which must not exist)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = {}
  if generator is not None:
    tree["generator"] = generator
  if discriminator is not None:
    tree["discriminator"] = discriminator
  if not tree:
    raise ValueError("nothing to save")
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, jax.device_get(tree))
  return path


def _orbax_item_dir(path: str) -> str:
  """The PyTree directory of ``path``: itself, a step's ``default`` item, or
  the latest step of a training workdir (``path/checkpoints``) or manager dir."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = [d for d in os.listdir(path) if d.isdigit()
           and os.path.isdir(os.path.join(path, d))]
  if steps:
    mngr = ocp.CheckpointManager(path)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
      raise FileNotFoundError(f"{path} holds no finished checkpoint")
    path = os.path.join(path, str(step))
  if os.path.isdir(os.path.join(path, "default")):
    path = os.path.join(path, "default")
  return path


def load_orbax(path: str) -> Dict[str, Any]:
  """``{"generator": vars, "discriminator": vars}`` (those present) from a
  directory written by ``save_converted`` or a training checkpoint (a
  workdir, its ``checkpoints`` folder, or one step of it)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  item = _orbax_item_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(item)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    # numpy arrays on the host: no sharding needed, whatever saved them.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                dict(tree))
    restored = ckptr.restore(
        item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  if "g_params" in restored:  # A training state.
    out = {"generator": {"params": restored["g_params"],
                         "batch_stats": restored["g_batch_stats"]}}
    if "d_params" in restored:
      out["discriminator"] = {"params": restored["d_params"]}
    return out
  out = {k: restored[k] for k in ("generator", "discriminator") if k in restored}
  if not out:
    raise ValueError(f"{item} holds neither converted variables (generator/"
                     f"discriminator) nor a training state; keys: {list(restored)}")
  return out


def load_init_from(init_from: str, g_vars, d_vars):
  """``config.init_from`` applied to fresh variables: (g_vars, d_vars).

  ``init_from`` is one or more comma-separated sources, each a ``.pth`` file
  (a generator or a discriminator, detected from its names), a directory
  written by this module's CLI, or a training workdir/checkpoint (its latest
  step's S and D weights and BN statistics; not its step or optimiser state).
  Tensors are copied where name and shape match; the report is logged.
  """
  for src in [s.strip() for s in init_from.split(",") if s.strip()]:
    if os.path.isdir(src):
      loaded = load_orbax(src)
      if "generator" in loaded:
        g_vars, report = merge_variables(loaded["generator"], g_vars, f"{src} (S)")
        log_report(report)
      if "discriminator" in loaded:
        d_vars, report = merge_variables(loaded["discriminator"], d_vars, f"{src} (D)")
        log_report(report)
      continue
    state_dict, source = load_state_dict(src)
    if detect_layout(state_dict) == "fc-discriminator":
      d_vars = _load(state_dict, source, d_vars, False, "discriminator")
    else:
      g_vars = _load(state_dict, source, g_vars, False, "generator")
  return g_vars, d_vars


def main(argv):
  from absl import app  # pylint: disable=import-outside-toplevel
  if len(argv) != 3:
    raise app.UsageError("usage: python -m advsemiseg_jax.convert SRC.pth DST_DIR "
                         "--config=configs/...py [--discriminator=D.pth]")
  src, dst = argv[1], argv[2]
  config = _FLAGS.config
  logging.set_verbosity(logging.WARNING)  # The reports are printed below.
  state_dict, source = load_state_dict(src)
  g_vars = d_vars = None
  if detect_layout(state_dict) == "fc-discriminator":
    d_vars, report = _convert(state_dict, source, config, "discriminator", None, True)
  else:
    g_vars, report = _convert(state_dict, source, config, "generator", None, True)
  print(report.summary(max_lines=1000))
  if _FLAGS.discriminator:
    d_vars, report = load_torch_discriminator(_FLAGS.discriminator, config,
                                              with_report=True)
    print(report.summary(max_lines=1000))
  path = save_converted(dst, g_vars, d_vars)
  print(f"wrote {path}; use it with --config.init_from={path}")


_FLAGS = None


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  global _FLAGS
  config_flags.DEFINE_config_file(
      "config", None, "Config file (path[:variants]) giving the model and classes.",
      lock_config=True)
  flags.DEFINE_string("discriminator", None,
                      "Optional FCDiscriminator .pth converted alongside SRC.")
  flags.mark_flags_as_required(["config"])
  _FLAGS = flags.FLAGS


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  _define_flags()
  _app.run(main)
