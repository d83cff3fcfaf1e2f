"""The package's shape: imports point one way (no cycles), and none hides inside a function to dodge one."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "llama_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The llama_jax modules one import statement names (``from llama_jax import x`` names llama_jax.x when x is a
    module, else llama_jax itself)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "llama_jax"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "llama_jax":
        return []
    names = []
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        names.append(candidate if candidate in MODULES else target)
    return names


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _scan(module: str, source: str, is_package: bool = False) -> tuple[set[str], list[tuple[int, str]]]:
    """(llama_jax modules imported at module level, (line, module) of those imported inside functions)."""
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    top, hidden = set(), []
    for node in ast.walk(tree):
        for target in _imported(node, module, is_package):
            if id(node) in inside:
                hidden.append((node.lineno, target))
            elif target != module:
                top.add(target)
    return top, hidden


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> llama_jax modules it imports at module level, imports found inside functions)."""
    edges, hidden = {}, []
    for module, path in MODULES.items():
        top, inside = _scan(module, path.read_text(), path.name == "__init__.py")
        edges[module] = top & set(MODULES)
        hidden += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}" for line, target in inside]
    return edges, hidden


def test_no_llama_jax_import_inside_a_function():
    _, hidden = _graph()
    assert not hidden, "\n".join(hidden)


def test_module_graph_is_acyclic():
    edges, _ = _graph()
    # A package's __init__ may re-export its own submodules; that is the package's face, not a dependency.
    for module in edges:
        if MODULES[module].name == "__init__.py":
            edges[module] = {t for t in edges[module] if not t.startswith(module + ".")}
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("low,high", [("llama_jax.sharding", "llama_jax.model"), ("llama_jax.ops.attention",
                                                                                  "llama_jax.model"),
                                      ("llama_jax.formats.hf", "llama_jax.checkpoint"),
                                      ("llama_jax.model", "llama_jax.train.step")])
def test_lower_layers_do_not_know_higher_ones(low, high):
    edges, _ = _graph()
    seen, todo = set(), [low]
    while todo:  # everything `low` depends on, transitively
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    assert high not in seen, f"{low} depends on {high}"


def test_the_checker_sees_a_hidden_import():
    """The checks can fail: a function-level import is reported, a module-level one is an edge."""
    source = "import os\nfrom llama_jax import model\n\ndef f():\n    from llama_jax import checkpoint\n"
    assert _scan("llama_jax.x", source) == ({"llama_jax.model"}, [(5, "llama_jax.checkpoint")])
