"""Label splits: fractions, split.json round trips, the authors' index
pickles (read without running code), text id lists, and reuse on resume."""
import json
import os
import pickle

import numpy as np
import pytest

from advsemiseg_jax.config import base_config
from advsemiseg_jax.data import splits
from advsemiseg_jax.data.files import DataError
from advsemiseg_jax.data.sources import Split

IDS = tuple(f"2007_{i:06d}" for i in range(16))


def train_split(ids=IDS, listed=()):
  return Split(len(ids), None, (), tuple(ids), tuple(listed))


def cfg(fraction=0.25, seed=0, split_file=""):
  c = base_config().data
  c.labeled_fraction, c.split_seed, c.split_file = fraction, seed, str(split_file)
  return c


def names(split, idx):
  return [split.ids[i] for i in idx]


def test_fraction_and_seed_give_disjoint_cover():
  lab, unl = splits.make_split(train_split(), cfg(0.25, seed=3))
  assert len(lab) == 4 and len(unl) == 12
  assert sorted(np.concatenate([lab, unl]).tolist()) == list(range(16))
  again = splits.make_split(train_split(), cfg(0.25, seed=3))
  np.testing.assert_array_equal(again[0], lab)
  other = splits.make_split(train_split(), cfg(0.25, seed=4))
  assert not np.array_equal(other[0], lab)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_is_rejected(fraction):
  with pytest.raises(DataError, match=r"labeled_fraction must be in \(0, 1\]"):
    splits.make_split(train_split(), cfg(fraction))


def test_split_json_written_with_ids_and_reloaded(tmp_path):
  split = train_split()
  lab, unl = splits.make_split(split, cfg(0.25, seed=1), str(tmp_path), "voc")
  record = json.load(open(tmp_path / "split.json"))
  assert record["labeled"] == names(split, lab)
  assert record["unlabeled"] == names(split, unl)
  assert record["dataset"] == "voc" and record["labeled_fraction"] == 0.25
  # Resume: the saved split is reused.
  lab2, unl2 = splits.make_split(split, cfg(0.25, seed=1), str(tmp_path), "voc")
  np.testing.assert_array_equal(lab2, lab)
  np.testing.assert_array_equal(unl2, unl)
  # As a split file in another workdir, on a list in another order.
  shuffled = train_split(IDS[::-1])
  lab3, _ = splits.make_split(shuffled, cfg(0.5, split_file=tmp_path / "split.json"),
                              str(tmp_path / "other"))
  assert names(shuffled, lab3) == names(split, lab)


def test_saved_split_with_other_fraction_is_refused(tmp_path):
  splits.make_split(train_split(), cfg(0.25), str(tmp_path))
  with pytest.raises(DataError, match="labeled_fraction=0.25, but this run has 0.5"):
    splits.make_split(train_split(), cfg(0.5), str(tmp_path))


def authors_pickle(indices, protocol):
  return pickle.dumps(list(indices), protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_index_pickle_round_trip_with_authors_semantics(tmp_path, protocol):
  perm = np.random.RandomState(0).permutation(16).tolist()
  path = tmp_path / "train_id.pkl"
  path.write_bytes(authors_pickle(perm, protocol))
  split = train_split()
  lab, unl = splits.make_split(split, cfg(0.25, split_file=path))
  # The first int(fraction * N) indices are labeled, the rest unlabeled.
  assert lab.tolist() == perm[:4] and unl.tolist() == perm[4:]


def test_numpy_index_pickle_and_npy(tmp_path):
  perm = np.random.RandomState(1).permutation(16)
  (tmp_path / "split_0.pkl").write_bytes(pickle.dumps(perm))
  (tmp_path / "ids.npy").write_bytes(b"")
  np.save(tmp_path / "ids.npy", perm)
  for name in ("split_0.pkl", "ids.npy"):
    lab, unl = splits.make_split(train_split(), cfg(0.125, split_file=tmp_path / name))
    assert lab.tolist() == perm[:2].tolist() and unl.tolist() == perm[2:].tolist()


class Exploit:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
  target = tmp_path / "pwned"
  path = tmp_path / "train_id.pkl"
  path.write_bytes(pickle.dumps([1, 2, Exploit(target)], protocol=2))
  with pytest.raises(DataError, match="not a pickled list of integers.*refusing"):
    splits.make_split(train_split(), cfg(0.25, split_file=path))
  assert not target.exists()
  path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(DataError, match="expected a list of integers"):
    splits.make_split(train_split(), cfg(0.25, split_file=path))


def test_bad_index_lists_are_rejected(tmp_path):
  path = tmp_path / "train_id.pkl"
  path.write_bytes(pickle.dumps([0, 1, 99]))
  with pytest.raises(DataError, match=r"indices \[99\] are outside"):
    splits.make_split(train_split(), cfg(0.125, split_file=path))
  path.write_bytes(pickle.dumps([0, 1, 1, 2]))
  with pytest.raises(DataError, match="repeated"):
    splits.make_split(train_split(), cfg(0.125, split_file=path))
  path.write_bytes(pickle.dumps([0]))
  with pytest.raises(DataError, match="fewer than the 2 labeled"):
    splits.make_split(train_split(), cfg(0.125, split_file=path))


def test_text_file_of_labeled_ids(tmp_path):
  path = tmp_path / "labeled.txt"
  path.write_text("2007_000003\nJPEGImages/2007_000007.jpg SegmentationClass/x.png\n\n")
  split = train_split()
  lab, unl = splits.make_split(split, cfg(0.5, split_file=path))
  assert names(split, lab) == ["2007_000003", "2007_000007"]
  assert len(unl) == 14 and 3 not in unl.tolist()


def test_unknown_ids_are_rejected(tmp_path):
  path = tmp_path / "labeled.txt"
  path.write_text("2007_000003\n2099_123456\n")
  with pytest.raises(DataError, match="2099_123456"):
    splits.make_split(train_split(), cfg(0.5, split_file=path))


def test_missing_split_file_is_named(tmp_path):
  with pytest.raises(DataError, match="split_file not found: .*nope.pkl"):
    splits.make_split(train_split(), cfg(0.5, split_file=tmp_path / "nope.pkl"))


def test_indices_refer_to_listed_ids_when_bad_files_were_skipped(tmp_path):
  path = tmp_path / "train_id.pkl"
  path.write_bytes(pickle.dumps([5, 2, 9, 0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15]))
  kept = tuple(i for i in IDS if i != IDS[2])  # IDS[2] was skipped as a bad file
  split = train_split(kept, listed=IDS)
  lab, unl = splits.make_split(split, cfg(0.25, split_file=path))
  assert names(split, lab) == [IDS[5], IDS[9], IDS[0]]
  assert len(unl) == 12
