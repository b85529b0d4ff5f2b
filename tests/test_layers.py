"""The layering is a contract: core < data plane < control plane < CLI, and no import cycle
among the project's modules. Every import counts, the ones inside functions and under
TYPE_CHECKING too: a cycle hidden in a function is still two modules that cannot be
understood, tested or changed apart.

    core           orchestrator/core/*      storage, manifest, retention, lease, verify (no Ray, no torch)
    data plane     workers/*                what runs inside each Ray Train worker
    control plane  orchestrator/* (others)  spec, driver, coordinator, API, export, serving
    CLI            orchestrator/cli/*, orchestrator/__main__.py
    harness        harness/*                the tests' and benchmarks' shared helpers (imports any layer;
                                            none of the project's layers imports it)

A layer imports only the layers below it. The control plane reaches into the data plane only
where it hands work to it or builds what it defines, each named below with why; anything
else fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"core": 0, "data": 1, "control": 2, "cli": 3, "harness": 4}
# (importer, imported): the control plane's imports of the data plane, one by one.
ALLOWED_DOWN_INTO_DATA = {
    ("orchestrator.api", "workers.format"): "reading a checkpoint back: the format module only",
    ("orchestrator.api", "workers.task"): "building the user's model from its task (TaskContext)",
    ("orchestrator.export", "workers.task"): "an example input for ONNX/TorchScript (first_val_batch)",
    ("orchestrator.driver", "workers.loop"): "the train loop the driver hands to Ray Train",
    ("orchestrator.driver", "workers.config"): "the WorkerConfig the driver builds for the workers",
    ("orchestrator.ray_compat", "workers.stopping"): "the preemption handler Ray's worker start installs",
    ("orchestrator.preflight", "workers.loop"): "is the task a train function (as the loop tells)",
    ("orchestrator.preflight", "workers.metrics"): "the monitor check before Ray: the task's metric names",
    (
        "orchestrator.preflight",
        "workers.task",
    ): "the monitor check before Ray: the TaskContext it builds with",
    (
        "orchestrator.ray_compat",
        "workers.output",
    ): "the label a rank's own output lines carry (one definition)",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("orchestrator", "workers", "harness"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def layer(module: str) -> str:
    if module.startswith("harness"):
        return "harness"
    if module.startswith("orchestrator.core"):
        return "core"
    if module.startswith("workers"):
        return "data"
    if module.startswith("orchestrator.cli") or module == "orchestrator.__main__":
        return "cli"
    return "control"


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (a package's submodule counts as itself)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_projects_modules():
    graph = imports(modules())
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + "\n  " + "\n  ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
        for c in found
    )


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_each_layer_imports_only_the_layers_below_it():
    graph = imports(modules())
    wrong = []
    for mod, targets in graph.items():
        for target in targets:
            up = LAYERS[layer(target)] > LAYERS[layer(mod)]
            into_data = layer(mod) == "control" and layer(target) == "data"
            if up or (into_data and (mod, target) not in ALLOWED_DOWN_INTO_DATA):
                wrong.append(f"{mod} ({layer(mod)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("pair", sorted(ALLOWED_DOWN_INTO_DATA))
def test_every_named_exception_is_still_needed(pair):
    """An exception that no longer matches an import is stale: take it out of the list."""
    importer, imported = pair
    assert imported in imports(modules())[importer]


def test_the_format_module_imports_nothing_of_the_data_plane():
    assert {m for m in imports(modules())["workers.format"] if layer(m) != "core"} == set()
