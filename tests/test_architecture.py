"""The package's layering, read from the source (every import, also those inside functions): no cycle between its
parts, a pure core, adapters that never import each other, and the doc examples that run."""

from __future__ import annotations

import ast
import doctest
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "k15_plugin"
ADAPTERS = ("k15_plugin.trl", "k15_plugin.verl", "k15_plugin.openrlhf")


def _part(module: str) -> str:
    """The part of the package a module belongs to: ``k15_plugin.<subpackage or module>``."""
    return ".".join(module.split(".")[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "cpu_stubs" in path.parts:  # stand-ins for vllm / flash_attn, run on OpenRLHF's parser path only
            continue
        yield path


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        part = _part(_module_name(path))
        if part == "k15_plugin":
            continue  # the package's own __init__ (lazy names for users)
        targets = {_part(m) for m in _imports(path) if m.startswith("k15_plugin.")}
        graph.setdefault(part, set()).update(t for t in targets if t != part)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_parts_of_the_package_import_each_other_without_a_cycle():
    graph = _graph()
    assert "k15_plugin.core" in graph and "k15_plugin.cli" in graph  # the scan found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, at any depth: ``from package import name`` is an import of the submodule
    ``package.name`` where there is one, else of the package's ``__init__``."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    out.add(f"{source}.{alias.name}")
                elif source in modules:
                    out.add(source)
    return out - {here}


def _module_graph() -> dict[str, set[str]]:
    modules = {_module_name(path) for path in _sources()}
    return {_module_name(path): _module_imports(path, modules) for path in _sources()}


def test_the_modules_import_each_other_without_a_cycle():
    graph = _module_graph()
    assert "k15_plugin.rewards.registry" in graph["k15_plugin.data.jsonl"]  # the scan resolves module names
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_core_imports_torch_and_the_standard_library_only():
    allowed = set(sys.stdlib_module_names) | {"torch", "k15_plugin"}
    for path in (PACKAGE / "core").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in allowed, f"{path.name} imports {name}"
            if top == "k15_plugin":
                assert name.startswith("k15_plugin.core"), f"{path.name} imports {name}"


def test_adapters_never_import_each_other():
    graph = _graph()
    for adapter in ADAPTERS:
        assert not graph.get(adapter, set()) & (set(ADAPTERS) - {adapter}), adapter


@pytest.mark.parametrize(
    "module",
    [
        "k15_plugin.core.settings",
        "k15_plugin.core.optimizer",
        "k15_plugin.core.long2short",
        "k15_plugin.rewards",
        "k15_plugin.rewards.answer",
        "k15_plugin.rewards.code",
        "k15_plugin.rewards.math",
        "k15_plugin.rewards.registry",
        "k15_plugin.errors",
        "k15_plugin.cli.hosts.tree",
        "k15_plugin.data.chain",
    ],
)
def test_the_doc_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_host_option_has_an_entry_in_the_host_table():
    from k15_plugin.cli.hosts import HOSTS, get_host
    from k15_plugin.errors import ConfigError

    options = {p.stem for p in (PACKAGE.parent / "conf" / "host").glob("*.yaml")}
    assert options == set(HOSTS)
    with pytest.raises(ConfigError, match=r"host=ray is not one of \['trl', 'openrlhf', 'verl'\]"):
        get_host("ray")


def test_every_algorithm_option_of_trl_has_a_config_and_a_trainer():
    from k15_plugin.cli.hosts import trl

    options = {p.stem for p in (PACKAGE.parent / "conf" / "algorithm").glob("*.yaml")} - {"ppo"}  # ppo: OpenRLHF
    assert options == set(trl.CONFIGS) == set(trl.trainer_classes())
    for name, trainer in trl.trainer_classes().items():
        assert trainer.__init__.__annotations__["args"] == f"{trl.CONFIGS[name].__name__} | None", name


def _public_definitions(path: Path):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not child.name.startswith(
                "_"
            ):
                yield prefix + child.name, child
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(ast.parse(path.read_text(encoding="utf-8")), "")


def test_every_public_definition_has_a_docstring():
    missing = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in _sources()
        for name, node in _public_definitions(path)
        if not ast.get_docstring(node)
    ]
    assert not missing, missing


def test_the_formatter_has_no_exceptions():
    marked = [str(p.relative_to(PACKAGE.parent)) for p in _sources() if "# fmt: " in p.read_text(encoding="utf-8")]
    assert not marked, marked
