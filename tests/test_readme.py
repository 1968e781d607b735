"""The README's quickstart runs as written."""

import pathlib
import re

import numpy as np


def test_quickstart_runs(capsys):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert int(out.cost.nfe) == 50 * 1024
    assert np.isfinite(float(out.log_evidence))
    assert capsys.readouterr().out.strip()
