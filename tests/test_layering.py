"""The import layers hold: ``ops`` depends on nothing of ours, ``patterns`` only on ``ops``, and private torch APIs
are reached through ``fxpasses.compat`` alone (a leaf every layer may import).

Read from the source with ``ast``, so a violation is caught even in a module no test imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPAT = "fxpasses.compat"

# What each layer may import of ours (besides itself and the compat leaf).
ALLOWED = {
    "ops": {"fxpasses.ops"},
    "patterns": {"fxpasses.ops", "fxpasses.patterns"},
}
# Documented entry points that live under a private-looking module name (torch.compiler's docs name them).
PUBLIC_UNDERSCORE = {
    "torch._check", "torch._dynamo.reset", "torch._dynamo.mark_dynamic", "torch._dynamo.maybe_mark_dynamic",
    "torch._dynamo.mark_static", "torch._dynamo.config",
}


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from fxpasses import ops" imports fxpasses.ops, not the package's __init__ alone
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _ours(module: str) -> bool:
    return module == "fxpasses" or module.startswith("fxpasses.")


def _within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(layer):
    bad = []
    for path in _sources(layer):
        for line, module in _imported_modules(ast.parse(path.read_text())):
            if _ours(module) and not _within(module, ALLOWED[layer] | {COMPAT}):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, f"{layer}/ may import only {sorted(ALLOWED[layer])} and {COMPAT}:\n" + "\n".join(bad)


def test_compat_is_a_leaf():
    tree = ast.parse((ROOT / "fxpasses" / "compat.py").read_text())
    ours = [m for _, m in _imported_modules(tree) if _ours(m)]
    assert ours == [], f"fxpasses/compat.py must import nothing of ours, imports {ours}"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _private_torch(name: str) -> bool:
    # torch.ops.<namespace> names graph ops (_c10d_functional.all_reduce is what graphs hold), not an API
    if not name.startswith("torch.") or name.startswith("torch.ops.") or any(name == p or name.startswith(p + ".") for p in PUBLIC_UNDERSCORE):
        return False
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def test_private_torch_apis_only_in_compat():
    bad = []
    for folder in ("ops", "patterns", "fxpasses"):
        for path in _sources(folder):
            if path == ROOT / "fxpasses" / "compat.py":
                continue
            tree = ast.parse(path.read_text())
            names = [(line, m) for line, m in _imported_modules(tree)]
            inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            names += [(n.lineno, _dotted(n)) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in inner]
            for line, name in names:
                if name and _private_torch(name):
                    bad.append(f"{path.relative_to(ROOT)}:{line} uses {name}")
    bad = sorted(set(bad))
    assert not bad, "private torch APIs belong in fxpasses/compat.py:\n" + "\n".join(bad)
