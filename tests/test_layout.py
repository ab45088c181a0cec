"""The package's layout holds: each role a folder, imports going downward only, no import circles.

Read from the source (every ``import`` statement, at any depth, lazy ones included), so a
new module is checked by being added. The order (docs/DESIGN.md, "Layout"):
gradstore (no torch) < unlearn's shared modules < recording < evaluation < runs < forgetting < cli.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"unlearn.errors", "unlearn.params", "unlearn.identity"}  # every role may use them (not ``unlearn``: it imports all)
# What each role may import from unlearn besides itself and SHARED; the CLI (and __init__) may import anything.
ALLOWED = {
    "recording": set(),
    "evaluation": set(),
    "runs": {"recording", "evaluation"},
    "forgetting": {"recording", "evaluation", "runs"},
    "integrations": {"recording", "forgetting"},  # other frameworks' hooks (Hugging Face, Lightning) over recording
}
ROLES = tuple(ALLOWED)
FOUR_ROLES = ("recording", "evaluation", "runs", "forgetting")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set:
    """Absolute names of every module this file imports (``from x import y`` counts x, and x.y when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # ``from pkg import module`` imports the module, not the package's other names
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return found


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def source_modules(top: str) -> dict:
    return {module_name(path): path for path in sorted((ROOT / top).rglob("*.py"))}


MODULES = {**source_modules("gradstore"), **source_modules("unlearn")}


def internal_imports(name: str) -> set:
    return {target for target in imports_of(MODULES[name]) if target in MODULES and target != name}


def role_of(name: str):
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROLES else None


def test_unlearn_has_a_folder_per_role_and_no_subpackage_named_like_an_exported_function():
    import unlearn

    folders = {path.name for path in (ROOT / "unlearn").iterdir() if (path / "__init__.py").exists()}
    assert set(FOUR_ROLES) <= folders
    assert not folders & set(unlearn.__all__), "a subpackage would shadow the function unlearn exports"


@pytest.mark.parametrize("name", sorted(name for name in MODULES if role_of(name)))
def test_a_role_imports_only_downward(name):
    role = role_of(name)
    for target in internal_imports(name):
        if not target.startswith("unlearn") or target in SHARED:
            continue
        other = role_of(target) or (target.split(".") + ["unlearn (the package, which imports every role)"])[1]
        assert other == role or other in ALLOWED[role], f"{name} imports {target}: {role} may not import {other}"


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name.startswith("unlearn.")
                                        and name.split(".")[1] in {"errors", "params", "identity"}))
def test_the_shared_modules_import_no_role(name):
    assert not {t for t in internal_imports(name) if t.startswith("unlearn.") and t not in SHARED}, name


def test_gradstore_imports_neither_torch_nor_unlearn():
    for name, path in MODULES.items():
        if name.startswith("gradstore"):
            bad = {t for t in imports_of(path) if t.split(".")[0] in {"torch", "unlearn"}}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_circle():
    """Between modules (a package's __init__ re-exporting its own modules is not a circle)."""
    graph = {name: {t for t in internal_imports(name) if not (t.startswith(name + ".") or name.startswith(t + "."))}
             for name in MODULES}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                if not all(MODULES[m].name == "__init__.py" for m in cycle[:-1]):
                    raise AssertionError("import circle: " + " -> ".join(cycle))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
