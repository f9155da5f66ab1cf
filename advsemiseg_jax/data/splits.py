"""Label fractions: which training images are labeled."""
import numpy as np


def labeled_split(num_examples: int, fraction: float, seed: int):
  """(labeled ids, unlabeled ids) from a seeded permutation of the train list.

  As in the authors' code, the first ``int(fraction * N)`` ids of the
  permutation are labeled and the rest unlabeled.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.labeled_fraction must be in (0, 1], got {fraction}")
  perm = np.random.RandomState(seed).permutation(num_examples)
  n = max(int(fraction * num_examples), 1)
  return perm[:n], perm[n:]
