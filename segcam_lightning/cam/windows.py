"""Sliding-window settings as one value: what explain.py's ``--roi-size`` options and the
callbacks' ``ProbeSpec(window=...)`` carry to :func:`~segcam_lightning.cam.sliding_window_cams`.

:class:`SlidingWindow` is a small frozen dataclass (LightningCLI and YAML fill it as a nested
mapping); :func:`explain` runs an engine on a whole input, or through the windows when one is
given, so a caller has one call either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from segcam_lightning.cam.engine import CAMEngine, CAMResult
from segcam_lightning.cam.sliding import BLEND_MODES, WEIGHTS, sliding_window_cams

__all__ = ["SlidingWindow", "explain"]


@dataclass(frozen=True)
class SlidingWindow:
    """How an input larger than the training patches is explained: window by window, as
    MONAI's ``sliding_window_inference`` predicts (docs/volumes.md, "Sliding windows").

    Attributes:
        roi_size: the window (patch) size: one side for every spatial dimension, or one per
            dimension, e.g. ``96`` or ``(96, 96, 64)``.
        overlap: fraction of a window shared with the next, in ``[0, 1)``.
        mode: how overlapping windows are blended: ``"constant"`` or ``"gaussian"``.
        sw_batch_size: windows per engine call.
        weights: ``"patch"`` (each window's own maps, blended) or ``"whole"`` (the maps of the
            stitched score; Grad-CAM, XGrad-CAM, HiResCAM and LayerCAM only).

    Example:
        >>> SlidingWindow(roi_size=96, overlap=0.5, mode="gaussian")
        SlidingWindow(roi_size=96, overlap=0.5, mode='gaussian', sw_batch_size=1, weights='patch')
    """

    roi_size: int | tuple[int, ...]
    overlap: float = 0.25
    mode: str = "constant"
    sw_batch_size: int = 1
    weights: str = "patch"

    def __post_init__(self) -> None:
        roi = self.roi_size
        if isinstance(roi, Sequence) and not isinstance(roi, str):
            roi = tuple(roi)
            object.__setattr__(self, "roi_size", roi[0] if len(roi) == 1 else roi)
        sides = roi if isinstance(roi, tuple) else (roi,)
        if not sides or not all(_positive_int(s) for s in sides):
            raise ValueError(
                "Expected `roi_size` to be a positive int or one per spatial dimension (e.g. 96 "
                f"or (96, 96, 64)), but got {self.roi_size!r}."
            )
        overlap = self.overlap
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
            overlap = float("nan")
        if not 0 <= overlap < 1:
            raise ValueError(f"Expected `overlap` in [0, 1), e.g. 0.5, but got {self.overlap!r}.")
        if self.mode not in BLEND_MODES:
            raise ValueError(f"Expected `mode` to be one of {BLEND_MODES}, but got {self.mode!r}.")
        if not _positive_int(self.sw_batch_size):
            raise ValueError(
                f"Expected `sw_batch_size` to be a positive int, but got {self.sw_batch_size!r}."
            )
        if self.weights not in WEIGHTS:
            raise ValueError(
                f"Expected `weights` to be one of {WEIGHTS}, but got {self.weights!r}."
            )

    def sides(self, dims: int) -> tuple[int, ...]:
        """The window's side in each of ``dims`` spatial dimensions.

        Raises:
            ValueError: for a ``roi_size`` with another number of sides.
        """
        if isinstance(self.roi_size, int):
            return (self.roi_size,) * dims
        if len(self.roi_size) != dims:
            raise ValueError(
                f"Expected `roi_size` to have one side or {dims} (one per spatial dimension of "
                f"the input), but got {list(self.roi_size)}."
            )
        return tuple(self.roi_size)

    def __call__(
        self, engine: CAMEngine, x: Tensor, classes: Any = None, masks: Tensor | None = None
    ) -> CAMResult:
        """The engine's CAMs of the whole input ``x``, window by window."""
        return sliding_window_cams(
            engine,
            x,
            self.sides(x.ndim - 2),
            overlap=self.overlap,
            mode=self.mode,
            sw_batch_size=self.sw_batch_size,
            weights=self.weights,
            classes=classes,
            masks=masks,
        )


def explain(
    engine: CAMEngine,
    window: SlidingWindow | None,
    x: Tensor,
    classes: Any = None,
    masks: Tensor | None = None,
) -> CAMResult:
    """``engine(x, classes=..., masks=...)``, or through ``window``'s windows when given."""
    if window is None:
        return engine(x, classes=classes, masks=masks)
    return window(engine, x, classes=classes, masks=masks)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
