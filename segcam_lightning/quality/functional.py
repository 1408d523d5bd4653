"""Pure tensor maths of the map-quality checks: rank correlation, SSIM, all-zero maps, orders,
perturbations, curve areas, the objects-alone test and the shortcut rules.

Every function is stateless, needs no graph and works on any device. Maps are ``[..., H, W]``;
the leading dimensions (images, classes, layers) broadcast through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

__all__ = [
    "ContextSuspect",
    "ShortcutSuspect",
    "all_zero",
    "average_ranks",
    "blur_images",
    "class_name",
    "context_suspects",
    "curve_auc",
    "gt_first_order",
    "guided_maps",
    "isolate",
    "judged_classes",
    "kept_share",
    "map_ssim",
    "mean_fill",
    "perturbed",
    "plain",
    "random_order",
    "ranked_order",
    "segmentation_statistics",
    "shortcut_suspects",
    "spearman",
]

#: A map whose maximum is at most this is all zero: the engine's own cut-off for "no energy"
#: (the smallest normal float32).
ZERO_MAP = torch.finfo(torch.float32).tiny


def plain(value: Any) -> Any:
    """A result's value as JSON takes it: NaN as ``None``, tuples as lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def class_name(names: Sequence[str] | None, index: int) -> str:
    """The name of output channel ``index``: ``names[index]``, else ``class_<index>``."""
    return str(names[index]) if names is not None and index < len(names) else f"class_{index}"


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..N`` along the last dimension, ties sharing their average rank (as
    ``scipy.stats.rankdata(method="average")``).

    Args:
        values: ``[..., N]`` real values.

    Returns:
        ``[..., N]`` float64 ranks.
    """
    flat = values.reshape(-1, values.shape[-1])
    rows, n = flat.shape
    sorted_values, order = flat.sort(dim=-1, stable=True)
    # A new group starts wherever the sorted value changes; groups are numbered per row, and
    # each row's numbers are offset so one scatter handles the whole batch.
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = starts.long().cumsum(dim=-1) - 1 + torch.arange(rows, device=values.device)[:, None] * n
    position = torch.arange(1, n + 1, device=values.device, dtype=torch.float64).expand(rows, n)
    total = torch.zeros(rows * n, dtype=torch.float64, device=values.device)
    count = torch.zeros_like(total)
    total.scatter_add_(0, group.flatten(), position.flatten())
    count.scatter_add_(0, group.flatten(), torch.ones_like(position).flatten())
    mean_rank = (total / count.clamp_min(1))[group]
    ranks = torch.empty_like(mean_rank).scatter_(1, order, mean_rank)
    return ranks.reshape(values.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each pair of maps (Pearson's r of their average ranks).

    Args:
        a, b: ``[..., H, W]`` maps of the same shape.

    Returns:
        ``[...]`` float64 in ``[-1, 1]``; NaN where either map is constant (an all-zero map has
        no ranking), as ``scipy.stats.spearmanr``.

    Raises:
        ValueError: for maps of different shapes.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"Expected two stacks of maps [..., H, W] of one shape, but got {list(a.shape)} and "
            f"{list(b.shape)}."
        )
    ra = average_ranks(a.flatten(-2))
    rb = average_ranks(b.flatten(-2))
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denominator = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(-1) / denominator, float("nan"))


def map_ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM of each pair of maps, each min-max scaled to ``[0, 1]`` first (torchmetrics, 11 px
    Gaussian window, ``data_range=1``).

    Read with care: two mostly-zero maps share their zeros, so unrelated sparse maps still
    score high (0.65 between maps of different images on the default run).

    Args:
        a, b: ``[..., H, W]`` maps of one shape, ``H, W`` at least 11.

    Returns:
        ``[...]`` float32; 1 for two all-zero maps.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"Expected two stacks of maps [..., H, W] of one shape, but got {list(a.shape)} and "
            f"{list(b.shape)}."
        )
    lead = a.shape[:-2]
    x = _minmax(a.float()).reshape(-1, 1, *a.shape[-2:])
    y = _minmax(b.float()).reshape(-1, 1, *b.shape[-2:])
    if x.shape[0] == 0:
        return torch.zeros(lead)
    values = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return values.reshape(lead)


def _minmax(maps: Tensor) -> Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > ZERO_MAP, (maps - low) / span.clamp_min(ZERO_MAP), 0.0)


def all_zero(maps: Tensor) -> Tensor:
    """Whether each map ``[..., H, W]`` is all zero (its maximum at most :data:`ZERO_MAP`):
    ``[...]`` bool."""
    return maps.flatten(-2).amax(dim=-1) <= ZERO_MAP


def guided_maps(guided: Tensor) -> Tensor:
    """One map per class from guided backpropagation or guided Grad-CAM: the largest absolute
    value over the input channels, as guided images are usually shown.

    Args:
        guided: ``[..., C_in, H, W]``, e.g. ``result.guided_backprop`` ``[B, K, C_in, H, W]`` or
            ``result.guided_cams`` ``[B, L, K, C_in, H, W]``.

    Returns:
        ``[..., H, W]`` float32, non-negative.
    """
    return guided.float().abs().amax(dim=-3)


def ranked_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Pixel indices from the highest map value to the lowest, ties in random order.

    ReLU'd maps have large flat zero areas; a fixed tie order (e.g. raster) would delete them
    top row first and add a spatial bias to every curve.

    Args:
        maps: ``[B, H, W]``.
        generator: CPU generator of the tie-breaking permutation.

    Returns:
        ``[B, H·W]`` int64 flat pixel indices.
    """
    shuffle = random_order(maps.shape[0], maps.shape[-2] * maps.shape[-1], generator, maps.device)
    shuffled = maps.flatten(1).gather(1, shuffle)
    by_value = shuffled.argsort(dim=1, descending=True, stable=True)
    return shuffle.gather(1, by_value)


