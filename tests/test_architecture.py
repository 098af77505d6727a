"""The import rules of docs/architecture.md: the core never imports a plug-in, and each core package imports
only the packages below it."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import denserc

CORE = Path(denserc.__file__).parent
ARCHITECTURE = CORE.parents[1] / "docs" / "architecture.md"


def allowed_imports() -> dict[str, set[str]]:
    """What each part of the core may import of the core: the table "What may import what" of
    docs/architecture.md, the one place the rules are written."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split("## What may import what")[1].split("\n## ")[0]
    rules = {}
    for line in section.splitlines():
        if not line.startswith("| `"):  # the header, and "any package's `__init__`" (the lazy rule below)
            continue
        part_cell, allowed_cell = [cell.strip() for cell in line.strip().strip("|").split("|")[:2]]
        parts = re.findall(r"`([^`]+)`", part_cell)
        parts = ["__init__"] if parts == ["denserc", "__init__"] else parts
        for part in parts:
            rules[part] = set(re.findall(r"`([^`]+)`", allowed_cell))
    return rules


ALLOWED = allowed_imports()


def core_imports(path: Path) -> set[str]:
    """The top-level parts of ``denserc`` (or other packages named denserc*) a core module imports."""
    package = list(path.relative_to(CORE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            found |= {target[0]} if target else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("denserc"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("denserc")}
    return found


def test_each_core_package_imports_only_what_the_architecture_allows():
    checked = 0
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE)
        part = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        assert part in ALLOWED, f"{relative}: {part!r} has no import rule; add it to docs/architecture.md and ALLOWED"
        imported = core_imports(path) - {part} - ({"lazy"} if path.name == "__init__.py" else set())
        assert imported <= ALLOWED[part], f"{relative} imports {sorted(imported - ALLOWED[part])}"
        checked += 1
    assert checked > 40  # every module of the core was read


def test_the_rule_checker_reads_relative_imports_at_every_depth():
    assert core_imports(CORE / "eval" / "cli.py") == {"distributed", "eval", "io", "models", "reports"}
    assert core_imports(CORE / "models" / "factory.py") == {"models", "plugins"}
    assert core_imports(CORE / "cli.py") == {"__version__", "plugins"}


@pytest.mark.slow
def test_import_denserc_and_every_core_module_import_no_plugin():
    """A fresh interpreter: `import denserc`, then every module of the core, and no plug-in module is loaded."""
    code = "\n".join([
        "import importlib, pkgutil, sys",
        "import denserc",
        "assert not any(m.startswith('denserc_testbed') for m in sys.modules), 'import denserc loaded the testbed'",
        "core = [m.name for m in pkgutil.walk_packages(denserc.__path__, 'denserc.') if m.name != 'denserc.__main__']",
        "for name in core:",
        "    importlib.import_module(name)",
        "assert 'denserc.viz.cli' in sys.modules and 'denserc.train.trainer' in sys.modules",
        "print(sorted(m for m in sys.modules if m.startswith('denserc_testbed')))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


TOWER_INTERNALS = {"resblocks", "trunk", "in_proj_weight", "MultiheadAttention", "transformer"}


def test_no_module_outside_models_reaches_into_a_tower():
    """Detection, CAT-Seg, the testbed and the rest ask the ``Tower`` adapters (docs/architecture.md, one home
    per idea); an attribute access such as ``visual.transformer.resblocks`` outside ``models/`` is a bug for
    the families that do not have it (EVA, SigLIP)."""
    offenders = []
    for root in (CORE, CORE.parent / "denserc_testbed"):
        for path in sorted(root.rglob("*.py")):
            if path.is_relative_to(CORE / "models"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
                if name in TOWER_INTERNALS:
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno} .{name}")
    assert not offenders, offenders


def test_the_rules_are_read_from_the_architecture_page():
    assert ALLOWED["models"] == {"io", "plugins"} and ALLOWED["io"] == set() and ALLOWED["__main__"] == {"cli"}
    assert ALLOWED["__init__"] == {"models", "viz"} and "__version__" in ALLOWED["eval"]
    assert len(ALLOWED) >= 16
