"""Training curves from logged TensorBoard scalars."""
import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from advsemiseg_jax import plot


def _log(workdir, steps, values, tag):
  writer = metric_writers.create_default_writer(str(workdir))
  for s, v in zip(steps, values):
    writer.write_scalars(s, {tag: v})
  writer.flush()
  writer.close()


def test_read_scalars_keeps_the_latest_value_of_a_repeated_step(tmp_path):
  _log(tmp_path, [10, 20, 30], [3.0, 2.0, 1.0], "train/loss_ce")
  _log(tmp_path, [30, 40], [0.9, 0.5], "train/loss_ce")      # a resumed run
  _log(tmp_path, [20, 40], [12.5, 30.0], "val/miou")
  scalars = plot.read_scalars(str(tmp_path))
  steps, values = scalars["train/loss_ce"]
  assert list(steps) == [10, 20, 30, 40]
  np.testing.assert_allclose(values, [3.0, 2.0, 0.9, 0.5])
  assert list(scalars["val/miou"][0]) == [20, 40]


def test_plot_writes_a_png_and_cli_reports_missing_runs(tmp_path, capsys):
  _log(tmp_path / "run", [10, 20], [3.0, 2.0], "train/loss_ce")
  _log(tmp_path / "run", [10, 20], [0.1, 0.4], "train/semi_ratio")
  _log(tmp_path / "run", [20], [40.0], "val/miou")
  assert plot.main([str(tmp_path / "run")]) == 0
  path = capsys.readouterr().out.strip()
  assert path == str(tmp_path / "run" / "curves.png")
  picture = Image.open(path)
  assert picture.format == "PNG" and picture.size[0] > 1000
  (tmp_path / "empty").mkdir()
  assert plot.main([str(tmp_path / "empty")]) == 1
  assert "no TensorBoard scalars" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError):
    plot.plot(str(tmp_path / "missing"))