def random_order(
    batch: int,
    pixels: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A random permutation of ``pixels`` flat indices per image: ``[batch, pixels]`` int64."""
    keys = torch.rand(batch, pixels, generator=generator)
    return keys.argsort(dim=1).to(device)


def gt_first_order(regions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The region's pixels first, then the rest, each part in random order (an oracle map).

    Args:
        regions: ``[B, H, W]`` bool.

    Returns:
        ``[B, H·W]`` int64 flat pixel indices.
    """
    return ranked_order(regions.float(), generator)


def mean_fill(images: Tensor) -> Tensor:
    """Each image's per-channel mean, broadcast to its size: ``[B, C, H, W]``."""
    return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)


def isolate(images: Tensor, keep: Tensor) -> Tensor:
    """Images with everything outside ``keep`` flattened to its own mean colour.

    Each image keeps its pixels (voxels) in ``keep``; every other one takes the per-channel
    mean of the pixels it replaces, so an object is shown alone on a plain background of its
    surroundings' average colour (not the whole image's mean, which a large object would pull
    towards its own colour). An image with nothing outside ``keep`` is returned unchanged.

    Args:
        images: ``[B, C, *S]`` (``S`` = ``H, W`` or ``D, H, W``).
        keep: bool ``[B, *S]``, the pixels to keep.

    Raises:
        ValueError: when ``keep`` does not match the images' batch and spatial size.
    """
    if keep.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"Expected `keep` of shape {[images.shape[0], *images.shape[2:]]} for images "
            f"{list(images.shape)}, but got {list(keep.shape)}."
        )
    keep = keep.unsqueeze(1)
    # Summed in float32 at least: a half-precision count overflows at 65,505 pixels.
    dtype = torch.promote_types(images.dtype, torch.float32)
    outside = (~keep).to(dtype)
    spatial = tuple(range(2, images.ndim))
    total = (images.to(dtype) * outside).sum(spatial, keepdim=True)
    mean = total / outside.sum(spatial, keepdim=True)
    return torch.where(keep, images, mean.nan_to_num().to(images.dtype))


def kept_share(before: Tensor, after: Tensor) -> Tensor:
    """Share of the pixels in ``before`` that are still in ``after``, per leading index.

    Args:
        before, after: bool ``[..., P]`` of one shape, the pixels flattened into the last
            dimension.

    Returns:
        ``[...]`` float, NaN where ``before`` is empty.
    """
    if before.shape != after.shape:
        raise ValueError(
            f"Expected two regions of one shape, but got {list(before.shape)} and "
            f"{list(after.shape)}."
        )
    total = before.sum(-1)
    share = (before & after).sum(-1) / total.clamp_min(1)
    return torch.where(total > 0, share.float(), float("nan"))


