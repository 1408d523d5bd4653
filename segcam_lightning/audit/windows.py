"""explain.py's sliding windows: ``--roi-size`` (on), ``--overlap``, ``--blend``,
``--sw-batch-size`` and ``--window-weights`` checked before anything is written, made into the
:class:`~segcam_lightning.cam.windows.SlidingWindow` every checkpoint's engine runs through.

With windows, a folder's ``.npy`` volumes keep their own size (nothing is resized unless
``--size`` is given) and are read one per batch, since volumes of different sizes cannot share
one; ``--data synthetic3d`` renders its volumes at ``--size`` (default the training size).
Nothing a checkpoint stores says its training patch size (the synthetic 3-D data trains on
whole volumes), so ``--roi-size`` is required to turn windows on.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

from segcam_lightning.audit.settings import AuditSettings, CheckSettings, Windows
from segcam_lightning.cam.windows import SlidingWindow
from segcam_lightning.data.datamodule import SYNTHETIC3D
from segcam_lightning.errors import UsageError

#: Methods ``--window-weights whole`` can pool over the windows (docs/volumes.md).
WHOLE_METHODS = ("gradcam", "xgradcam", "hirescam", "layercam")
#: The option of each :class:`~segcam_lightning.audit.settings.Windows` field.
_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(Windows)}


def overlap_arg(text: str) -> float:
    """``--overlap``'s type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), e.g. 0.5, got {text!r}")
    return value


def sliding_window(settings: AuditSettings, dims: int) -> SlidingWindow | None:
    """The run's windows for inputs of ``dims`` spatial dimensions, ``None`` without
    ``--roi-size``.

    Raises:
        UsageError: for window options without ``--roi-size``, a ``--roi-size`` with another
            number of sides than 1 or ``dims``, ``--window-weights whole`` with a method whose
            weights cannot pool over windows, or quality checks (they run on whole inputs).
    """
    windows = settings.windows
    if windows.roi_size is None:
        given = [_FLAGS[f.name] for f in fields(Windows) if _given(windows, f.name)]
        if given:
            raise UsageError(
                f"{' '.join(given)} set(s) sliding windows, which --roi-size turns on: pass the "
                "training patch size, e.g. --roi-size 96 (no checkpoint stores it)."
            )
        return None
    roi = windows.roi_size
    if len(roi) not in (1, dims):
        raise UsageError(
            f"--roi-size {' '.join(map(str, roi))}: expected one side or {dims} (one per spatial "
            f"dimension), e.g. --roi-size {' '.join(['96'] * dims)}."
        )
    method = settings.explain.method
    if windows.window_weights == "whole" and method not in WHOLE_METHODS:
        raise UsageError(
            f"--window-weights whole pools channel weights over the windows, which {method}'s "
            f"cannot; use --method {' or '.join(WHOLE_METHODS)}, or --window-weights patch."
        )
    checks = [f.name for f in fields(CheckSettings) if _check_on(settings.checks, f.name)]
    if checks:
        flags = " ".join("--" + name.replace("_", "-") for name in checks)
        raise UsageError(
            f"{flags} run(s) the model on whole inputs, not through --roi-size's windows; "
            "audit with windows and the checks in two runs."
        )
    return SlidingWindow(
        roi_size=tuple(roi),
        overlap=windows.overlap,
        mode=windows.blend,
        sw_batch_size=windows.sw_batch_size,
        weights=windows.window_weights,
    )


def _given(windows: Windows, name: str) -> bool:
    default = next(f.default for f in fields(Windows) if f.name == name)
    return getattr(windows, name) != default


_CHECK_SWITCHES = ("sanity_check", "faithfulness", "objects_alone", "explain_errors", "modalities")


def _check_on(checks: CheckSettings, name: str) -> bool:
    return name in _CHECK_SWITCHES and bool(getattr(checks, name))


def window_note(window: SlidingWindow, settings: AuditSettings, piped: bool) -> str:
    """The run's note on its windows (explain.py prints it first; the report lists it)."""
    roi = (
        window.roi_size if isinstance(window.roi_size, int) else "x".join(map(str, window.roi_size))
    )
    if piped:
        inputs = "the data module's inputs as it gives them"
    elif settings.source.data == SYNTHETIC3D:
        inputs = f"synthetic volumes rendered at {settings.inputs.size or 'the training size'}"
    elif settings.inputs.size is None:
        inputs = "volumes from .npy files at their own size, one per batch (--size resizes them)"
    else:
        inputs = f"inputs resized to --size {settings.inputs.size}"
    return (
        f"sliding windows {roi}, overlap {window.overlap:g}, {window.mode} blending, "
        f"{window.weights} weights: {inputs}"
    )
