"""Per-image pixel counts kept during a run: the pooled IoU and the shortcut rule read them.

Each audited image with ground truth leaves one *tally* (plain data: it travels between ranks,
and :data:`~segcam_lightning.audit.settings.STATE_FILE` keeps it for ``--resume``)::

    {
        "index": 3,            # the image's dataset index
        "pixels": 65536,       # pixels (voxels) per map
        "checkpoints": {
            "<label>": {
                "broken": False,          # the checkpoint's logits were not finite there
                "truth": [K ints],        # ground-truth pixels of each explained class
                "predicted": [K ints],    # predicted pixels
                "intersection": [K ints],
                "union": [K ints],
                "energy": [[K floats], ...],  # energy inside per layer (NaN: class absent)
                "confusion": [[t, p, pixels], ...],  # the non-zero (true label t,
                                                     # predicted label p) pixel counts;
                                                     # multiclass and binary outputs only
            },
        },
    }

Classes are in the plan's order. The IoU over the data is the summed intersections over the
summed unions (as torchmetrics' ``JaccardIndex`` computes it in a validation), from the
counts themselves; broken images are left out, as from the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: The per-class pixel counts of a tally, by name.
COUNT_NAMES = ("truth", "predicted", "intersection", "union")


def image_tally(
    index: int,
    pixels: int,
    labels: Sequence[str],
    counts: Sequence[dict[str, np.ndarray] | None],
    energy: Sequence[np.ndarray],
    broken: Sequence[bool],
) -> dict[str, Any] | None:
    """One image's tally (see the module's docstring); ``None`` without ground truth.

    Args:
        index: the image's dataset index.
        pixels: pixels (voxels) per map.
        labels: the checkpoints' labels.
        counts: per checkpoint, ``{name: [K] ints}`` for each of :data:`COUNT_NAMES`, or
            ``None`` without ground truth.
        energy: per checkpoint, energy inside ``[L, K]``.
        broken: per checkpoint, whether its logits were not finite on the image.
    """
    if any(c is None for c in counts):
        return None
    checkpoints = {}
    for label, count, share, bad in zip(labels, counts, energy, broken, strict=True):
        entry: dict[str, Any] = {"broken": bool(bad)}
        entry.update({name: [int(v) for v in count[name]] for name in COUNT_NAMES})  # type: ignore[index]
        entry["energy"] = [[float(v) for v in layer] for layer in share]
        if "confusion" in count:  # type: ignore[operator]
            entry["confusion"] = sparse_pairs(np.asarray(count["confusion"]))  # type: ignore[index]
        checkpoints[label] = entry
    return {"index": int(index), "pixels": int(pixels), "checkpoints": checkpoints}


def sparse_pairs(matrix: np.ndarray) -> list[list[int]]:
    """The non-zero cells of a confusion matrix ``[n, n]`` as ``[t, p, pixels]`` rows (a tally
    stays small for data with many classes: few pairs occur on one image)."""
    return [[int(t), int(q), int(matrix[t, q])] for t, q in np.argwhere(matrix)]


def confusion_matrix(entry: dict[str, Any], num_labels: int) -> np.ndarray | None:
    """An entry's confusion counts as a dense ``[n, n]`` int64 matrix (``None`` without)."""
    if "confusion" not in entry:
        return None
    matrix = np.zeros((num_labels, num_labels), np.int64)
    for t, q, pixels in entry["confusion"]:
        matrix[t, q] = pixels
    return matrix


def sound(tallies: Sequence[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """``label``'s entries of the images where its logits were finite, by dataset index, each
    with the image's ``pixels`` and ``index``."""
    entries = []
    for tally in sorted(tallies, key=lambda t: t["index"]):
        entry = tally["checkpoints"].get(label)
        if entry is not None and not entry["broken"]:
            entries.append({**entry, "pixels": tally["pixels"], "index": tally["index"]})
    return entries


def pooled_iou(entries: Sequence[dict[str, Any]], num_classes: int) -> Tensor:
    """``[K]`` float32 IoU of each class over the images of ``entries`` (from :func:`sound`):
    summed intersections over summed unions; NaN where no image holds or predicts the class."""
    if not entries:
        return torch.full((num_classes,), float("nan"))
    inter = torch.tensor([e["intersection"] for e in entries], dtype=torch.float64).sum(0)
    union = torch.tensor([e["union"] for e in entries], dtype=torch.float64).sum(0)
    return torch.where(union > 0, inter / union.clamp_min(1), float("nan")).float()


def shortcut_inputs(
    entries: Sequence[dict[str, Any]], layer: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What :func:`~segcam_lightning.quality.functional.shortcut_suspects` reads, for one layer
    of one checkpoint: ``energy [N, K]`` (NaN as 0), ``counted [N, K]`` (the class in the
    ground truth and the prediction), the pooled ``iou [K]`` and ``area [N, K]`` (the ground
    truth's share of each image)."""
    energy = torch.tensor([e["energy"][layer] for e in entries], dtype=torch.float64)
    truth = torch.tensor([e["truth"] for e in entries], dtype=torch.int64)
    predicted = torch.tensor([e["predicted"] for e in entries], dtype=torch.int64)
    pixels = torch.tensor([[e["pixels"]] for e in entries], dtype=torch.int64)
    # The area share as the per-image values compute it: a float32 division of the counts.
    area = (truth.to(torch.int32) / pixels.to(torch.int32)).float()
    counted = (truth > 0) & (predicted > 0)
    iou = pooled_iou(entries, truth.shape[1])
    return energy.nan_to_num(0.0), counted, iou, area
