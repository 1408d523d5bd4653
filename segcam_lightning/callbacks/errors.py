"""``GradCAMCallback(errors=True)``: the probe's mistakes, watched over training.

At each logged validation, besides the class maps, the callback

- computes each explained class's **missed-pixel maps** with the error-region target
  :class:`~segcam_lightning.cam.targets.FalseNegatives` (contrastive for a multiclass output:
  over the class's ground-truth pixels the model labels as something else, the chosen class's
  logit minus the true one's — what made the model take the class for another), at the same
  layers and with the same method, and logs them as grids under
  ``cam/[<tag>/]errors/<layer>/<class>`` (input, ground truth, prediction, map; a class the
  model misses nowhere on an image has an empty map there);
- logs the probe's **confusion shares** ``cam_errors/[<tag>/]<true>_as_<predicted>``: the share
  of the true class's ground-truth pixels on the probe predicted as the other class, for every
  explained class present on the probe and every other label (zeros included, so a confusion
  shrinking to nothing shows as a curve reaching 0).

Multi-label outputs have independent channels: each class's missed pixels are its
ground-truth pixels whose channel is off, and there are no confusion pairs. Needs the probe's
masks (refused at ``setup`` otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from segcam_lightning.cam import CAMEngine, Readout
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.targets import FalseNegatives

__all__ = ["confusion_shares", "log_confusion", "missed_engine"]


def missed_engine(engine: CAMEngine, read: Readout) -> CAMEngine:
    """An engine like ``engine`` (layers, method, normalisation, readout, adapter, token
    layouts) whose target is each class's missed pixels, contrastive for a multiclass output."""
    missed = copy.copy(engine)  # its settings only: an engine keeps no state between calls
    missed.target = FalseNegatives(contrastive=read.kind == "multiclass")
    return missed


def confusion_shares(
    masks: Tensor, preds: Tensor, num_labels: int, ignore_index: int | None = None
) -> Tensor:
    """``[n, n]`` float64: row ``t``, column ``p`` is the share of the probe's pixels of label
    ``t`` predicted as ``p`` (labels ``[N, *S]``; rows of labels absent from the masks are NaN;
    pixels whose label is outside ``0..n-1`` or ``ignore_index`` count nowhere)."""
    truth = masks.reshape(-1).long()
    guess = preds.reshape(-1).long().clamp(0, num_labels - 1)
    valid = (truth >= 0) & (truth < num_labels)
    if ignore_index is not None:
        valid &= truth != ignore_index
    pairs = truth[valid] * num_labels + guess[valid]
    counts = torch.bincount(pairs, minlength=num_labels**2).view(num_labels, num_labels)
    counts = counts.double()
    totals = counts.sum(dim=1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), float("nan"))


def log_confusion(
    pl_module: L.LightningModule,
    masks: Tensor,
    preds: Tensor,
    read: Readout,
    labels: Sequence[str],
    channels: Sequence[int],
    tag: str | None,
) -> None:
    """Log ``cam_errors/[<tag>/]<true>_as_<predicted>`` (:func:`confusion_shares` of the
    probe's labels ``masks`` and predictions ``preds``, ``labels`` naming the mask labels) for
    each explained channel present on the probe (a binary model's foreground is label 1) and
    every other label; nothing for a multi-label output. Every rank holds the gathered probe
    and computes the same values: no sync."""
    if read.kind == "multilabel":
        return
    if masks.ndim == preds.ndim + 1:  # per-class masks: one label per pixel
        masks = FC.label_map(masks, read.kind, preds.ndim - 1)
    shares = confusion_shares(masks, preds, len(labels), read.ignore_index)
    prefix = f"{tag}/" if tag else ""
    for channel in channels:
        t = 1 if read.kind == "binary" else channel
        if torch.isnan(shares[t]).any():
            continue  # not on the probe
        for p, name in enumerate(labels):
            if p != t:
                pl_module.log(f"cam_errors/{prefix}{labels[t]}_as_{name}", float(shares[t, p]))
