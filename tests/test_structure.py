"""The package's structure, as DESIGN.md and the README's "How it works" state it: imports run
one way (public modules -> core -> backends -> kernels) with no cycle, and a steady-state call
runs code in its public module, the core and one backend only."""

import ast
import math
import pathlib
import sys

import pytest
import torch

import tritonclip
from helpers import params_with, random_grads

ROOT = pathlib.Path(tritonclip.__file__).parent
KERNELS = ROOT.parent / "kernels"
# Layers, top down; a module may import modules of its own layer or below.
LAYERS = {
    "_core": 2, "_layout": 3, "_triton_backend": 4, "_torch_backend": 4, "_backend": 5,
    "_normmath": 5, "_sharding": 5, "distributed": 5, "kernels": 6,
}
PUBLIC = 1


def _imports(path: pathlib.Path) -> set[str]:
    """The tritonclip modules ``path`` imports (relative imports, by first component)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("tritonclip"):
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("tritonclip."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in ROOT.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules or m == "kernels"}
            for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            pytest.fail(f"import cycle: {' -> '.join(path + [node])}")
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in graph[node]:
            visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_imports_run_one_way():
    graph = _graph()
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if LAYERS.get(b, PUBLIC) < LAYERS.get(a, PUBLIC)]
    assert upward == []


def test_negative_control_an_upward_import_is_seen():
    graph = _graph()
    graph["_triton_backend"] = graph["_triton_backend"] | {"_core"}
    assert any(LAYERS.get(b, PUBLIC) < LAYERS.get(a, PUBLIC)
               for a, targets in graph.items() for b in targets)


def test_kernels_import_only_torch_triton_and_themselves():
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and node.level == 0 else [])
            for name in names:
                assert not name.startswith(("tritonclip", "torch.distributed")), (path, name)


def _modules_run(fn) -> list[str]:
    """The modules of tritonclip/ (kernels/ aside) whose code runs during ``fn()``."""
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            path = pathlib.Path(frame.f_code.co_filename)
            if path.parent == ROOT and path.stem not in seen:
                seen.append(path.stem)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.interpreter
def test_a_steady_state_call_runs_in_three_modules():
    params = params_with(random_grads([1000, 300, 70], torch.float32))
    grads = [p.grad for p in params]
    inv_scale = torch.tensor([0.5])
    calls = {
        "clip_grad": [lambda: tritonclip.clip_grad_norm_(params, 0.1, backend="triton"),
                      lambda: tritonclip.clip_grad_norm_(params, 0.1, math.inf, backend="triton"),
                      lambda: tritonclip.get_total_norm(grads, backend="triton"),
                      lambda: tritonclip.clip_grad_value_(params, 0.01, backend="triton")],
        "amp": [lambda: tritonclip.amp.unscale_and_clip_grads_(grads, inv_scale, 0.1,
                                                               backend="triton")],
    }
    for public, fns in calls.items():
        for fn in fns:
            fn()  # builds the layout and the plan
            assert _modules_run(fn) == [public, "_core", "_triton_backend"]


def test_negative_control_a_first_call_runs_more_modules():
    grads = random_grads([10, 20], torch.float32)
    assert "_layout" in _modules_run(lambda: tritonclip.get_total_norm(grads))
