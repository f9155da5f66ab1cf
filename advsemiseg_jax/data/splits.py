"""Label fractions: which training images are labeled, saved and reloaded.

A split is drawn as a seeded permutation of the training list (the first
``labeled_fraction`` of it labeled, the rest unlabeled), written to
``WORKDIR/split.json`` with the example ids, and reused on resume. A split
file (``data.split_file``) can be given instead:

- ``.json``: our ``split.json`` (ids), or a JSON list of indices;
- ``.txt`` (any other extension): labeled ids, one per line (first token;
  a path's stem also matches); every other training example is unlabeled;
- ``.pkl``/``.pickle``: the authors' ``train_id.pkl`` and later papers'
  ``split_0.pkl``: a permutation of indices into the sorted training list,
  of which the first ``int(fraction * N)`` are labeled and the rest
  unlabeled. Pickles run code when loaded, so they are read with a
  restricted unpickler that builds only lists, tuples and integers (plus
  numpy integer arrays and scalars, from numpy's own reconstructors); any
  other class or function in the file is refused;
- ``.npy``: the same index list, read without pickle.
"""
import io
import json
import os
import pickle

import numpy as np
from absl import logging

from advsemiseg_jax.data.files import DataError

SPLIT_FILENAME = "split.json"
FORMAT = "advsemiseg-split/1"


def labeled_split(num_examples: int, fraction: float, seed: int):
  """(labeled ids, unlabeled ids) from a seeded permutation of the train list.

  As in the authors' code, the first ``int(fraction * N)`` ids of the
  permutation are labeled and the rest unlabeled.
  """
  check_fraction(fraction)
  perm = np.random.RandomState(seed).permutation(num_examples)
  n = max(int(fraction * num_examples), 1)
  return perm[:n], perm[n:]


def check_fraction(fraction: float):
  if not 0.0 < fraction <= 1.0:
    raise DataError(f"data.labeled_fraction must be in (0, 1], got {fraction}")


class _IndexUnpickler(pickle.Unpickler):
  """Builds only containers and numbers; refuses every other global."""

  ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
             ("numpy._core.multiarray", "_reconstruct"),
             ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
             ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: a split pickle may only hold a list "
        "of integers")


def read_index_pickle(path: str) -> list:
  """The list of ints in a pickle, read without running arbitrary code."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = _IndexUnpickler(io.BytesIO(data), encoding="latin1").load()
  except Exception as e:  # a malformed pickle raises many types
    raise DataError(f"split file {path}: not a pickled list of integers ({e})") from None
  return _as_index_list(obj, path)


def _as_index_list(obj, path: str) -> list:
  if isinstance(obj, np.ndarray):
    if obj.ndim != 1 or not (obj.dtype.kind in "iu" or obj.size == 0):
      raise DataError(f"split file {path}: expected a 1-D integer array, got "
                      f"{obj.dtype} {obj.shape}")
    return [int(v) for v in obj]
  if not isinstance(obj, (list, tuple)):
    raise DataError(f"split file {path}: expected a list of integers, got "
                    f"{type(obj).__name__}")
  out = []
  for v in obj:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise DataError(f"split file {path}: expected integers, found {v!r}")
    out.append(int(v))
  return out


def _resolve_ids(tokens, all_ids, path: str) -> list:
  """Training ids named by ``tokens`` (an id, or a path whose stem is one)."""
  known = set(all_ids)
  by_stem = {}
  for i in all_ids:
    by_stem.setdefault(os.path.splitext(os.path.basename(i))[0], []).append(i)
  out, unknown = [], []
  for t in tokens:
    t = str(t)
    stem = os.path.splitext(os.path.basename(t))[0]
    if t in known:
      out.append(t)
    elif len(by_stem.get(stem, ())) == 1:
      out.append(by_stem[stem][0])
    else:
      unknown.append(t)
  if unknown:
    raise DataError(f"split file {path} names {len(unknown)} id(s) that are not in "
                    f"the training list, e.g. {unknown[:5]}")
  return out


def _from_indices(indices, all_ids, fraction: float, path: str):
  """The authors' semantics: the first int(fraction * N) entries are labeled."""
  n = len(all_ids)
  bad = [i for i in indices if not 0 <= i < n]
  if bad:
    raise DataError(f"split file {path}: indices {bad[:5]} are outside the training "
                    f"list of {n} examples")
  if len(set(indices)) != len(indices):
    raise DataError(f"split file {path}: repeated indices")
  partial = max(int(fraction * n), 1)
  if len(indices) < partial:
    raise DataError(f"split file {path} lists {len(indices)} indices, fewer than the "
                    f"{partial} labeled examples of labeled_fraction={fraction}")
  return ([all_ids[i] for i in indices[:partial]],
          [all_ids[i] for i in indices[partial:]])


