"""docs/ARCHITECTURE.md states a layering rule and a map of the tree; these tests hold the code to both.

The layer table (between ``<!-- layers:begin -->`` and ``<!-- layers:end -->``) gives each top-level module or
package of flm_rt a layer; a module may import only modules of its own layer or below (imports inside functions
count too). The "Who owns what" table must name every module file of the package, and every path it names must
exist.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PKG = ROOT / "flm_rt"


def _layers() -> dict:
    text = DOC.read_text()
    block = text[text.index("<!-- layers:begin -->"):text.index("<!-- layers:end -->")]
    layers = {}
    for line in block.splitlines():
        m = re.match(r"\|\s*(\d+)\s[^|]*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([^`]+)`", m.group(2)):
                assert name not in layers, f"{name} is in two layers"
                layers[name] = int(m.group(1))
    return layers


def _modules() -> dict:
    """dotted module name (relative to flm_rt; "" for the package itself) -> file."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _top(name: str) -> str:
    return name.split(".")[0] if name else "flm_rt"


def _imports(mod: str, path: Path, modules: dict) -> set:
    """The flm_rt modules that ``mod`` imports (resolved relative imports; ``from . import x`` counts as module x
    when x is a module, else as the package)."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".") if pkg else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "flm_rt" or node.module.startswith("flm_rt.")):
                target = node.module[len("flm_rt."):] if node.module != "flm_rt" else ""
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in modules or sub == "_C" else target)  # _C: the compiled extension
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "flm_rt" or alias.name.startswith("flm_rt."):
                    found.add(alias.name[len("flm_rt."):] if alias.name != "flm_rt" else "")
    return found


def test_the_layer_table_names_every_module_once():
    layers, modules = _layers(), _modules()
    tops = {_top(m) for m in modules if _top(m) != "_C"}
    assert set(layers) == tops, (f"in the tree, not in the table: {sorted(tops - set(layers))}; "
                                 f"in the table, not in the tree: {sorted(set(layers) - tops)}")


def test_no_module_imports_a_higher_layer():
    layers, modules = _layers(), _modules()
    bad = []
    for mod, path in modules.items():
        own = layers[_top(mod)]
        for target in _imports(mod, path, modules):
            top = _top(target)
            if top == "_C":  # the compiled extension: loaded by _ext (layer 1) only
                assert _top(mod) == "_ext", f"{mod} imports flm_rt._C directly"
                continue
            assert top in layers, f"{mod} imports {target!r}, which is not in the layer table"
            if layers[top] > own:
                bad.append(f"{mod or 'flm_rt'} (layer {own}) imports {target or 'flm_rt'} (layer {layers[top]})")
    assert not bad, "imports against the layering rule:\n" + "\n".join(bad)


def test_the_owner_table_matches_the_tree():
    text = DOC.read_text()
    owners = text[text.index("## Who owns what"):text.index("## Data flow")]
    named = set(re.findall(r"^\| `([^`]+)`", owners, flags=re.M))
    named |= set(re.findall(r"^\| `[^`]+`, `([^`]+)`", owners, flags=re.M))
    missing = [p for p in named if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"
    unnamed = [str(f.relative_to(ROOT)) for f in sorted(PKG.rglob("*.py"))
               if f.name != "__init__.py" and str(f.relative_to(ROOT)) not in named]
    assert not unnamed, f"module files missing from ARCHITECTURE.md's owner table: {unnamed}"


@pytest.mark.parametrize("source,expected", [
    ("from . import ops\n", {"ops"}),
    ("from .exporting.writer import export\n", {"exporting.writer"}),
    ("from .. import cli_args\n", {"cli_args"}),
    ("import flm_rt.api\n", {"api"}),
])
def test_import_resolution(tmp_path, source, expected):
    """The resolver the rule relies on (a module in flm_rt/exporting/ for the `..` case)."""
    modules = _modules()
    path = tmp_path / "x.py"
    path.write_text(source)
    mod = "exporting.x" if source.startswith("from ..") else "x"
    assert _imports(mod, path, modules) == expected
