"""Lower layers never import higher ones (checked on the source, statically)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tnlm"
ALLOWED = {
    "core": {"tnlm.core", "tnlm._compat"},
    "bridge": {"tnlm.core", "tnlm._compat", "tnlm.bridge"},
    "analysis": {"tnlm.core", "tnlm._compat", "tnlm.analysis"},
    "integration": {"tnlm.core", "tnlm._compat", "tnlm.bridge", "tnlm.integration"},
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tnlm"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tnlm")}
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer):
    for path in (PKG / layer).glob("*.py"):
        for mod in imports(path):
            assert any(mod == a or mod.startswith(a + ".") for a in ALLOWED[layer]), \
                f"{path.relative_to(PKG.parent)} imports {mod}"
