"""The package's import graph: layers that import only downward, no cycles, no hidden dependencies.

    core       posttrain/*.py, posttrain/data/ (config, data, learner and groups, checkpoints, metrics,
               builders, the stage runtime)
    inputs     rewards/ (rewards and verifiers), synthetic/ (tiny models and tasks, found by name)
    rollout    rollout/ (engines, weight sync, episodes, evaluation: it scores with the rewards)
    stages     sft/, distill/, rl/
    top        posttrain/pipeline/, posttrain/cli.py, posttrain/__main__.py

A module may import its own layer's modules and lower layers'; a stage never imports another stage (only
the top layer links stages), and rewards and synthetic never import each other. Function-local imports of
our own modules are allowed only where they defer a heavy library (listed in DEFERRED, with the reason),
never to hide a dependency or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "rewards": "inputs",
    "synthetic": "inputs",
    "rollout": "rollout",
    "sft": "stages",
    "distill": "stages",
    "rl": "stages",
}
RANK = {"core": 0, "inputs": 1, "rollout": 2, "stages": 3, "top": 4}
SIBLINGS_APART = ("inputs", "stages")
DEFERRED = {
    (
        "posttrain.cli",
        "posttrain.pipeline.driver",
    ): "the stages import torch: `posttrain --help` stays instant",
    (
        "posttrain.cli",
        "posttrain.pipeline.stages",
    ): "the stages import torch: `posttrain --help` stays instant",
    ("posttrain.learner", "posttrain.ds_checkpoint"): "imports deepspeed at module level: actors only",
    (
        "posttrain.learner",
        "posttrain.gpu_sender",
    ): "imports torch and vllm at module level: ipc / nccl senders only",
}


def module_files() -> dict[str, Path]:
    files = {}
    for folder in ("", "pipeline", "data"):
        for path in sorted((ROOT / "posttrain" / folder).glob("*.py")):
            files[module_name(path.relative_to(ROOT / "posttrain"), "posttrain")] = path
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            files[module_name(path.relative_to(ROOT / package), f"posttrain.{package}")] = path
    return files


def module_name(relative: Path, prefix: str) -> str:
    parts = [prefix, *relative.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in PACKAGES:
        return PACKAGES[parts[1]]
    if len(parts) > 1 and parts[1] in ("pipeline", "cli", "__main__"):
        return "top"
    return "core"


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported posttrain module, whether the import sits inside a function) for every import."""
    tree = ast.parse(path.read_text())
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
    }
    type_only = {
        id(n)
        for i in ast.walk(tree)
        if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
        for n in ast.walk(i)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from package import submodule` depends on the submodule, the rest on the module itself
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = submodules if len(submodules) == len(node.names) else [node.module, *submodules]
        out += [(name, id(node) in local) for name in names if name in known]
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    files = module_files()
    edges: dict[str, set[str]] = {m: set() for m in files}
    deferred = []
    for module, path in files.items():
        for target, inside_function in imports(path, set(files)):
            if target != module:
                edges[module].add(target)
                if inside_function:
                    deferred.append((module, target))
    return edges, deferred


def test_layers_import_only_downward() -> None:
    edges, _ = graph()
    upward = [
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, targets in edges.items()
        for b in targets
        if RANK[layer(b)] > RANK[layer(a)]
        or (layer(a) == layer(b) in SIBLINGS_APART and a.split(".")[1] != b.split(".")[1])
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    edges, _ = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


def test_function_local_imports_of_our_modules_only_defer_heavy_libraries() -> None:
    _, deferred = graph()
    hidden = sorted({f"{a} → {b}" for a, b in deferred if (a, b) not in DEFERRED})
    assert not hidden, "\n".join(hidden)
