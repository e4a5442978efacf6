"""Every script in docs/examples/ runs, and the README's Python block is docs/examples/quickstart.py
(so the snippet a reader copies is the one the tests run)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.py"))


def test_examples_exist() -> None:
    assert [p.name for p in EXAMPLES] == ["quickstart.py"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path, capsys) -> None:
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "Lipschitz bound" in out and "LMT loss" in out


def test_readme_python_block_is_the_tested_example() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1
    example = (REPO / "docs" / "examples" / "quickstart.py").read_text()
    body = example.split('"""', 2)[2].lstrip("\n")
    assert blocks[0] == body
    # the forward pass comes before the bound in the training step
    assert body.index("logits = model(x)") < body.index("K = bound()")