def read_split_file(path: str, all_ids, fraction: float):
  """(labeled ids, unlabeled ids) from a split file of any supported format."""
  if not os.path.isfile(path):
    raise DataError(f"data.split_file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pkl", ".pickle"):
    return _from_indices(read_index_pickle(path), all_ids, fraction, path)
  if ext == ".npy":
    try:
      arr = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise DataError(f"split file {path}: {e}") from None
    return _from_indices(_as_index_list(arr, path), all_ids, fraction, path)
  if ext == ".json":
    with open(path) as f:
      try:
        obj = json.load(f)
      except json.JSONDecodeError as e:
        raise DataError(f"split file {path} is not valid JSON: {e}") from None
    if isinstance(obj, dict) and "labeled" in obj:
      labeled = _resolve_ids(obj["labeled"], all_ids, path)
      unlabeled = _resolve_ids(obj.get("unlabeled", []), all_ids, path)
      return labeled, unlabeled
    return _from_indices(_as_index_list(obj, path), all_ids, fraction, path)
  with open(path) as f:
    tokens = [line.split()[0] for line in f if line.strip()]
  labeled = _resolve_ids(tokens, all_ids, path)
  chosen = set(labeled)
  return labeled, [i for i in all_ids if i not in chosen]


def write_split(path: str, labeled, unlabeled, meta: dict):
  """Writes ``split.json`` atomically."""
  record = dict(format=FORMAT, **meta, num_labeled=len(labeled),
                num_unlabeled=len(unlabeled), labeled=list(labeled),
                unlabeled=list(unlabeled))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def _positions(split, labeled, unlabeled):
  """Ids -> index arrays into ``split.ids``; skipped (bad) ids are dropped."""
  pos = {i: k for k, i in enumerate(split.ids)}
  dropped = [i for i in list(labeled) + list(unlabeled) if i not in pos]
  if dropped:
    logging.warning("split: %d example(s) skipped as bad files are left out: %s",
                    len(dropped), dropped[:10])
  lab = np.array([pos[i] for i in labeled if i in pos], np.int64)
  unl = np.array([pos[i] for i in unlabeled if i in pos], np.int64)
  if len(lab) == 0:
    raise DataError("the split has no labeled example left")
  overlap = set(labeled) & set(unlabeled)
  if overlap:
    raise DataError(f"the split lists {len(overlap)} example(s) as both labeled and "
                    f"unlabeled, e.g. {sorted(overlap)[:5]}")
  return lab, unl


def make_split(split, data_config, workdir: str = None, dataset: str = "",
               write: bool = None):
  """(labeled, unlabeled) index arrays into ``split`` (the train Split).

  Order of precedence: ``data.split_file``; else ``WORKDIR/split.json`` from
  an earlier run (refused if it was drawn with another fraction or seed);
  else a fresh seeded permutation. The split in use is written to
  ``WORKDIR/split.json`` when that file does not exist yet (by process 0
  only, unless ``write`` says otherwise).
  """
  check_fraction(data_config.labeled_fraction)
  all_ids = list(split.all_ids)
  saved = os.path.join(workdir, SPLIT_FILENAME) if workdir else None
  meta = dict(dataset=dataset, num_train=len(all_ids),
              labeled_fraction=data_config.labeled_fraction,
              split_seed=data_config.split_seed,
              split_file=data_config.split_file)
  if data_config.split_file:
    labeled, unlabeled = read_split_file(data_config.split_file, all_ids,
                                         data_config.labeled_fraction)
    if saved and os.path.isfile(saved):
      prev_l, prev_u = read_split_file(saved, all_ids, data_config.labeled_fraction)
      if (prev_l, prev_u) != (list(labeled), list(unlabeled)):
        raise DataError(f"{saved} holds a different split than data.split_file="
                        f"{data_config.split_file}; use a fresh workdir")
  elif saved and os.path.isfile(saved):
    with open(saved) as f:
      prev = json.load(f)
    for key in ("labeled_fraction", "split_seed", "num_train"):
      if prev.get(key) != meta[key] and not prev.get("split_file"):
        raise DataError(
            f"{saved} was drawn with {key}={prev.get(key)}, but this run has "
            f"{meta[key]}; use a fresh workdir, or "
            f"--config.data.split_file={saved} to keep that split")
    labeled, unlabeled = read_split_file(saved, all_ids, data_config.labeled_fraction)
    logging.info("reusing the split in %s (%d labeled, %d unlabeled)", saved,
                 len(labeled), len(unlabeled))
  else:
    lab_idx, unl_idx = labeled_split(len(all_ids), data_config.labeled_fraction,
                                     data_config.split_seed)
    labeled = [all_ids[i] for i in lab_idx]
    unlabeled = [all_ids[i] for i in unl_idx]
  if write is None:
    import jax  # pylint: disable=g-import-not-at-top
    write = jax.process_index() == 0
  if write and saved and not os.path.isfile(saved):
    write_split(saved, labeled, unlabeled, meta)
  return _positions(split, labeled, unlabeled)