def blur_images(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``[B, C, H, W]`` images (separable, reflected borders, ±3σ kernel).

    Raises:
        ValueError: for ``sigma`` not positive.
    """
    if not sigma > 0:
        raise ValueError(f"Expected a blur `sigma` > 0 pixels, but got {sigma}.")
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(images.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images)
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def perturbed(
    images: Tensor, fill: Tensor, order: Tensor, count: int, mode: str = "deletion"
) -> Tensor:
    """Images with the first ``count`` pixels of ``order`` changed.

    Args:
        images: ``[B, C, H, W]`` originals.
        fill: ``[B, C, H, W]`` what a deleted pixel becomes (mean or blurred image).
        order: ``[B, H·W]`` flat pixel indices, most important first.
        count: how many pixels of ``order`` to change, ``0..H·W``.
        mode: ``"deletion"`` (those pixels become ``fill``) or ``"insertion"`` (start from
            ``fill``, those pixels get the original back).

    Returns:
        ``[B, C, H, W]``.
    """
    b, _, h, w = images.shape
    chosen = torch.zeros(b, h * w, dtype=torch.bool, device=images.device)
    chosen.scatter_(1, order[:, :count], True)
    chosen = chosen.view(b, 1, h, w)
    if mode == "deletion":
        return torch.where(chosen, fill, images)
    if mode == "insertion":
        return torch.where(chosen, images, fill)
    raise ValueError(f"Expected `mode` 'deletion' or 'insertion', but got {mode!r}.")


def curve_auc(scores: Tensor) -> Tensor:
    """Area under curves sampled at equally spaced fractions ``0, 1/S, ..., 1`` (trapezoids).

    Args:
        scores: ``[..., S + 1]``.

    Returns:
        ``[...]``: the mean score over the fraction axis ``[0, 1]``.
    """
    if scores.shape[-1] < 2:
        raise ValueError(f"Expected at least 2 points per curve, but got {scores.shape[-1]}.")
    return (scores[..., 1:] + scores[..., :-1]).mul(0.5).mean(dim=-1)


@dataclass(frozen=True)
class ShortcutSuspect:
    """A class whose maps sit off its objects while the model segments it well, at a layer
    whose maps do sit on another class's objects.

    Attributes:
        class_index: position of the class in the maps' class dimension.
        energy_inside: mean share of the map inside the class's ground truth, over the counted
            images.
        iou: the class's IoU.
        num_images: images where the class is both in the ground truth and predicted.
        reference_index: the class whose maps vouch that the layer localises.
        reference_energy: that class's energy inside.
    """

    class_index: int
    energy_inside: float
    iou: float
    num_images: int
    reference_index: int
    reference_energy: float


def shortcut_suspects(
    energy: Tensor,
    counted: Tensor,
    iou: Tensor,
    area: Tensor,
    energy_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    reference_threshold: float = 0.7,
    min_images: int = 2,
    max_area: float = 0.5,
) -> list[ShortcutSuspect]:
    """Classes segmented well whose maps lie mostly outside them: a shortcut's signature.

    A class is suspect when, over the images where it is both in the ground truth and
    predicted, its mean energy inside is below ``energy_threshold`` while its IoU is at least
    ``iou_threshold``, and another class's maps at the same layer put at least
    ``reference_threshold`` inside their objects. The reference rules out layers and methods
    whose maps sit off every object (Grad-CAM at a U-Net's deep encoder does on clean models):
    there a low energy says nothing about the model. Classes that cover ``max_area`` or more of
    their images are background: neither judged (their evidence is the absence of objects, so
    their maps belong on the objects) nor references (a diffuse map puts most of its energy on
    a background that fills the image).

    Only images where the class is both in the ground truth and predicted count: elsewhere a
    class's map is min-max stretched noise (on images without a class, clean models put most of
    it on whatever stands out), which says nothing about what the model uses.

    Args:
        energy: ``[N, K]`` share of each map inside its class's ground truth.
        counted: ``[N, K]`` bool, the class is in the ground truth and the prediction.
        iou: ``[K]`` each class's IoU (NaN where undefined).
        area: ``[N, K]`` share of each image covered by the class's ground truth.
        energy_threshold: a class is suspect below this mean energy inside...
        iou_threshold: ...at or above this IoU...
        reference_threshold: ...when another class reaches this energy inside.
        min_images: fewest counted images for a class to be judged or to vouch.
        max_area: classes covering this mean share of their images or more are background.

    Returns:
        The suspects, in class order.
    """
    shape = _check_rule_inputs("energy", energy, counted, iou, area)
    counts, means, judged = judged_classes(energy, counted, area, min_images, max_area)
    columns = zip(judged.tolist(), means.tolist(), strict=True)
    references = [(j, e) for j, (ok, e) in enumerate(columns) if ok and e >= reference_threshold]
    suspects = []
    for k in range(shape[1]):
        q, e = float(iou[k]), float(means[k])
        if not judged[k] or math.isnan(q) or q < iou_threshold or not e < energy_threshold:
            continue
        others = [(j, r) for j, r in references if j != k]
        if others:
            j, r = max(others, key=lambda item: item[1])
            suspects.append(ShortcutSuspect(k, e, q, int(counts[k]), j, r))
    return suspects


def segmentation_statistics(truth: Tensor, predicted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the shortcut rules read besides the maps: which images count, IoU and area.

    Args:
        truth, predicted: bool ``[N, K, P]`` ground-truth and predicted regions, pixels
            flattened (pixels that do not count already removed from both).

    Returns:
        ``(counted [N, K]`` (the class in the ground truth and the prediction), ``iou [K]``
        (pooled over the images: intersections over unions; NaN where neither holds the
        class), ``area [N, K]`` (share of each image's pixels in the ground truth)``)``.
    """
    if truth.shape != predicted.shape or truth.ndim != 3:
        raise ValueError(
            f"Expected ground truth and prediction [N, K, P] of one shape, but got "
            f"{list(truth.shape)} and {list(predicted.shape)}."
        )
    counted = truth.any(-1) & predicted.any(-1)
    union = (truth | predicted).sum((0, 2))
    iou = (truth & predicted).sum((0, 2)) / union.clamp_min(1)
    iou = torch.where(union > 0, iou.float(), float("nan"))
    return counted, iou, truth.float().mean(-1)


def _check_rule_inputs(
    name: str, values: Tensor, counted: Tensor, iou: Tensor, area: Tensor
) -> torch.Size:
    """The shape ``[N, K]`` of a shortcut rule's inputs, after checking they agree."""
    shape = values.shape
    if values.ndim != 2 or counted.shape != shape or area.shape != shape or iou.shape != shape[1:]:
        raise ValueError(
            f"Expected {name}, counted and area [N, K] and iou [K], but got {list(shape)}, "
            f"{list(counted.shape)}, {list(area.shape)} and {list(iou.shape)}."
        )
    return shape


def judged_classes(
    values: Tensor, counted: Tensor, area: Tensor, min_images: int = 2, max_area: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: counted images, the mean of ``values`` over them, and whether the class is
    judged (enough images, and not a background that covers ``max_area`` of them or more)."""
    counts = counted.sum(dim=0)
    weights = counted.float()
    # Values of images that do not count may be NaN (not measured); counted NaN stays NaN.
    values = torch.where(counted, values.float(), 0.0)
    means = values.sum(dim=0) / counts.clamp_min(1)
    areas = (area.float() * weights).sum(dim=0) / counts.clamp_min(1)
    return counts, means, (counts >= min_images) & (areas < max_area)


@dataclass(frozen=True)
class ContextSuspect:
    """A class segmented well that its objects alone do not carry: the model takes its label
    from around them.

    Attributes:
        class_index: position of the class in the class dimension.
        kept_alone: mean share of the class's segmented pixels still predicted as the class
            when everything but its objects is flattened (:func:`isolate`), over the counted
            images.
        iou: the class's IoU.
        num_images: images where the class is both in the ground truth and predicted.
    """

    class_index: int
    kept_alone: float
    iou: float
    num_images: int


def context_suspects(
    kept: Tensor,
    counted: Tensor,
    iou: Tensor,
    area: Tensor,
    kept_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    min_images: int = 2,
    max_area: float = 0.5,
) -> list[ContextSuspect]:
    """Classes segmented well that lose their label when shown alone: a shortcut's signature
    in the model's predictions rather than in its maps.

    A class is suspect when, over the images where it is both in the ground truth and
    predicted, the mean share of its segmented pixels it keeps with everything else flattened
    (``kept``, see :func:`segcam_lightning.quality.objects_alone`) is below ``kept_threshold``
    while its IoU is at least ``iou_threshold``. Unlike :func:`shortcut_suspects` no reference
    class is needed: the test does not read a map, so it does not depend on a layer or method
    localising. Classes covering ``max_area`` or more of their images are background and not
    judged (shown alone they are most of the image anyway).

    A suspect is a class whose evidence lies outside its objects. That is a shortcut when the
    class should be recognisable by itself (a plant by its shape), and legitimate when the
    class is defined by its surroundings (a sidewalk next to a road): the rule cannot tell
    which.

    Args:
        kept: ``[N, K]`` share kept alone (NaN where not counted).
        counted: ``[N, K]`` bool, the class is in the ground truth and the prediction.
        iou: ``[K]`` each class's IoU (NaN where undefined).
        area: ``[N, K]`` share of each image covered by the class's ground truth.
        kept_threshold: a class is suspect below this mean share kept...
        iou_threshold: ...at or above this IoU.
        min_images: fewest counted images for a class to be judged.
        max_area: classes covering this mean share of their images or more are background.

    Returns:
        The suspects, in class order.
    """
    shape = _check_rule_inputs("kept", kept, counted, iou, area)
    counts, means, judged = judged_classes(kept, counted, area, min_images, max_area)
    suspects = []
    for k in range(shape[1]):
        q, m = float(iou[k]), float(means[k])
        if judged[k] and not math.isnan(q) and q >= iou_threshold and m < kept_threshold:
            suspects.append(ContextSuspect(k, m, q, int(counts[k])))
    return suspects
