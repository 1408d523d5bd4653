"""Segmentation targets: what score a CAM explains, ``logits [B, K, H, W] -> scores [B, K]``.

A classifier's CAM explains one logit. A segmentation model has one logit per class *per pixel*,
so a target says how to reduce them to one score per class and image:

- :class:`SoftmaxMean` (``"softmax_mean"``): the blog post's choice, the mean softmax probability of
  the class over all pixels (for sigmoid outputs, the mean sigmoid probability).
- :class:`LogitRegion` (``"logit_region"``): Seg-Grad-CAM (Vinogradova et al., 2020,
  https://arxiv.org/abs/2002.11434): the class logit summed over the pixels predicted as that
  class. A class predicted nowhere has an empty region: its map is all zero and flagged absent.
- :class:`LogitMargin` (``"logit_margin"``): contrastive, the class logit minus its strongest
  competitor's (the background competes with no object class) over the predicted region.
- :class:`GTRegion` (``"gt_region"``): the same over the ground-truth pixels of the class.
- :class:`FalsePositives` (``"false_positive"``), :class:`FalseNegatives`
  (``"false_negative"``), :class:`Confusion` (``Confusion(true_class=k)``): the class logit, or
  with ``contrastive=True`` the chosen class's logit minus the true class's, over where the
  model is wrong about the class.
- :class:`BoundaryBand` (``"boundary"``): the class logit over the pixels within ``radius`` of
  the class's edge (of its prediction, or of its ground truth), both sides of it.
- :class:`PixelTarget`, :class:`BoxTarget`: the class logit at one pixel or summed over a box.
- any callable ``f(logits, masks) -> scores`` or ``-> (scores, present)``.

Targets receive float32 logits ``[B, K, h, w]`` at the model's output resolution (which may be
lower than the input's) and return :class:`TargetOutput` ``(scores, present)``: ``present``
``[B, K]`` bool is false where a region is empty. Built-in targets also receive the engine's
resolved output kind (see :data:`~segcam_lightning.cam.functional.OUTPUT_KINDS`):

==============  ==========================  ===============================================
target          ``"multiclass"`` (softmax)  ``"binary"`` / ``"multilabel"`` (sigmoids)
==============  ==========================  ===============================================
softmax_mean    mean softmax probability    mean sigmoid probability of the channel
logit_region    logit over the argmax       logit over ``logit > log(t / (1 - t))``
gt_region       logit over ``labels == k``  binary: over ``labels == 1``; multilabel: as
                                            multiclass, or over multi-hot masks
==============  ==========================  ===============================================

For a binary model the one channel (index 0) explains the foreground (label 1).

Volumes work alike: logits ``[B, K, D, H, W]``, sums and means over all ``D·H·W`` voxels, masks
``[B, D, H, W]`` or ``[B, K, D, H, W]``; :class:`PixelTarget` and :class:`BoxTarget` then also
take a depth coordinate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam._registry import resolve
from segcam_lightning.cam.readout import SOFTMAX, Readout

__all__ = [
    "TARGETS",
    "BoundaryBand",
    "BoxTarget",
    "CallableTarget",
    "Confusion",
    "FalseNegatives",
    "FalsePositives",
    "GTRegion",
    "LogitMargin",
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


def _spatial_sum(values: Tensor) -> Tensor:
    """Sum of ``[B, K, *S]`` over its spatial dimensions: ``[B, K]``."""
    return values.sum(dim=tuple(range(2, values.ndim)))


class TargetOutput(NamedTuple):
    """What a target returns.

    Attributes:
        scores: ``[B, K]`` differentiable class scores.
        present: ``[B, K]`` bool, false where the target's region is empty (map forced to zero).
    """

    scores: Tensor
    present: Tensor


class Target(ABC):
    """Base of all targets: ``target(logits [B, K, H, W], masks, readout)``.

    Logits of volumes are ``[B, K, D, H, W]``; scores are ``[B, K]`` either way. ``readout``
    (a :class:`~segcam_lightning.cam.readout.Readout`) says how the channels are read: softmax
    or sigmoids, and the threshold.
    """

    name: str = "target"
    #: Whether every image's scores over *all* classes sum to a constant (softmax means sum to
    #: 1, for multiclass outputs only). Their gradients then sum to zero, and the engine derives
    #: one class's gradient per image from the others': K - 1 backward passes instead of K.
    scores_sum_to_constant: bool = False
    #: Whether the target reads ground-truth ``masks``; the engine then checks that they are at
    #: the input's (or the logits') resolution before calling it.
    needs_masks: bool = False

    @abstractmethod
    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        """Reduce logits ``[B, K, H, W]`` to scores ``[B, K]`` (and ``present`` ``[B, K]``)."""

    def mean_logit_gradients(
        self,
        logits: Tensor,
        classes: Tensor,
        masks: Tensor | None = None,
        readout: Readout = SOFTMAX,
    ) -> Tensor:
        """Spatial means of the score gradients w.r.t. the logits, for every image at once.

        ``G[b, i, j] = mean_p d score[b, classes[i]] / d logits[b, j, p]`` over the logits' ``N``
        positions ``p``. With it the engine gets Grad-CAM's weights at a layer that reaches the
        logits through a pointwise linear head ``logits = W · A + b`` without a backward pass:
        ``w = G · W`` (``CAMEngine``'s head path).

        This default takes one backward pass per class through the target alone (on a detached
        copy of the logits, so any differentiable target works); built-in targets override it
        with a closed form, which the tests compare with this one.

        Args:
            logits: ``[B, K, *S]`` float logits (no graph needed).
            classes: ``[K_sel]`` long indices of the classes wanted.
            masks, readout: as for the call.

        Returns:
            ``[B, K_sel, K]`` in the logits' dtype.

        Raises:
            RuntimeError: when the scores do not depend on the logits differentiably.
        """
        leaf = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = self(leaf, masks, readout).scores
            if not scores.requires_grad:
                raise RuntimeError(
                    f"The scores of target {self.name!r} do not depend on the logits: it "
                    "returned scores without a graph. A target must compute its scores from the "
                    "logits it receives with differentiable operations."
                )
            # One scalar per class: summing over the batch gives each image its own gradient.
            class_scores = scores[:, classes].sum(dim=0).unbind()
        rows = []
        for i, score in enumerate(class_scores):
            last = i == len(class_scores) - 1
            (grad,) = torch.autograd.grad(score, leaf, retain_graph=not last, allow_unused=True)
            grad = torch.zeros_like(leaf) if grad is None else grad
            rows.append(grad.flatten(2).mean(dim=-1))
        return torch.stack(rows, dim=1)

    def scorer(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> Scorer:
        """Scores for re-run copies of the images (Score-CAM's masked forwards).

        Args:
            logits: ``[B, K, H, W]`` logits of the original forward; a target that derives
                something from them (a region) fixes it here, so masked copies are scored on the
                same pixels as the original.
            masks: the ground-truth masks given to the call, if any.
            readout: as for the call.

        Returns:
            A function ``(logits [n, K, H, W], source [n]) -> scores [n, K]`` where ``source``
            holds the index in the batch of the image each row was derived from.
        """
        del logits

        def score(out: Tensor, source: Tensor) -> Tensor:
            selected = None if masks is None else masks[source]
            return self(out, selected, readout).scores

        return score

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SoftmaxMean(Target):
    """The blog post's target: mean probability of class ``c`` over all pixels.

    Multiclass: ``score[b, c] = 1/(H·W) · sum_ij softmax(logits[b, :, i, j])_c``; the scores of
    an image sum to 1 over the classes (``scores_sum_to_constant``). Binary and multilabel
    (sigmoid outputs): despite the name, the mean *sigmoid* probability of the channel,
    ``1/(H·W) · sum_ij sigmoid(logits[b, c, i, j])`` (a softmax over one channel is constant).
    Every class is present. For a volume the mean runs over its ``D·H·W`` voxels.
    """

    name = "softmax_mean"
    scores_sum_to_constant = True

    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        n = FC.spatial_dims_of(logits)
        probs = logits.softmax(dim=1) if readout.kind == "multiclass" else logits.sigmoid()
        scores = probs.mean(dim=tuple(range(-n, 0)))
        return TargetOutput(scores, torch.ones_like(scores, dtype=torch.bool))

    def mean_logit_gradients(
        self,
        logits: Tensor,
        classes: Tensor,
        masks: Tensor | None = None,
        readout: Readout = SOFTMAX,
    ) -> Tensor:
        """Closed form of :meth:`Target.mean_logit_gradients`, one matrix product.

        With ``P`` the probabilities over the ``N`` positions, ``d score_k / d logit_j(p)`` is
        ``P_k(p) (δ_kj - P_j(p)) / N`` for a softmax and ``δ_kj P_k(p) (1 - P_k(p)) / N`` for
        sigmoids, so ``G_kj = (δ_kj sum_p P_k (1 - P_k) - [j != k] sum_p P_k P_j) / N²`` (the
        sigmoid form without the second term). The diagonal is summed as ``P (1 - P)``, as the
        softmax's backward computes it, not as the difference of two sums.
        """
        if not _own(self, SoftmaxMean, "__call__"):
            return super().mean_logit_gradients(logits, classes, masks, readout)
        probs = logits.detach().flatten(2)
        n = probs.shape[-1]
        probs = probs.softmax(dim=1) if readout.kind == "multiclass" else probs.sigmoid()
        wanted = probs[:, classes]  # [B, K_sel, N]
        diagonal = (wanted * (1 - wanted)).sum(dim=-1) / n**2
        if readout.kind == "multiclass":
            grads = torch.bmm(wanted, probs.transpose(1, 2)).div_(-(n**2))
        else:
            grads = probs.new_zeros(probs.shape[0], len(classes), probs.shape[1])
        rows = torch.arange(len(classes), device=grads.device)
        grads[:, rows, classes] = diagonal
        return grads


class RegionTarget(Target):
    """A class logit summed over a region: ``score[b, c] = sum_ij (region · logits)[b, c, i, j]``.

    Subclasses define :meth:`region`. A class whose region is empty has score 0 (a constant, so
    its gradient and map are zero) and ``present`` false. Volumes sum over ``i, j`` and depth.
    """

    @abstractmethod
    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        """Region weights ``[B, K, *S]`` (0/1) for the given logits ``[B, K, *S]``."""

    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        FC.spatial_dims_of(logits)
        region = self.region(logits, masks, readout).to(logits.dtype)
        scores = _spatial_sum(logits * region)
        present = region.flatten(2).ne(0).any(dim=-1)
        return TargetOutput(scores, present)

    def mean_logit_gradients(
        self,
        logits: Tensor,
        classes: Tensor,
        masks: Tensor | None = None,
        readout: Readout = SOFTMAX,
    ) -> Tensor:
        """Closed form of :meth:`Target.mean_logit_gradients`: ``d score_k / d logit_j(p)`` is
        ``δ_kj region_k(p)``, so ``G`` is diagonal with the region's mean. Built-in regions
        only: a subclass's own region may depend on the logits differentiably."""
        if not _own(self, RegionTarget, "__call__") or type(self).region not in _FIXED_REGIONS:
            return super().mean_logit_gradients(logits, classes, masks, readout)
        logits = logits.detach()
        region = self.region(logits, masks, readout)[:, classes].to(logits.dtype)
        grads = logits.new_zeros(logits.shape[0], len(classes), logits.shape[1])
        rows = torch.arange(len(classes), device=grads.device)
        grads[:, rows, classes] = region.flatten(2).mean(dim=-1)
        return grads

    def scorer(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> Scorer:
        region = self.region(logits, masks, readout)
        region = region.to(logits.dtype).detach()

        def score(out: Tensor, source: Tensor) -> Tensor:
            return _spatial_sum(out * region[source])

        return score


class LogitRegion(RegionTarget):
    """Seg-Grad-CAM: class logits summed over the pixels the model predicts as that class.

    The prediction is :func:`~segcam_lightning.cam.functional.predicted_masks`: the argmax for
    multiclass outputs, ``logit > log(t / (1 - t))`` per channel for binary and multilabel ones.
    """

    name = "logit_region"

    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        k = logits.shape[1]
        predicted = FC.predicted_masks(logits.detach(), readout.kind, readout.threshold)
        return FC.class_regions(predicted, range(k), k, readout.kind, spatial_dims=logits.ndim - 2)


class LogitMargin(LogitRegion):
    """Contrastive Seg-Grad-CAM: over the pixels predicted as class ``k``, the margin of ``k``'s
    logit over its strongest competitor, ``score[b, k] = sum_p region_k(p) · (z_k(p) -
    max_{j in C_k} z_j(p))``.

    Where ``logit_region`` asks what makes a pixel class ``k`` at all (for an object: mostly
    what tells it from the background), the margin asks what tells ``k`` apart from the class it
    is most easily taken for. ``background`` (default 0, the usual label of background) is no
    competitor of the other classes: an object class competes with the other object classes,
    the background with every class. With only one object class, or ``background=None``, every
    other class competes.

    The region is the prediction, as for ``logit_region``. Binary and multi-label outputs have
    independent channels, each its own decision against "not this class": there the margin is
    the logit itself and this target equals ``logit_region``.

    Args:
        background: the background class index, or ``None`` for none.
    """

    name = "logit_margin"

    def __init__(self, background: int | None = 0) -> None:
        if background is not None and (
            isinstance(background, bool) or not isinstance(background, int) or background < 0
        ):
            raise ValueError(
                f"Expected `background` to be a class index (int >= 0) or None, but got "
                f"{background!r}."
            )
        self.background = background

    def _rivals(self, logits: Tensor) -> Tensor:
        """``[B, K, *S]`` long: each class's strongest competitor at each pixel.

        From the top two of the competing pool: the object classes (all classes but the
        background; all classes without one, or with only one object class). A class in the
        pool competes with the pool's best, or its second best where it is the best itself; the
        background competes with the pool's best. The top two take ``O(B·K·N)`` memory, where a
        masked maximum per class would keep ``K`` copies of the logits for the backward.
        """
        k = logits.shape[1]
        b = self.background
        if b is not None and b >= k:
            raise ValueError(
                f"LogitMargin(background={b}) names a class the logits do not have: they have "
                f"{k} channels. Pass a class index below {k}, or background=None."
            )
        pool = [c for c in range(k) if c != b] if b is not None and k > 2 else list(range(k))
        index = torch.tensor(pool, device=logits.device)
        top = logits.index_select(1, index).topk(2, dim=1).indices  # positions in `pool`
        best, second = index[top[:, 0]], index[top[:, 1]]  # [B, *S] class indices
        rivals = [best if c not in pool else torch.where(best == c, second, best) for c in range(k)]
        return torch.stack(rivals, dim=1)

    def _margins(self, logits: Tensor) -> Tensor:
        """``[B, K, *S]``: each class's logit minus its strongest competitor's, per pixel."""
        return logits - logits.gather(1, self._rivals(logits.detach()))

    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        if readout.kind != "multiclass":
            return super().__call__(logits, masks, readout)
        FC.spatial_dims_of(logits)
        region = self.region(logits, masks, readout).to(logits.dtype)
        scores = _spatial_sum(self._margins(logits) * region)
        present = region.flatten(2).ne(0).any(dim=-1)
        return TargetOutput(scores, present)

    def scorer(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> Scorer:
        if readout.kind != "multiclass":
            return super().scorer(logits, masks, readout)
        region = self.region(logits, masks, readout).to(logits.dtype).detach()

        def score(out: Tensor, source: Tensor) -> Tensor:
            return _spatial_sum(self._margins(out) * region[source])

        return score

    def mean_logit_gradients(
        self,
        logits: Tensor,
        classes: Tensor,
        masks: Tensor | None = None,
        readout: Readout = SOFTMAX,
    ) -> Tensor:
        """Closed form of :meth:`Target.mean_logit_gradients`: ``+1`` for the class and ``-1``
        for its strongest competitor at the pixel, inside the region."""
        if readout.kind != "multiclass" or not _own(self, LogitMargin, "__call__", "_margins"):
            return super().mean_logit_gradients(logits, classes, masks, readout)
        logits = logits.detach()
        b, k = logits.shape[:2]
        region = self.region(logits, masks, readout).to(logits.dtype).flatten(2)  # [B, K, N]
        n = region.shape[-1]
        rivals = self._rivals(logits).flatten(2)  # [B, K, N]
        grads = logits.new_zeros(b, len(classes), k)
        for i, c in enumerate(classes.tolist()):
            against = logits.new_zeros(b, k).scatter_add_(1, rivals[:, c], region[:, c])
            grads[:, i] = -against / n
            grads[:, i, c] += region[:, c].sum(dim=-1) / n
        return grads

    def __repr__(self) -> str:
        return f"LogitMargin(background={self.background})"


class GTRegion(RegionTarget):
    """Class logits summed over the ground-truth pixels of that class.

    ``masks`` is either integer labels ``[B, H, W]`` or per-class masks ``[B, K, H, W]`` (bool or
    0/1, multi-hot for multilabel; a volume's ``[B, D, H, W]`` or ``[B, K, D, H, W]``), at the
    input's or the logits' resolution; regions come from
    :func:`~segcam_lightning.cam.functional.class_regions`, nearest-resized to the logits. With
    labels, channel ``k``'s region is ``labels == k`` (binary: the foreground ``labels == 1``);
    other values, e.g. an ignore index, belong to no class.
    """

    name = "gt_region"
    needs_masks = True

    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        b, k, *size = logits.shape
        n = len(size)
        labels, per_class = (
            FC.shape_label("B", spatial_dims=n),
            FC.shape_label("B", "K", spatial_dims=n),
        )
        if masks is None:
            raise ValueError(
                f"Target {self.name!r} needs ground-truth masks: call the engine as "
                f"`engine(images, masks=masks)` with integer labels {labels} or per-class masks "
                f"{per_class}, but got masks=None."
            )
        if isinstance(masks, Tensor) and masks.shape[:1] != (b,):
            raise ValueError(
                f"Expected `masks` for a batch of {b} images ({labels} or {per_class} with "
                f"B = {b}), but got {list(masks.shape)}."
            )
        return FC.class_regions(masks, range(k), k, readout.kind, size=size).to(logits.device)


class _MistakeTarget(GTRegion):
    """Base of the error-region targets: where the prediction and the ground truth disagree,
    both read on the logits' grid (the masks resized as for ``gt_region``).

    With ``contrastive=True`` (multiclass outputs) a pixel scores the predicted class's logit
    minus the true class's, so the map shows what made the model choose the wrong class over
    the right one; otherwise it scores the channel's own logit, as ``logit_region`` does.
    Binary and multi-label outputs have independent channels, each its own decision against
    "not this class": there the contrastive score is the plain one.

    Pixels that belong to no class (a label such as an ignore index) are in no error region.
    Subclasses define :meth:`_select` (the region of each channel) and :meth:`_contrast` (which
    classes a pixel of that region compares).
    """

    def __init__(self, contrastive: bool = False) -> None:
        if not isinstance(contrastive, bool):
            raise TypeError(f"Expected `contrastive` to be a bool, but got {contrastive!r}.")
        self.contrastive = contrastive

    def _grids(
        self, logits: Tensor, masks: Tensor | None, readout: Readout
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``truth``, ``predicted`` ``[B, K, *S]`` (bool) and ``valid`` ``[B, 1, *S]`` on the
        logits' grid."""
        truth = GTRegion.region(self, logits, masks, readout).bool()
        predicted = LogitRegion.region(self, logits, masks, readout).bool().to(truth.device)
        assert masks is not None  # GTRegion.region refuses None
        size, n = tuple(logits.shape[2:]), logits.ndim - 2
        if masks.ndim == n + 1:  # labels: the ones that name a class count
            labels = FC.resize_labels(masks.to(truth.device), size)
            classes = 2 if readout.kind == "binary" else logits.shape[1]
            valid = (labels >= 0) & (labels < classes)
            if readout.ignore_index is not None:  # an ignore label inside 0..K-1 too
                valid &= labels != readout.ignore_index
            valid = valid.unsqueeze(1)
        else:
            valid = torch.ones_like(truth[:, :1])
        return truth, predicted, valid

    @abstractmethod
    def _select(self, truth: Tensor, predicted: Tensor, valid: Tensor) -> Tensor:
        """Each channel's region ``[B, K, *S]`` (bool)."""

    @abstractmethod
    def _contrast(self, truth: Tensor, predicted: Tensor, channels: int) -> tuple[Tensor, Tensor]:
        """``(chosen, true)`` ``[B, K, *S]`` long: per channel and pixel, the class the model
        chose and the class it should have chosen (multiclass)."""

    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        return self._select(*self._grids(logits, masks, readout))

    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        if not self.contrastive or readout.kind != "multiclass":
            return super().__call__(logits, masks, readout)
        FC.spatial_dims_of(logits)
        truth, predicted, valid = self._grids(logits, masks, readout)
        region = self._select(truth, predicted, valid).to(logits.dtype)
        chosen, true = self._contrast(truth, predicted, logits.shape[1])
        margins = logits.gather(1, chosen) - logits.gather(1, true)
        present = region.flatten(2).ne(0).any(dim=-1)
        return TargetOutput(_spatial_sum(margins * region), present)

    def scorer(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> Scorer:
        if not self.contrastive or readout.kind != "multiclass":
            return super().scorer(logits, masks, readout)
        truth, predicted, valid = self._grids(logits.detach(), masks, readout)
        region = self._select(truth, predicted, valid).to(logits.dtype)
        chosen, true = self._contrast(truth, predicted, logits.shape[1])

        def score(out: Tensor, source: Tensor) -> Tensor:
            margins = out.gather(1, chosen[source]) - out.gather(1, true[source])
            return _spatial_sum(margins * region[source])

        return score

    def __repr__(self) -> str:
        return f"{type(self).__name__}(contrastive={self.contrastive})"


def _class_index(regions: Tensor) -> Tensor:
    """``[B, 1, *S]`` long: each pixel's class among the bool ``regions [B, K, *S]`` (the first
    set one; 0 where none is set, where no region reads it)."""
    return regions.to(torch.uint8).argmax(dim=1, keepdim=True)


class FalsePositives(_MistakeTarget):
    """Class ``k``'s false positives: pixels predicted as ``k`` whose ground truth is not ``k``.

    Plain: ``k``'s logit over them, what makes the model call them ``k``. Contrastive: ``k``'s
    logit minus the true class's, what makes it prefer ``k`` to the right class.
    """

    name = "false_positive"

    def _select(self, truth: Tensor, predicted: Tensor, valid: Tensor) -> Tensor:
        return predicted & ~truth & valid

    def _contrast(self, truth: Tensor, predicted: Tensor, channels: int) -> tuple[Tensor, Tensor]:
        chosen = torch.arange(channels, device=truth.device).view(1, -1, *[1] * (truth.ndim - 2))
        return chosen.expand_as(truth), _class_index(truth).expand_as(truth)


class FalseNegatives(_MistakeTarget):
    """Class ``k``'s false negatives: pixels whose ground truth is ``k`` predicted as something
    else.

    Plain: ``k``'s logit over them, the evidence for ``k`` that was not enough. Contrastive: the
    predicted class's logit minus ``k``'s, what made the model choose the other class.
    """

    name = "false_negative"

    def _select(self, truth: Tensor, predicted: Tensor, valid: Tensor) -> Tensor:
        return truth & ~predicted

    def _contrast(self, truth: Tensor, predicted: Tensor, channels: int) -> tuple[Tensor, Tensor]:
        true = torch.arange(channels, device=truth.device).view(1, -1, *[1] * (truth.ndim - 2))
        return _class_index(predicted).expand_as(truth), true.expand_as(truth)


class Confusion(_MistakeTarget):
    """The confusion of ``true_class`` with every other class: channel ``j``'s region is where
    the ground truth is ``true_class`` and the model predicts ``j`` (and not ``true_class``'s
    own channel, whose region is empty).

    Plain: ``j``'s logit over it. Contrastive: ``j``'s logit minus ``true_class``'s, what makes
    the model take ``true_class`` for ``j``.

    Args:
        true_class: the ground-truth class whose pixels are mislabelled.
        contrastive: see :class:`FalsePositives`.
    """

    name = "confusion"

    def __init__(self, true_class: int, contrastive: bool = False) -> None:
        if isinstance(true_class, bool) or not isinstance(true_class, int) or true_class < 0:
            raise ValueError(
                f"Expected `true_class` to be a class index (int >= 0), but got {true_class!r}."
            )
        super().__init__(contrastive)
        self.true_class = true_class

    def _select(self, truth: Tensor, predicted: Tensor, valid: Tensor) -> Tensor:
        k = self.true_class
        if k >= truth.shape[1]:
            raise ValueError(
                f"Confusion(true_class={k}) names a class the logits do not have: they have "
                f"{truth.shape[1]} channels."
            )
        return truth[:, k : k + 1] & predicted & ~truth

    def _contrast(self, truth: Tensor, predicted: Tensor, channels: int) -> tuple[Tensor, Tensor]:
        chosen = torch.arange(channels, device=truth.device).view(1, -1, *[1] * (truth.ndim - 2))
        return chosen.expand_as(truth), torch.full_like(chosen, self.true_class).expand_as(truth)

    def __repr__(self) -> str:
        return f"Confusion(true_class={self.true_class}, contrastive={self.contrastive})"


class BoundaryBand(RegionTarget):
    """Class logits summed over a band around each class's edge: the pixels within ``radius``
    (chessboard distance, on the logits' grid) of the boundary between the class and the rest,
    on both sides of it. Where a segmenter hesitates most; the image's own border is no edge.

    ``band = dilate(R, r) & ~erode(R, r)`` with a ``(2r + 1)``-wide square (cube for volumes)
    structuring element, ``R`` the class's region: the prediction
    (:func:`~segcam_lightning.cam.functional.predicted_masks`, ``source="predicted"``, no masks
    needed) or the ground truth (``source="gt"``, as ``gt_region`` reads it).

    Args:
        radius: the band's half-width in pixels of the logits' grid, ``>= 1``.
        source: ``"predicted"`` (default) or ``"gt"``.
    """

    name = "boundary"

    def __init__(self, radius: int = 2, source: str = "predicted") -> None:
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
            raise ValueError(f"Expected `radius` to be an int >= 1, but got {radius!r}.")
        if source not in ("predicted", "gt"):
            raise ValueError(f"Expected `source` to be 'predicted' or 'gt', but got {source!r}.")
        self.radius, self.source = radius, source
        self.needs_masks = source == "gt"

    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        if self.source == "gt":
            inside = GTRegion.region(self, logits, masks, readout).bool()  # type: ignore[arg-type]
        else:
            inside = LogitRegion.region(self, logits, masks, readout).bool()  # type: ignore[arg-type]
        return band(inside, self.radius)

    def __repr__(self) -> str:
        return f"BoundaryBand(radius={self.radius}, source={self.source!r})"


def band(regions: Tensor, radius: int) -> Tensor:
    """The pixels within ``radius`` (chessboard distance) of the edge of boolean regions
    ``[B, K, *S]`` (2-D or 3-D), on both sides: ``dilate(R) & ~erode(R)``; outside the grid
    counts as neither inside nor outside, so the grid's border is no edge."""
    pool = F.max_pool3d if regions.ndim == 5 else F.max_pool2d
    shape = regions.shape
    flat = regions.reshape(-1, 1, *shape[2:]).float()
    size = 2 * radius + 1

    def dilate(x: Tensor) -> Tensor:
        return pool(x, size, stride=1, padding=radius)

    grown = dilate(flat) > 0
    shrunk = dilate(1.0 - flat) == 0  # no pixel outside R within the radius
    return (grown & ~shrunk).reshape(shape)


class _WindowTarget(RegionTarget):
    """A fixed window of the logits' grid, the same for every image, class and output kind.

    Coordinates are on the logits' grid, which is smaller than the input's for a model that
    predicts at reduced resolution. A window with a depth range fits volumes ``[B, K, D, H, W]``,
    one without fits images ``[B, K, H, W]``. Subclasses define :attr:`_has_depth` and
    :meth:`_window`.
    """

    #: Whether the window has a depth coordinate (fits volumes) or not (fits images).
    _has_depth: bool = False
    #: The arguments that place the window in depth, for messages.
    _depth_args: str = ""

    @abstractmethod
    def _window(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """One slice per spatial dimension of a grid of ``shape``; raises outside it."""

    def region(self, logits: Tensor, masks: Tensor | None, readout: Readout = SOFTMAX) -> Tensor:
        shape = tuple(logits.shape[2:])
        grid = FC.grid_label(shape)
        if len(shape) == 3 and not self._has_depth:
            raise ValueError(
                f"{self!r} places a window on an image, but the logits are a {grid} volume; "
                f"pass {self._depth_args} to place it in depth too."
            )
        if len(shape) == 2 and self._has_depth:
            raise ValueError(
                f"{self!r} has a depth coordinate, but the logits are a {grid} image; drop "
                f"{self._depth_args}."
            )
        region = torch.zeros_like(logits, dtype=torch.bool)
        region[(..., *self._window(shape))] = True
        return region


class PixelTarget(_WindowTarget):
    """The class logit at one pixel ``(row, col)`` (voxel ``(depth, row, col)``) of the logits,
    for every image.

    Args:
        row: pixel row in ``[0, H)`` of the logits.
        col: pixel column in ``[0, W)`` of the logits.
        depth: slice in ``[0, D)`` of a volume's logits; ``None`` (default) for images.
    """

    name = "pixel"
    _depth_args = "`depth=`"

    def __init__(self, row: int, col: int, depth: int | None = None) -> None:
        _check_coordinates({"row": row, "col": col, **_given(depth=depth)})
        self.row, self.col, self.depth = row, col, depth
        self._has_depth = depth is not None

    def _window(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        height, width = shape[-2:]
        outside = self.row >= height or self.col >= width
        pick = f"row < {height} and col < {width}"
        if self.depth is not None:
            outside = outside or self.depth >= shape[0]
            pick = f"depth < {shape[0]}, {pick}"
        if outside:
            raise ValueError(
                f"{self!r} lies outside the logits' {FC.grid_label(shape)} grid; pick {pick}."
            )
        window = (slice(self.row, self.row + 1), slice(self.col, self.col + 1))
        return window if self.depth is None else (slice(self.depth, self.depth + 1), *window)

    def __repr__(self) -> str:
        depth = "" if self.depth is None else f", depth={self.depth}"
        return f"PixelTarget(row={self.row}, col={self.col}{depth})"


class BoxTarget(_WindowTarget):
    """The class logit summed over a box ``[top, bottom) × [left, right)`` of the logits, for
    every image (volumes: ``[front, back) × [top, bottom) × [left, right)``).

    Args:
        top: first row.
        left: first column.
        bottom: row after the last (exclusive).
        right: column after the last (exclusive).
        front: first slice of a volume; ``None`` (default) for images.
        back: slice after the last (exclusive), given with ``front``.
    """

    name = "box"
    _depth_args = "`front=` and `back=`"

    def __init__(
        self,
        top: int,
        left: int,
        bottom: int,
        right: int,
        front: int | None = None,
        back: int | None = None,
    ) -> None:
        depth = _given(front=front, back=back)
        _check_coordinates({"top": top, "left": left, "bottom": bottom, "right": right, **depth})
        if bottom <= top or right <= left:
            raise ValueError(
                "Expected a non-empty box with top < bottom and left < right (bottom/right "
                f"exclusive), but got top={top}, left={left}, bottom={bottom}, right={right}."
            )
        if len(depth) == 1 or (depth and back <= front):  # type: ignore[operator]
            raise ValueError(
                "Expected `front` and `back` both None (an image) or both given with "
                f"front < back (back exclusive), but got front={front}, back={back}."
            )
        self.top, self.left, self.bottom, self.right = top, left, bottom, right
        self.front, self.back = front, back
        self._has_depth = bool(depth)

    def _window(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        height, width = shape[-2:]
        outside = self.bottom > height or self.right > width
        pick = f"bottom <= {height} and right <= {width}"
        if self.back is not None:
            outside = outside or self.back > shape[0]
            pick = f"back <= {shape[0]}, {pick}"
        if outside:
            raise ValueError(
                f"{self!r} extends outside the logits' {FC.grid_label(shape)} grid; pick {pick}."
            )
        window = (slice(self.top, self.bottom), slice(self.left, self.right))
        return window if self.front is None else (slice(self.front, self.back), *window)

    def __repr__(self) -> str:
        depth = "" if self.front is None else f", front={self.front}, back={self.back}"
        return (
            f"BoxTarget(top={self.top}, left={self.left}, bottom={self.bottom}, "
            f"right={self.right}{depth})"
        )


class CallableTarget(Target):
    """Wrap ``f(logits [B, K, H, W], masks | None) -> scores [B, K]`` (or ``(scores, present)``).

    ``f`` gets the masks exactly as passed to the engine and not the output kind: it decides
    itself how to read the logits.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(
        self, logits: Tensor, masks: Tensor | None = None, readout: Readout = SOFTMAX
    ) -> TargetOutput:
        del readout
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


def _own(target: Target, owner: type, *names: str) -> bool:
    """Whether ``target`` uses ``owner``'s own ``names`` (a subclass that overrides how scores
    are computed must not inherit ``owner``'s closed-form gradients)."""
    return all(getattr(type(target), name) is getattr(owner, name) for name in names)


#: Regions that are constant for the gradient (a prediction, masks, a window).
_FIXED_REGIONS = (LogitRegion.region, GTRegion.region, _WindowTarget.region)

#: Targets available by name.
TARGETS: dict[str, type[Target]] = {
    "softmax_mean": SoftmaxMean,
    "logit_region": LogitRegion,
    "logit_margin": LogitMargin,
    "gt_region": GTRegion,
    "false_positive": FalsePositives,
    "false_negative": FalseNegatives,
    "boundary": BoundaryBand,
}


_ALTERNATIVES = "a Target (PixelTarget, BoxTarget) or a callable f(logits, masks) -> scores [B, K]"


def get_target(target: str | Target | Callable[..., Any]) -> Target:
    """Resolve a target given by name, instance or callable.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything else.
    """
    return resolve(target, "target", Target, TARGETS, str.lower, CallableTarget, _ALTERNATIVES)


def _check_coordinates(values: dict[str, Any]) -> None:
    for arg, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Expected `{arg}` to be a non-negative int, but got {value!r}.")


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are not ``None``."""
    return {arg: value for arg, value in values.items() if value is not None}
