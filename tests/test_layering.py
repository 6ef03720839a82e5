"""The package's layers import only downwards (docs/architecture.md): a test walks every import,
function-level ones included, and fails on an upward one."""
import ast
from pathlib import Path

import pyengine

ROOT = Path(pyengine.__file__).parent

# bottom to top; packages on the same level may import each other
LAYERS = [
    ("pyengine._C", "pyengine._native", "pyengine._io", "pyengine.ops"),
    ("pyengine.graph",),
    ("pyengine.nn",),
    ("pyengine.models",),
    ("pyengine.data", "pyengine.train"),
    ("pyengine.methods", "pyengine.report"),
    ("pyengine.cli", "pyengine.__main__", "pyengine"),
]


def _level(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if module == n or module.startswith(n + "."):
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                type_checking.add(id(sub))
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for a in node.names:  # `from pyengine import _native` imports the submodule
                sub = f"{name}.{a.name}"
                rel = Path(*sub.split("."))
                folder = (ROOT.parent / rel).parent
                if (ROOT.parent / rel / "__init__.py").exists() or any(folder.glob(f"{a.name}.*py")) \
                        or any(folder.glob(f"{a.name}.*.so")) or (ROOT.parent / rel).with_suffix(".py").exists():
                    yield node.lineno, sub
                else:
                    yield node.lineno, name


def test_no_upward_imports():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        mine = _level(module)
        assert mine is not None, f"{module} is in no layer: add it to LAYERS"
        tree = ast.parse(path.read_text(), str(path))
        for line, name in _imports(tree, module, path.name == "__init__.py"):
            if not name.startswith("pyengine"):
                continue
            theirs = _level(name)
            if theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_can_fail(tmp_path):
    src = "from pyengine.methods import run\n"
    tree = ast.parse(src)
    found = [name for _, name in _imports(tree, "pyengine.nn.x", False)]
    assert found == ["pyengine.methods"]
    assert _level("pyengine.methods") > _level("pyengine.nn.x")
