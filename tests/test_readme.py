"""Every Python example in the README runs as written (torch examples only where torch is installed)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "import torch" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    monkeypatch.chdir(tmp_path)  # examples may write files (cov.npy)
    namespace: dict = {}
    exec(compile(code, f"README.md example {index}", "exec"), namespace)
    if "est" in namespace and "k" in namespace:  # the opening example: one whitened step is exact
        assert namespace["est"].n_iter == 1
        assert abs(namespace["est"].kernel - namespace["k"]).max() < 1e-8
