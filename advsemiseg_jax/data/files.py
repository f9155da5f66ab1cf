"""Reading examples from files, with errors that name the file.

Everything that touches a user's files goes through here: the layout checks
(a missing folder names the path and the layout expected there), decoding
(a corrupt file is named), label mapping (a value that is neither a class nor
the ignore value is named with the file and the value) and size checks.
Decoding uses PIL, which reads a palette PNG's indices (VOC's own
SegmentationClass labels) rather than its colours, and releases the GIL while
it decodes, so a thread pool or parallel tf.data map decodes in parallel.
"""
import os
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
INVALID = -1  # marks a raw label value that is neither a class nor ignore


class DataError(ValueError):
  """A dataset problem the user can fix; the message names the file or path."""


def require_dir(path: str, what: str, layout: str):
  """Raises DataError naming ``path`` and the expected ``layout`` if absent."""
  if not os.path.isdir(path):
    raise DataError(f"{what} not found: {path!r} is not a directory.\n"
                    f"Expected layout:\n{layout}")


def require_file(path: str, what: str, layout: str = ""):
  """Raises DataError naming ``path`` if it is not a file."""
  if not os.path.isfile(path):
    hint = f"\nExpected layout:\n{layout}" if layout else ""
    raise DataError(f"{what} not found: {path!r}{hint}")


def read_list_file(path: str) -> list:
  """Non-empty, non-comment lines of a list file, split into tokens."""
  require_file(path, "list file")
  with open(path) as f:
    rows = [line.split() for line in f]
  return [r for r in rows if r and not r[0].startswith("#")]


def label_lut(num_classes: int, mapping: Dict[int, int] = None) -> np.ndarray:
  """A 256-entry int32 table from raw label values to training labels.

  Values ``0..num_classes-1`` map to themselves, 255 to 255 (ignore), and
  ``mapping`` overrides entries (e.g. ``{11: 255}`` for a void class); every
  other value maps to INVALID, which ``map_label`` reports.
  """
  lut = np.full(256, INVALID, np.int32)
  lut[:num_classes] = np.arange(num_classes)
  lut[IGNORE_LABEL] = IGNORE_LABEL
  for src, dst in (mapping or {}).items():
    if not (0 <= src <= 255 and (0 <= dst < num_classes or dst == IGNORE_LABEL)):
      raise DataError(f"label mapping {src}:{dst} is invalid: the source must be "
                      f"0..255 and the target a class 0..{num_classes - 1} or 255")
    lut[src] = dst
  return lut


def parse_label_map(spec: str) -> Dict[int, int]:
  """``"11:255,0:3"`` -> ``{11: 255, 0: 3}`` (the ``data.label_map`` syntax)."""
  mapping = {}
  for item in (spec or "").replace(" ", "").split(","):
    if not item:
      continue
    try:
      src, dst = (int(v) for v in item.split(":"))
    except ValueError:
      raise DataError(f"data.label_map entry {item!r} is not SRC:DST "
                      "(two integers, e.g. 11:255)") from None
    mapping[src] = dst
  return mapping


def map_label(raw: np.ndarray, lut: np.ndarray, where: str) -> np.ndarray:
  """Applies ``lut``; a value it marks INVALID raises DataError naming ``where``."""
  mapped = lut[raw]
  if (mapped == INVALID).any():
    bad = np.unique(raw[mapped == INVALID])
    valid = np.flatnonzero(lut != INVALID)
    raise DataError(f"label file {where}: value(s) {bad[:10].tolist()} are neither a "
                    f"class nor the ignore value (accepted raw values: "
                    f"{_ranges(valid)}); fix the file or set data.label_map")
  return mapped.astype(np.uint8)


def _ranges(values) -> str:
  """[0, 1, 2, 5, 255] -> '0..2, 5, 255'."""
  out, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      out.append(f"{start}" if start == v else f"{start}..{v}")
      start = None
  return ", ".join(out)


def _open(path: str, what: str) -> Image.Image:
  try:
    img = Image.open(path)
    img.load()
  except FileNotFoundError:
    raise DataError(f"{what} not found: {path}") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot read {what} {path}: {e}") from None
  return img


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 HxWx3 array (grey, palette, RGBA and CMYK images are
  converted; 16-bit grey is rounded to 8 bits, v / 257, where PIL's own
  conversion would clip everything above 255 to white)."""
  img = _open(path, "image")
  if img.mode.startswith("I"):  # I;16, I;16B, I (32-bit ints holding 16-bit PNGs)
    grey = np.asarray(img).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
      raise DataError(f"image {path}: integer values outside 0..65535 "
                      f"(min {grey.min()}, max {grey.max()}); expected 8- or 16-bit")
    grey = ((grey + 128) // 257).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if img.mode == "F":
    raise DataError(f"image {path} has floating-point pixels (mode 'F'); expected "
                    "8- or 16-bit grey, RGB, RGBA, CMYK or palette")
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.uint8)


def read_label(path: str) -> np.ndarray:
  """The raw uint8 HxW values of a single-channel or palette label image.

  A palette PNG yields its palette indices (VOC's SegmentationClass), not its
  colours; an RGB label image is refused, since its class ids are unknown.
  """
  img = _open(path, "label")
  if img.mode not in ("L", "P", "I", "I;16", "1"):
    raise DataError(f"label file {path} has mode {img.mode!r}; expected a "
                    "single-channel (class id) or palette PNG, not colours")
  label = np.asarray(img)
  if label.dtype != np.uint8:
    if label.size and (label.min() < 0 or label.max() > 255):
      raise DataError(f"label file {path}: values outside 0..255 "
                      f"(min {label.min()}, max {label.max()})")
    label = label.astype(np.uint8)
  return label


def image_size(path: str, what: str = "image") -> Tuple[int, int]:
  """(height, width) from the file header, without decoding."""
  try:
    with Image.open(path) as img:
      w, h = img.size
  except FileNotFoundError:
    raise DataError(f"{what} not found: {path}") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot read {what} {path}: {e}") from None
  return h, w


def read_pair(image_path: str, label_path: str, lut: np.ndarray):
  """(image uint8 HxWx3, label uint8 HxW) checked for sizes and label values."""
  image = read_image(image_path)
  label = map_label(read_label(label_path), lut, label_path)
  check_sizes(image, label, image_path, label_path)
  return image, label


def check_sizes(image, label, image_where: str, label_where: str):
  if tuple(image.shape[:2]) != tuple(label.shape[:2]):
    raise DataError(f"label {label_where} is {label.shape[0]}x{label.shape[1]} but "
                    f"its image {image_where} is {image.shape[0]}x{image.shape[1]}")


def missing_files(paths: Sequence[str]) -> list:
  return [p for p in paths if not os.path.isfile(p)]


def require_all(paths: Sequence[str], what: str, layout: str = ""):
  """Raises DataError naming the first few of ``paths`` that are missing."""
  missing = missing_files(paths)
  if missing:
    shown = "\n  ".join(missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    hint = f"\nExpected layout:\n{layout}" if layout else ""
    raise DataError(f"{len(missing)} {what} missing:\n  {shown}{more}{hint}")


def available_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo, else total physical memory, else 0."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0
