"""The layering of docs/design.md, checked on the source: each subpackage imports only the layers below
it, through their public names, and reads no private attribute another subpackage defines."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pyquant"

# subpackage -> the subpackages it may import (docs/design.md, "Layers"); top-level pyquant/_*.py modules
# are shared internals every layer may use, and top-level public modules (cli, demo, metrics) sit on top
MAY_IMPORT = {
    "ops": set(),
    "quant": {"ops"},
    "sim": {"ops", "quant"},
    "techniques": {"ops", "quant", "sim"},
    "analysis": {"ops", "quant", "sim", "techniques", "metrics"},
    "autoquant": {"ops", "quant", "sim", "techniques"},
    "viz": {"analysis"},
    "models": {"datasets"},
    "datasets": set(),
}
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).parts
        if len(rel) > 1:
            yield rel[0], path


def _imports(path: Path):
    """(module path inside pyquant as a list, imported names) for each import of pyquant modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = list(path.relative_to(PKG).parts[:-1])
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            mod = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "pyquant":
            mod = node.module.split(".")[1:]
        else:
            continue
        names = [a.name for a in node.names]
        if mod:
            yield mod, names
        else:  # from .. import ops, _version: each name is a module
            for n in names:
                yield [n], []


def test_every_subpackage_has_a_layer():
    assert set(SUBPACKAGES) <= set(MAY_IMPORT), set(SUBPACKAGES) - set(MAY_IMPORT)


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_imports_go_down_the_layers_through_public_names(sub):
    bad = []
    for owner, path in _modules():
        if owner != sub:
            continue
        for mod, names in _imports(path):
            if not mod:
                continue
            target = mod[0]
            if target == owner:
                continue
            if target.startswith("_"):  # a top-level shared internal (pyquant/_*.py)
                continue
            if target in SUBPACKAGES:
                if target not in MAY_IMPORT[owner]:
                    bad.append(f"{path.name} imports {'.'.join(mod)} (layer {target} is not below {owner})")
                private = [m for m in mod[1:] if m.startswith("_")] + [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{path.name} imports private {private} of {target}")
            elif target not in MAY_IMPORT[owner]:
                bad.append(f"{path.name} imports the top-level module {target}")
    assert not bad, bad


def _private_attrs_defined(sub: str) -> set[str]:
    names: set[str] = set()
    for owner, path in _modules():
        if owner == sub:
            text = path.read_text(encoding="utf-8")
            names |= set(re.findall(r"def (_[a-z]\w*)\(self", text))
            names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
    return names


def test_no_private_attribute_of_another_subpackage_is_read():
    defined = {sub: _private_attrs_defined(sub) for sub in SUBPACKAGES}
    bad = []
    for owner, path in _modules():
        own = defined[owner]
        others = set().union(*(v for k, v in defined.items() if k != owner)) - own
        for base, name in re.findall(r"\b(\w+)\.(_[a-z]\w*)\b", path.read_text(encoding="utf-8")):
            if base not in ("self", "cls", "torch", "os", "sys", "pyquant") and name in others:
                bad.append(f"{path.relative_to(PKG)}: {base}.{name}")
    assert not bad, bad


def test_the_design_document_ships_and_the_code_cites_it():
    root = PKG.parent
    assert (root / "docs" / "design.md").is_file()
    stale = [str(p.relative_to(root)) for p in list(PKG.rglob("*.py")) + list((root / "csrc").rglob("*"))
             if p.is_file() and "DESIGN.md" in p.read_text(encoding="utf-8", errors="ignore")]
    assert not stale, f"cite docs/design.md, not DESIGN.md: {stale}"
