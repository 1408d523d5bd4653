"""The code's shape: no function over 80 lines, no class over 400, few public names.

Declarative tables (explain.py's option table, the callbacks' table of moved arguments) are
module-level data, not function bodies, so the rule leaves them alone by construction.
"""

import ast
from pathlib import Path

import segcam_lightning

PACKAGE = Path(segcam_lightning.__file__).resolve().parent
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 400


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``("path:line name", lines)`` of every function (methods and nested ones included)
    under ``root`` longer than ``limit`` lines, decorators and docstrings counted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > limit:
                    where = path.relative_to(root.parent)
                    found.append((f"{where}:{node.lineno} {node.name}", size))
    return found


def long_classes(root: Path, limit: int = MAX_CLASS_LINES) -> list[tuple[str, int]]:
    """``("path:line name", lines)`` of every class under ``root`` longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > limit:
                    found.append(
                        (f"{path.relative_to(root.parent)}:{node.lineno} {node.name}", size)
                    )
    return found


def test_no_function_over_80_lines():
    assert long_functions(PACKAGE) == []


def test_no_class_over_400_lines():
    assert long_classes(PACKAGE) == []


def test_the_class_counter_finds_long_classes(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(400))
    (tmp_path / "m.py").write_text(f"class Short:\n    pass\n\n\nclass Long:\n{body}\n")
    assert long_classes(tmp_path) == [(f"{tmp_path.name}/m.py:5 Long", 401)]


def test_the_public_names_stay_few():
    """The top level exports the callbacks and their settings, the engine and its result, the
    readout, the batch adapter, the data and the module; the engine two dozen names at most. Its
    functional modules are imported as modules (``from segcam_lightning.cam import functional``)."""
    import segcam_lightning
    import segcam_lightning.callbacks
    import segcam_lightning.cam

    assert sorted(segcam_lightning.__all__) == [
        "BatchAdapter",
        "CAMEngine",
        "CAMResult",
        "DisplaySpec",
        "GradCAMCallback",
        "ModalityMonitor",
        "ProbeSpec",
        "Readout",
        "SegmentationDataModule",
        "SegmentationModule",
        "ShortcutMonitor",
    ]
    assert len(segcam_lightning.cam.__all__) <= 24
    assert "functional" in segcam_lightning.cam.__all__
    functional = {"class_regions", "predicted_masks", "normalize_cams", "resolve_output_kind"}
    assert not functional & set(segcam_lightning.cam.__all__)
    assert sorted(segcam_lightning.callbacks.__all__) == [
        "DisplaySpec",
        "GradCAMCallback",
        "ModalityMonitor",
        "ProbeSpec",
        "ShortcutMonitor",
    ]
    for name in segcam_lightning.__all__:
        assert getattr(segcam_lightning, name) is not None


def test_the_callback_takes_at_most_14_arguments():
    import inspect

    from segcam_lightning.callbacks import GradCAMCallback

    named = [
        p
        for p in inspect.signature(GradCAMCallback.__init__).parameters.values()
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert len(named) <= 14, [p.name for p in named]


def test_the_counter_finds_long_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == [(f"{tmp_path.name}/m.py:5 long", 81)]
