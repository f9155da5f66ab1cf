"""``mode=predict``: segment a folder of images with a trained S (and D).

For every JPEG/PNG under ``predict.input`` (searched recursively, sorted),
writes under ``predict.output``, keeping the relative path with a .png name:

  labels/NAME.png        class ids (single channel, uint8)
  color/NAME.png         the prediction in the dataset's palette
  confidence/NAME.png    (predict.heatmaps) softmax probability of the predicted class
  d_confidence/NAME.png  (predict.heatmaps) D's confidence map (its sigmoid output)
  overlay/NAME.png       (predict.overlay) the colour map blended over the input

Images go through the evaluation protocol (``data.eval_protocol``, and TTA
when configured), so the labels equal what ``mode=evaluate`` scores: each
image is padded bottom/right to the fixed canvas (one compile for the whole
folder). An image larger than the canvas is first scaled down to fit it
(aspect ratio kept) and its outputs are resized back to its own size (labels
nearest, heat maps bilinear). ``whole`` uses the folder's largest image,
rounded up to the stride, as the canvas. A file that cannot be read as an
image is skipped with a warning naming it.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from advsemiseg_jax import checkpoint, evaluate, palettes, parallel
from advsemiseg_jax.data import ops
from advsemiseg_jax.models import confidence_logits
from advsemiseg_jax.validate import validate_config

EXTENSIONS = (".jpg", ".jpeg", ".png")
OUTPUTS = ("labels", "color", "confidence", "d_confidence", "overlay")


def list_images(folder: str):
  """Relative paths of the JPEG/PNG files under ``folder``, sorted."""
  found = []
  for root, _, names in os.walk(folder):
    for name in names:
      if name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), folder))
  return sorted(found)


def read_image(path: str) -> np.ndarray:
  """HxWx3 uint8 RGB; raises on anything that is not a readable image."""
  with Image.open(path) as im:
    im.load()
    return np.asarray(im.convert("RGB"), np.uint8)


def image_size(path: str):
  """(h, w) from the file header, or None when unreadable."""
  try:
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except (OSError, ValueError, Image.DecompressionBombError):
    return None


def fit_to_canvas(image: np.ndarray, canvas):
  """``image`` scaled down (bilinear, aspect kept) to fit ``canvas``; as is if it fits."""
  h, w = image.shape[:2]
  f = min(canvas[0] / h, canvas[1] / w)
  if f >= 1:
    return image
  size = (max(1, min(canvas[1], int(w * f + 0.5))), max(1, min(canvas[0], int(h * f + 0.5))))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), np.uint8)


def to_canvas(image: np.ndarray, canvas) -> np.ndarray:
  """uint8 RGB -> the network's input: RGB minus the mean, zero-padded
  bottom/right to ``canvas`` (exactly what the evaluation stream feeds)."""
  x = image.astype(np.float32) - np.asarray(ops.RGB_MEAN, np.float32)
  out = np.zeros((canvas[0], canvas[1], 3), np.float32)
  out[:x.shape[0], :x.shape[1]] = x
  return out


def restore_model(config, workdir: str):
  """(generator, discriminator, S's variables, D's parameters) from the latest
  checkpoint in ``workdir`` (or ``config.init_from`` when there is none)."""
  from advsemiseg_jax.train import build_training
  mngr = checkpoint.manager(workdir, config.max_to_keep)
  if mngr.latest_step() is None and not config.init_from:
    mngr.close()
    raise FileNotFoundError(f"mode=predict but {mngr.directory} holds no checkpoint "
                            "and config.init_from is empty")
  generator, discriminator, state, _ = build_training(config, config.data.num_classes)
  restored = checkpoint.restore_latest(mngr, state)
  mngr.close()
  state = state if restored is None else restored
  return (generator, discriminator,
          {"params": state.g_params, "batch_stats": state.g_batch_stats},
          state.d_params)


def make_outputs_fn(generator, discriminator, protocol, views=()):
  """``outputs(g_vars, d_params, images) -> (labels, softmax max, D confidence)``
  under the protocol, from the TTA probabilities when ``views``. Not jitted."""
  predict = evaluate.make_predict_fn(generator, protocol, views)

  def outputs(g_vars, d_params, images):
    out = predict(g_vars, images)
    if "tta" in out:
      probs = out["tta"]
    elif protocol.name == "sliding":
      probs = out["scores"]
    else:
      probs = jax.nn.softmax(out["scores"], -1)
    labels = jnp.argmax(out["tta"] if "tta" in out else out["scores"], -1)
    d_out = discriminator.apply({"params": d_params}, probs)
    d_conf = jax.nn.sigmoid(confidence_logits(d_out, images.shape[1:3]))
    return labels.astype(jnp.int32), jnp.max(probs, -1), d_conf

  return outputs


def _save_png(array: np.ndarray, path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _resize(array: np.ndarray, hw, resample) -> np.ndarray:
  if array.shape[:2] == tuple(hw):
    return array
  mode = "F" if array.dtype == np.float32 else None
  im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  return np.asarray(im.resize((hw[1], hw[0]), resample))


def write_outputs(out_dir: str, rel: str, image, labels, conf, d_conf, palette,
                  predict_config):
  """Writes one image's PNGs (outputs already cropped to ``image``'s size)."""
  name = os.path.splitext(rel)[0] + ".png"
  colour = palettes.colorize(labels, palette)
  _save_png(labels.astype(np.uint8), os.path.join(out_dir, "labels", name))
  _save_png(colour, os.path.join(out_dir, "color", name))
  if predict_config.heatmaps:
    _save_png(palettes.heatmap(conf), os.path.join(out_dir, "confidence", name))
    _save_png(palettes.heatmap(d_conf), os.path.join(out_dir, "d_confidence", name))
  if predict_config.overlay:
    _save_png(palettes.overlay(image, colour, predict_config.overlay_alpha),
              os.path.join(out_dir, "overlay", name))


def predict(config, workdir: str):
  """Runs ``mode=predict``; returns {"written": [...], "skipped": [...], "output": DIR}."""
  validate_config(config)
  if jax.process_count() > 1:
    raise ValueError("mode=predict runs on one host; start it without multi-host flags")
  pc = config.predict
  rels = list_images(pc.input)
  if not rels:
    raise FileNotFoundError(f"no .jpg/.jpeg/.png images under {pc.input!r}")
  sizes = [image_size(os.path.join(pc.input, r)) for r in rels]
  readable = [s for s in sizes if s is not None]
  max_shape = tuple(np.max(readable, axis=0)) if readable else ()
  # Only ``whole`` takes its canvas from the images; the others scale large
  # images down to their canvas instead of refusing them.
  protocol = evaluate.make_protocol(
      config.data, max_shape if config.data.eval_protocol == "whole" else ())
  views = evaluate.tta_views(config.tta)
  _, palette = palettes.class_info(config.data)

  generator, discriminator, g_vars, d_params = restore_model(config, workdir)
  mesh = parallel.make_mesh()
  gb = config.data.eval_batch_size
  parallel.check_batch(gb, mesh, "data.eval_batch_size")
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  run = jax.jit(make_outputs_fn(generator, discriminator, protocol, views),
                in_shardings=(repl, repl, sharded), out_shardings=repl)
  g_vars, d_params = jax.device_put((g_vars, d_params), repl)

  canvas = protocol.canvas
  bar = evaluate.Progress(len(rels), "predicting")
  written, skipped, pending = [], [], []

  def flush():
    images = np.zeros((gb,) + tuple(canvas) + (3,), np.float32)
    for i, (_, _, fitted) in enumerate(pending):
      images[i] = to_canvas(fitted, canvas)
    labels, conf, d_conf = jax.device_get(run(g_vars, d_params, images))
    for i, (rel, image, fitted) in enumerate(pending):
      h, w = fitted.shape[:2]
      hw = image.shape[:2]
      write_outputs(pc.output, rel, image,
                    _resize(labels[i, :h, :w].astype(np.uint8), hw, Image.NEAREST),
                    _resize(conf[i, :h, :w].astype(np.float32), hw, Image.BILINEAR),
                    _resize(d_conf[i, :h, :w].astype(np.float32), hw, Image.BILINEAR),
                    palette, pc)
      written.append(rel)
    bar.update(len(pending))
    pending.clear()

  for rel in rels:
    path = os.path.join(pc.input, rel)
    try:
      image = read_image(path)
    except Exception as e:  # PIL raises many types for broken files.
      logging.warning("skipping bad image %s: %s", path, e)
      skipped.append(rel)
      bar.update(1)
      continue
    pending.append((rel, image, fit_to_canvas(image, canvas)))
    if len(pending) == gb:
      flush()
  if pending:
    flush()
  logging.info("predict: wrote %d image(s) to %s (%s)%s", len(written), pc.output,
               protocol.describe(),
               f"; skipped {len(skipped)} bad file(s): {skipped}" if skipped else "")
  return {"written": written, "skipped": skipped, "output": pc.output}

