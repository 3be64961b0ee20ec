"""The Python snippets of the README and docs run, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_there_are_snippets():
    assert sum(len(BLOCK.findall(f.read_text())) for f in FILES) >= 5


@pytest.mark.parametrize("path", [f for f in FILES if BLOCK.search(f.read_text())],
                         ids=lambda p: p.name)
def test_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for k, code in enumerate(BLOCK.findall(path.read_text())):
        try:
            exec(compile(code, f"{path.name}[block {k}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name} block {k} failed: {err!r}\n{code}") from err
