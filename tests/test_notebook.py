"""notebooks/quickstart.ipynb: committed without outputs, and runs top to
bottom (quick setting) in a fresh kernel, as a user would from notebooks/."""
import json

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _outputs_text(cell) -> str:
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out.get("text", ""))
    elif "data" in out and "text/plain" in out["data"]:
      parts.append(out["data"]["text/plain"])
  return "".join(parts)


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, (
        f"clear the outputs before committing: {cell.source[:60]!r}")


def test_notebook_runs_with_quick_setting(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("ADVSEMISEG_QUICK", "1")
  monkeypatch.setenv("ADVSEMISEG_WORKDIR", str(workdir))
  monkeypatch.delenv("ADVSEMISEG_REPO", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": str(ROOT / "notebooks")}})
  try:
    client.execute()
  except CellExecutionError as e:  # names the failing cell and its traceback
    pytest.fail(f"a notebook cell failed:\n{e}")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert "nothing to install" in _outputs_text(code[0])
  text = "\n".join(_outputs_text(c) for c in code)
  assert "config configs/demo.py:quick: 30 steps" in text
  assert "val mIoU after 30 steps" in text
  # The picture cell drew a figure.
  assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs)
  # The evaluate cell rewrote results.json from the step-30 checkpoint.
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 30 and 0.0 <= results["miou"] <= 100.0
  assert f"val mIoU {results['miou']:.1f}%" in text
