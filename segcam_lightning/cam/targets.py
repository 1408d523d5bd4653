"""Segmentation targets: what score a CAM explains, ``logits [B, K, H, W] -> scores [B, K]``.

A classifier's CAM explains one logit. A segmentation model has one logit per class *per pixel*,
so a target says how to reduce them to one score per class and image:

- :class:`SoftmaxMean` (``"softmax_mean"``): the seed's choice, the mean softmax probability of
  the class over all pixels.
- :class:`LogitRegion` (``"logit_region"``): Seg-Grad-CAM (Vinogradova et al., 2020,
  https://arxiv.org/abs/2002.11434): the class logit summed over the pixels predicted as that
  class. A class predicted nowhere has an empty region: its map is all zero and flagged absent.
- :class:`GTRegion` (``"gt_region"``): the same over the ground-truth pixels of the class.
- :class:`PixelTarget`, :class:`BoxTarget`: the class logit at one pixel or summed over a box.
- any callable ``f(logits, masks) -> scores`` or ``-> (scores, present)``.

Targets receive float32 logits and return :class:`TargetOutput` ``(scores, present)``: ``present``
``[B, K]`` bool is false where a region is empty.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segcam_lightning.cam.functional import predicted_classes

__all__ = [
    "TARGETS",
    "BoxTarget",
    "CallableTarget",
    "GTRegion",
    "LogitRegion",
    "PixelTarget",
    "RegionTarget",
    "SoftmaxMean",
    "Target",
    "TargetOutput",
    "get_target",
]

#: ``(logits of re-run images [n, K, H, W], index of their source image [n]) -> scores [n, K]``.
Scorer = Callable[[Tensor, Tensor], Tensor]


class TargetOutput(NamedTuple):
    """What a target returns.

    Attributes:
        scores: ``[B, K]`` differentiable class scores.
        present: ``[B, K]`` bool, false where the target's region is empty (map forced to zero).
    """

    scores: Tensor
    present: Tensor


class Target(ABC):
    """Base of all targets: ``target(logits [B, K, H, W], masks) -> TargetOutput``."""

    name: str = "target"
    #: Whether every image's scores over *all* classes sum to a constant (softmax means sum to
    #: 1). Their gradients then sum to zero, and the engine derives one class's gradient per
    #: image from the others': K - 1 backward passes instead of K.
    scores_sum_to_constant: bool = False

    @abstractmethod
    def __call__(self, logits: Tensor, masks: Tensor | None = None) -> TargetOutput:
        """Reduce logits ``[B, K, H, W]`` to scores ``[B, K]`` (and ``present`` ``[B, K]``)."""

    def scorer(self, logits: Tensor, masks: Tensor | None = None) -> Scorer:
        """Scores for re-run copies of the images (Score-CAM's masked forwards).

        Args:
            logits: ``[B, K, H, W]`` logits of the original forward; a target that derives
                something from them (a region) fixes it here, so masked copies are scored on the
                same pixels as the original.
            masks: the ground-truth masks given to the call, if any.

        Returns:
            A function ``(logits [n, K, H, W], source [n]) -> scores [n, K]`` where ``source``
            holds the index in the batch of the image each row was derived from.
        """
        del logits

        def score(out: Tensor, source: Tensor) -> Tensor:
            return self(out, None if masks is None else masks[source]).scores

        return score

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SoftmaxMean(Target):
    """The seed's target: mean softmax probability of class ``c`` over all pixels.

    ``score[b, c] = 1/(H·W) · sum_ij softmax(logits[b, :, i, j])_c``. Every class is present.
    The scores of an image sum to 1 over the classes (``scores_sum_to_constant``).
    """

    name = "softmax_mean"
    scores_sum_to_constant = True

    def __call__(self, logits: Tensor, masks: Tensor | None = None) -> TargetOutput:
        _check_logits(logits)
        scores = logits.softmax(dim=1).mean(dim=(-2, -1))
        return TargetOutput(scores, torch.ones_like(scores, dtype=torch.bool))


class RegionTarget(Target):
    """A class logit summed over a region: ``score[b, c] = sum_ij (region · logits)[b, c, i, j]``.

    Subclasses define :meth:`region`. A class whose region is empty has score 0 (a constant, so
    its gradient and map are zero) and ``present`` false.
    """

    @abstractmethod
    def region(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        """Region weights ``[B, K, H, W]`` (0/1) for the given logits ``[B, K, H, W]``."""

    def __call__(self, logits: Tensor, masks: Tensor | None = None) -> TargetOutput:
        _check_logits(logits)
        region = self.region(logits, masks).to(logits.dtype)
        scores = (logits * region).sum(dim=(-2, -1))
        present = region.flatten(2).ne(0).any(dim=-1)
        return TargetOutput(scores, present)

    def scorer(self, logits: Tensor, masks: Tensor | None = None) -> Scorer:
        region = self.region(logits, masks).to(logits.dtype).detach()

        def score(out: Tensor, source: Tensor) -> Tensor:
            return (out * region[source]).sum(dim=(-2, -1))

        return score


class LogitRegion(RegionTarget):
    """Seg-Grad-CAM: class logits summed over the pixels the model predicts as that class."""

    name = "logit_region"

    def region(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        pred = predicted_classes(logits.detach())
        return F.one_hot(pred, logits.shape[1]).permute(0, 3, 1, 2)


class GTRegion(RegionTarget):
    """Class logits summed over the ground-truth pixels of that class.

    ``masks`` is either integer labels ``[B, H, W]`` (values outside ``[0, K)``, e.g. an ignore
    index, belong to no class) or a per-class mask ``[B, K, H, W]`` (bool or 0/1).
    """

    name = "gt_region"

    def region(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        b, k, h, w = logits.shape
        if masks is None:
            raise ValueError(
                "Target 'gt_region' needs ground-truth masks: call the engine as "
                "`engine(images, masks=masks)` with integer labels [B, H, W] or per-class masks "
                "[B, K, H, W], but got masks=None."
            )
        if not isinstance(masks, Tensor):
            raise TypeError(
                f"Expected `masks` to be a torch.Tensor, but got {type(masks).__name__}."
            )
        if masks.ndim == 3 and tuple(masks.shape) == (b, h, w):
            if masks.is_floating_point() or masks.dtype == torch.bool:
                raise TypeError(
                    "Expected label masks [B, H, W] to hold integer class indices, but got "
                    f"dtype {masks.dtype}; pass `masks.long()` or per-class masks [B, K, H, W]."
                )
            labels = masks.to(logits.device).long()
            classes = torch.arange(k, device=logits.device).view(1, k, 1, 1)
            return labels.unsqueeze(1) == classes
        if masks.ndim == 4 and tuple(masks.shape) == (b, k, h, w):
            return masks.to(logits.device) != 0
        raise ValueError(
            f"Expected `masks` of shape [B, H, W] = {[b, h, w]} (labels) or [B, K, H, W] = "
            f"{[b, k, h, w]} (per class) to match the logits, but got {list(masks.shape)}."
        )


class PixelTarget(RegionTarget):
    """The class logit at one pixel ``(row, col)`` of the logits, for every image.

    Args:
        row: pixel row in ``[0, H)``.
        col: pixel column in ``[0, W)``.
    """

    name = "pixel"

    def __init__(self, row: int, col: int) -> None:
        for arg, value in (("row", row), ("col", col)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{arg}` to be a non-negative int, but got {value!r}.")
        self.row, self.col = row, col

    def region(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        h, w = logits.shape[-2:]
        if self.row >= h or self.col >= w:
            raise ValueError(
                f"{self!r} lies outside the logits' {h}×{w} grid; pick row < {h} and col < {w}."
            )
        region = torch.zeros_like(logits, dtype=torch.bool)
        region[..., self.row, self.col] = True
        return region

    def __repr__(self) -> str:
        return f"PixelTarget(row={self.row}, col={self.col})"


class BoxTarget(RegionTarget):
    """The class logit summed over a box ``[top, bottom) × [left, right)``, for every image.

    Args:
        top: first row.
        left: first column.
        bottom: row after the last (exclusive).
        right: column after the last (exclusive).
    """

    name = "box"

    def __init__(self, top: int, left: int, bottom: int, right: int) -> None:
        values = {"top": top, "left": left, "bottom": bottom, "right": right}
        for arg, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{arg}` to be a non-negative int, but got {value!r}.")
        if bottom <= top or right <= left:
            raise ValueError(
                "Expected a non-empty box with top < bottom and left < right (bottom/right "
                f"exclusive), but got top={top}, left={left}, bottom={bottom}, right={right}."
            )
        self.top, self.left, self.bottom, self.right = top, left, bottom, right

    def region(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        h, w = logits.shape[-2:]
        if self.bottom > h or self.right > w:
            raise ValueError(
                f"{self!r} extends outside the logits' {h}×{w} grid; pick bottom <= {h} and "
                f"right <= {w}."
            )
        region = torch.zeros_like(logits, dtype=torch.bool)
        region[..., self.top : self.bottom, self.left : self.right] = True
        return region

    def __repr__(self) -> str:
        return (
            f"BoxTarget(top={self.top}, left={self.left}, bottom={self.bottom}, right={self.right})"
        )


class CallableTarget(Target):
    """Wrap ``f(logits [B, K, H, W], masks | None) -> scores [B, K]`` (or ``(scores, present)``)."""

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, logits: Tensor, masks: Tensor | None = None) -> TargetOutput:
        out = self.fn(logits, masks)
        present = None
        if isinstance(out, tuple) and len(out) == 2:
            out, present = out
        b, k = logits.shape[:2]
        if not isinstance(out, Tensor) or tuple(out.shape) != (b, k):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Expected target {self.name!r} to return scores [B, K] = {[b, k]} (or a tuple "
                f"(scores, present)), but it returned {got}."
            )
        if present is None:
            present = torch.ones_like(out, dtype=torch.bool)
        elif not isinstance(present, Tensor) or tuple(present.shape) != (b, k):
            got = list(present.shape) if isinstance(present, Tensor) else type(present).__name__
            raise ValueError(
                f"Expected target {self.name!r} to return `present` as a bool tensor [B, K] = "
                f"{[b, k]}, but got {got}."
            )
        return TargetOutput(out, present.to(device=out.device, dtype=torch.bool))

    def __repr__(self) -> str:
        return f"CallableTarget({self.name})"


#: Targets available by name.
TARGETS: dict[str, type[Target]] = {
    "softmax_mean": SoftmaxMean,
    "logit_region": LogitRegion,
    "gt_region": GTRegion,
}


def get_target(target: str | Target | Callable[..., Any]) -> Target:
    """Resolve a target given by name, instance or callable.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything else.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        key = target.lower()
        if key not in TARGETS:
            raise ValueError(
                f"Expected `target` to be one of {sorted(TARGETS)} (or a PixelTarget, BoxTarget "
                f"or callable f(logits, masks) -> scores [B, K]), but got {target!r}."
            )
        return TARGETS[key]()
    if isinstance(target, type) and issubclass(target, Target):
        return target()
    if callable(target):
        return CallableTarget(target)
    raise TypeError(
        f"Expected `target` to be a name in {sorted(TARGETS)}, a Target or a callable "
        f"f(logits, masks) -> scores [B, K], but got {type(target).__name__}."
    )


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 4:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected logits of shape [B, K, H, W], but got {got}.")
