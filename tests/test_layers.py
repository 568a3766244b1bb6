"""The package's layers, as its imports draw them (docs/design.md, "Layers").

Read from the source with ``ast``, so every import counts: at module level, under
``TYPE_CHECKING``, and inside functions (which must not exist: a function-local import
is how a cycle hides).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import triode

PACKAGE = Path(triode.__file__).parent

#: Rank of each layer: a module imports only from lower ranks, or from its own part.
SHARED = 0  # errors, version, model, proto, chunks, concurrency, procgroup
WIRE = 1
CORE = 2  # storage, engine, tools, sched: none imports another
CLIENT = 3  # on the wire and the shared layer only
NODE = 4
TOP = 5  # the package's face, the CLI, the test helpers

CORE_PARTS = ("storage", "engine", "tools", "sched")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _ours(module: str) -> bool:
    return module == "triode" or module.startswith("triode.")


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not _ours(target):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def imports_of(module: str) -> tuple[set[str], list[str]]:
    """The triode modules ``module`` imports, and the function-local imports it has."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    local: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_function = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, node, path.name == "__init__.py")
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if _ours(a.name)]
        if targets and id(node) in in_function:
            local.append(f"{module}:{node.lineno}")
        found.update(t for t in targets if t != module)
    return found, local


def rank(module: str) -> int:
    parts = module.split(".")
    if module in ("triode", "triode.__main__", "triode.testing") or parts[1:2] == ["cli"]:
        return TOP
    head = parts[1]
    if head in ("errors", "version", "model", "proto", "chunks", "concurrency", "procgroup"):
        return SHARED
    if head == "wire":
        return WIRE
    if head in CORE_PARTS:
        return CORE
    if head == "client":
        return CLIENT
    if head == "node":
        return NODE
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py and docs/design.md")


def _group(module: str) -> str:
    """The unit a module may import freely within: its part, or its layer's package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


GRAPH = {m: imports_of(m)[0] for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        rank(module)


def test_imports_point_down_only() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            if target == "triode" and rank(module) == TOP:
                continue
            same_unit = _group(target) == _group(module)
            if same_unit:
                continue
            if rank(target) >= rank(module) and not (rank(module) == rank(target) in (SHARED, TOP)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point sideways or up a layer:\n" + "\n".join(sorted(wrong))


def test_no_core_part_imports_another() -> None:
    wrong = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if rank(m) == CORE and rank(t) == CORE and _group(m) != _group(t)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        seen[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if seen.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in seen:
                visit(target)
        stack.pop()
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module)


def test_no_function_local_imports() -> None:
    local = [where for m in MODULES for where in imports_of(m)[1]]
    assert not local, "imports inside functions (import at the top; a cycle means a layer is wrong):\n" + (
        "\n".join(local)
    )


def test_the_codec_imports_alone() -> None:
    """The sans-I/O codec loads neither trio nor the node, the client or a part."""
    code = (
        "import sys, triode.wire.codec\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'trio' or m.startswith(('triode', 'trio.')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(loaded.stdout.split())
    alone = {"triode", "triode.errors", "triode.version", "triode.wire", "triode.wire.codec"}
    assert modules <= alone, f"importing the codec loaded {sorted(modules - alone)}"


def test_public_names_load_on_first_use() -> None:
    from triode import Action, Client, Digest, Node, connect, open_node

    assert Action.__module__ == "triode.model.action"
    assert Digest.__module__ == "triode.model.digest"
    assert {Client.__name__, Node.__name__, connect.__name__, open_node.__name__} == {
        "Client", "Node", "connect", "open_node",
    }
    assert set(triode.__all__) <= set(dir(triode))
    with pytest.raises(AttributeError):
        triode.no_such_name  # noqa: B018


def test_every_package_is_installed() -> None:
    """pyproject.toml lists the packages (so the benchmarks install as triode_benchmarks):
    a new package of triode must be listed there too, or an install leaves it out."""
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, f"add to pyproject.toml's packages: {sorted(packages - listed)}"
    assert "benchmarks" not in listed
    assert config["tool"]["setuptools"]["package-dir"] == {"triode_benchmarks": "benchmarks"}
