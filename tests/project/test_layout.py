"""The package's shape: imports point one way (no cycles), and none hides inside a function to dodge one; no module
is longer than a reader can hold; one vocabulary ("stage" is a training stage, "pipeline" pipeline parallelism)."""

import ast
import re
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
    assert not _depends_on(seen, high), f"{low} depends on {high}"


def _depends_on(modules: set[str], package: str) -> bool:
    """Whether ``modules`` holds ``package`` or one of its submodules (``llama_jax.checkpoint.any_format``)."""
    return any(m == package or m.startswith(package + ".") for m in modules)


def test_a_dependency_on_a_submodule_counts():
    assert _depends_on({"llama_jax.config", "llama_jax.checkpoint.any_format"}, "llama_jax.checkpoint")
    assert not _depends_on({"llama_jax.checkpointing"}, "llama_jax.checkpoint")


def test_the_checker_sees_a_hidden_import():
    """The checks can fail: a function-level import is reported, a module-level one is an edge."""
    source = "import os\nfrom llama_jax import model\n\ndef f():\n    from llama_jax import checkpoint\n"
    assert _scan("llama_jax.x", source) == ({"llama_jax.model"}, [(5, "llama_jax.checkpoint")])


MAX_LINES = 500


def test_no_module_is_longer_than_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# "stage" means a training stage (config.stage, train.step.Stage, a checkpoint's "stage") and nothing else: the mesh
# axis and its ranks are "pipeline", the long-context extension's steps are phases. Each pattern is one way the old
# senses were written. ("pipeline" means pipeline parallelism: the data package's batches are not a pipeline.)
OTHER_SENSES = {
    "a mesh spec naming a stage axis": r"\bstage\s*=\s*(-?\d|\{)",
    "a mesh size looked up as stage": r"(shape|sizes|mesh)\w*\[\s*['\"]stage['\"]\s*\]",
    "a collective or spec over a stage axis": r"\b(PartitionSpec|P|axis_index|ppermute|axis_names)\b.*['\"]stage['\"]",
    "a rule mapping layers to stage": r"['\"]layers['\"]\s*(,|->)\s*['\"]?stage\b",
    "the stage axis or ring in prose": r"\bstage\s+(axis|ring|0|s)\b|``stage``|`stage`",
    "a pipeline or long-context stage": r"\b(pipeline|long[- ]context|context[- ]extension)\s+stages?\b|\d+-stage\b",
    "a data or batch pipeline": r"\b(data|batch|grain)\s+pipeline\b",
}


def _other_senses(text: str) -> list[str]:
    """``line: what it says`` for each line of ``text`` that uses "stage" or "pipeline" in another sense."""
    return [f"{number}: {what}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            for what, pattern in OTHER_SENSES.items() if re.search(pattern, line, re.IGNORECASE)]


def test_stage_means_a_training_stage_and_pipeline_pipeline_parallelism():
    found = [f"{path.relative_to(PACKAGE.parent)}:{hit}" for path in MODULES.values()
             for hit in _other_senses(path.read_text())]
    assert not found, "\n".join(found)
    assert not [m for m in MODULES if m.endswith(".pipeline") and m != "llama_jax.parallel.pipeline"]


@pytest.mark.parametrize("line", [
    'mesh = sharding.make_mesh("stage=4,fsdp=2")', 'raise ConfigError(f"the mesh has stage={n}")',
    'ranks = mesh.shape["stage"]', 'jax.lax.ppermute(y, "stage", ring)', 'PartitionSpec("stage")',
    '("layers", "stage"),', "over the mesh's ``stage`` axis", "one layer per pipeline stage",
    "each long-context stage", "the 405B 16-stage circular pipeline", "the resumable batch pipeline",
])
def test_the_vocabulary_check_sees_another_sense(line):
    assert _other_senses(line)


@pytest.mark.parametrize("line", [
    'c.stage = "pretrain"', "class Stage:", 'save(step, params=p, cfg=cfg, stage="sft")', "stage=stage, params=start",
    'metadata.get("stage")', "the reward stage", 'RENAMED_AXES = {"stage": "pipeline"}', "num_stages=2",
    'sharding.make_mesh("pipeline=4,fsdp=2")', "configs/<stage>/<name>.py", "each post-training stage",
])
def test_the_vocabulary_check_leaves_training_stages_alone(line):
    assert not _other_senses(line)
