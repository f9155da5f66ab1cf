"""The README's "Python API" lines (between its python-api markers), run
exactly as written, on a tiny PyTorch state dict saved under the file name
the snippet loads."""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as tr  # noqa: E402
from conftest import ROOT  # noqa: E402

BEGIN, END = "<!-- python-api:begin -->", "<!-- python-api:end -->"


def api_snippet():
  path = ROOT / "README.md"
  text = path.read_text()
  assert BEGIN in text and END in text, "no python-api markers in README.md"
  block = text.split(BEGIN, 1)[1].split(END, 1)[0]
  code = re.search(r"```python\n(.*?)```", block, re.S)
  assert code, f"no python block between the markers in {path}"
  return code.group(1), path


def test_python_api_snippet_runs(tmp_path, monkeypatch):
  code, source = api_snippet()
  path = re.search(r'load_torch_generator\("([^"]+)"', code).group(1)
  torch.manual_seed(0)
  model = tr.ResNetDeepLab(21, (1, 1, 1, 1), 8, early_return=True)
  tr.randomize_bn_stats(model, torch.Generator().manual_seed(0))
  torch.save(model.state_dict(), tmp_path / path)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(ROOT))
  namespace = {"__name__": "python_api_snippet"}
  exec(compile(code, str(source), "exec"), namespace)  # noqa: S102

  # It loaded the file and computed the authors' logits and all the losses.
  with torch.no_grad():
    ref = tr.interp(model.eval()(tr.to_nchw(np.asarray(namespace["images"]))), (321, 321))
  ref = ref.numpy().transpose(0, 2, 3, 1)
  logits = np.asarray(namespace["logits"])
  assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
  assert namespace["confidence"].shape == (2, 321, 321)
  for name in ("loss_ce", "loss_adv", "loss_semi", "loss_d", "semi_ratio"):
    assert np.isfinite(float(namespace[name])), name
  assert float(namespace["loss_ce"]) > 0
