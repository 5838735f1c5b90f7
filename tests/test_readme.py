"""The README's Python examples run (those that need PyTorch only when it is installed)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    if not os.path.isfile(README):
        return []
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.skipif(not _blocks(), reason="README.md is not here (tests run from a wheel?)")
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in _blocks():
        if "torch" in code:
            torch = pytest.importorskip("torch")
            tnn = torch.nn
            namespace["torch_model"] = tnn.Sequential(
                tnn.Conv2d(1, 16, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(16, 32, 3, padding=1), tnn.ReLU(), tnn.Flatten(),
                tnn.Linear(32 * 4 * 4, 10))
        exec(compile(code, README, "exec"), namespace)
