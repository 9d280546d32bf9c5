"""The notebooks (notebooks/*.ipynb), executed top to bottom on the CPU with
nbclient, their epochs and steps shrunk through the environment."""

import os

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from conftest import ROOT


def _execute(name: str, monkeypatch, **env):
  """Run the notebook in the repository root; returns each code cell's text
  output and the executed notebook."""
  assert "python3" in KernelSpecManager().find_kernel_specs(), "no python3 kernel: pip install ipykernel"
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # this checkout's csq_jax
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  for k, v in env.items():
    monkeypatch.setenv(k, str(v))
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  texts = []
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    assert not [o for o in cell.outputs if o.output_type == "error"]
    texts.append("".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in cell.outputs))
  return texts, nb


@pytest.mark.slow
def test_quickstart_trains_and_shows_the_report(tmp_path, monkeypatch):
  workdir = tmp_path / "quickstart"
  texts, nb = _execute("quickstart.ipynb", monkeypatch, CSQ_NOTEBOOK_EPOCHS=1, CSQ_NOTEBOOK_FINETUNE_EPOCHS=0,
                       CSQ_NOTEBOOK_WORKDIR=workdir)
  out = "\n".join(texts)
  assert "devices: [CpuDevice(id=0)]" in out
  assert "epoch 1/1 csq: task loss" in out and "exactly quantized: True" in out
  assert "| quickstart | csq | 3 |" in out  # the report's table row
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # per-layer precision, precision during training, accuracy vs compression
  assert (workdir / "summary.json").exists() and (workdir / "report.md").exists()


@pytest.mark.slow
def test_library_api_quantizes_trains_and_ends_exact(monkeypatch):
  texts, _ = _execute("library_api.ipynb", monkeypatch, CSQ_NOTEBOOK_STEPS=60)
  out = "\n".join(texts)
  assert "hidden1/kernel   quantize  8" in out and "out/kernel       fixed     8" in out
  assert "{'hidden1/kernel': 'CSQWeight', 'hidden2/kernel': 'CSQWeight', 'out/kernel': 'STEWeight'}" in out
  assert "average 8.00 bits, compression 4.00x" in out  # before training: every plane selected
  assert "step   59:" in out and "exact: True" in out
