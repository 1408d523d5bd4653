"""How a model's output channels are read: one value object for the engine and its consumers.

A segmentation model's logits ``[B, K, *S]`` mean different things for different heads: a
softmax over ``K`` classes, one sigmoid channel (binary: the foreground), or ``K`` independent
sigmoids (multi-label). A :class:`Readout` says which, the probability above which a sigmoid
pixel is predicted, and which mask label belongs to no class. The engine, the callback, the
quality checks and the audit all take one, so the three settings travel together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from segcam_lightning.cam import functional as FC

__all__ = ["Readout"]


@dataclass(frozen=True)
class Readout:
    """How the logits' channels are read.

    Attributes:
        kind: one of :data:`~segcam_lightning.cam.functional.OUTPUT_KINDS`: ``"multiclass"``
            (softmax over K >= 2 channels), ``"binary"`` (one sigmoid channel, the foreground:
            label 1 of the masks), ``"multilabel"`` (K independent sigmoids) or ``"auto"`` (one
            channel is binary, more are multiclass; multi-label must be asked for).
        threshold: probability in ``(0, 1)`` above which a sigmoid pixel is predicted; for
            logits, ``logit > log(t / (1 - t))``.
        ignore_index: a mask label that belongs to no class (e.g. 255): such pixels are shown
            gray and left out of every score read from the masks. ``None``: every label counts.

    Example:
        >>> Readout("binary", threshold=0.3).resolved(1)
        Readout(kind='binary', threshold=0.3, ignore_index=None)
    """

    kind: str = "auto"
    threshold: float = 0.5
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FC.OUTPUT_KINDS:
            raise ValueError(
                f"Expected `kind` to be one of {FC.OUTPUT_KINDS}, but got {self.kind!r}."
            )
        FC.threshold_logit(self.threshold)  # validates, with the message users see
        index = self.ignore_index
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ValueError(
                f"Expected `ignore_index` to be None or an int mask label (e.g. 255), but got "
                f"{index!r}."
            )

    def resolved(self, num_outputs: int) -> Readout:
        """This readout with ``"auto"`` decided for a model with ``num_outputs`` channels, and
        an explicit kind checked against them (see
        :func:`~segcam_lightning.cam.functional.resolve_output_kind`)."""
        return replace(self, kind=FC.resolve_output_kind(self.kind, num_outputs))

    def predicted(self, logits: Tensor) -> Tensor:
        """What the model predicts: labels ``[B, *S]`` (multiclass, binary) or multi-hot masks
        ``[B, K, *S]`` (multi-label); see
        :func:`~segcam_lightning.cam.functional.predicted_masks`."""
        return FC.predicted_masks(logits, self.kind, self.threshold)


#: A softmax over the channels: how multiclass logits are read.
SOFTMAX = Readout("multiclass")
