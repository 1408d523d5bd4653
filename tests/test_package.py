"""Package-level promises: the layering of docs/architecture.md, read from the source."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import segcam_lightning

PACKAGE = Path(segcam_lightning.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports() -> dict[str, set[str]]:
    """Each package module's imports of other package modules: top-level, in functions and
    under ``if TYPE_CHECKING:`` (a cycle of types is still two modules that need each other)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_package_modules():
    # A package imports its own submodules from __init__; those edges are not cycles of code.
    graph = {
        name: {t for t in targets if not name.startswith(f"{t}.")}
        for name, targets in internal_imports().items()
    }
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_reach_follows_imports_through_modules():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == {"a", "b", "c"}
    assert reachable({"a": set(), "b": {"a"}}, "a") == set()


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through other package modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


#: The package's layers, bottom up: a module imports its own layer's and lower layers' only.
LAYERS = (
    ("", "cam"),  # the engine (and the package's lazy top level)
    (
        "errors",
        "text",
        "paths",
        "metrics",
        "networks",
        "models",
        "losses",
        "data",
        "render",
        "overlays",
    ),
    ("quality",),
    ("module", "callbacks", "loading"),
    ("cli", "audit"),
)


def layer_of(module: str) -> int:
    """The layer of ``segcam_lightning.<part>...``."""
    part = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_layering():
    graph = internal_imports()
    assert {layer_of(n) for n in graph} <= set(range(len(LAYERS))), "a module in no layer"
    upward = [(n, t) for n, targets in graph.items() for t in targets if layer_of(t) > layer_of(n)]
    assert upward == []
    engine = {n: t for n, t in graph.items() if n.startswith("segcam_lightning.cam")}
    assert all(t.startswith("segcam_lightning.cam") for targets in engine.values() for t in targets)
    # Directly or through other modules: the callbacks need neither the LightningModule nor the
    # audit; loading/ (checkpoints, user code) needs neither the audit nor the callbacks.
    rules = {
        "segcam_lightning.callbacks": ("segcam_lightning.module", "segcam_lightning.audit"),
        "segcam_lightning.loading": ("segcam_lightning.audit", "segcam_lightning.callbacks"),
    }
    for start, forbidden in rules.items():
        for name in [n for n in graph if n == start or n.startswith(f"{start}.")]:
            reached = {t for t in reachable(graph, name) if t.startswith(forbidden)}
            assert not reached, (name, reached)


def test_the_layer_rule_sees_an_upward_import():
    assert layer_of("segcam_lightning.cam.engine") < layer_of("segcam_lightning.callbacks.probe")
    assert layer_of("segcam_lightning") == 0
    with pytest.raises(StopIteration):
        layer_of("segcam_lightning.somewhere_new")


def test_engine_imports_neither_lightning_nor_cv2():
    code = (
        "import sys, segcam_lightning.cam;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'cv2') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_exports_are_the_package_objects():
    import segcam_lightning as package
    from segcam_lightning import (
        BatchAdapter,
        GradCAMCallback,
        SegmentationDataModule,
        SegmentationModule,
    )
    from segcam_lightning.callbacks import GradCAMCallback as Callback
    from segcam_lightning.data.batch import BatchAdapter as Adapter
    from segcam_lightning.data.datamodule import SegmentationDataModule as DataModule
    from segcam_lightning.module import SegmentationModule as Module

    assert (BatchAdapter, GradCAMCallback, SegmentationDataModule, SegmentationModule) == (
        Adapter,
        Callback,
        DataModule,
        Module,
    )
    assert all(hasattr(package, name) for name in package.__all__)
