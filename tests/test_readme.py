"""The README's library API example runs as written."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_library_api_example_runs_and_reaches_its_budget(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("## Library API"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  script = tmp_path / "example.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  precisions, avg = lines[1].rsplit(" ", 1)
  assert precisions == "{'fc1/kernel': 3}" and float(avg) == 3.0  # the 3-bit target of the example
  assert "fc1/kernel" in lines[2] and "head/kernel" in lines[2]
