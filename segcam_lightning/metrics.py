"""How well CAMs sit on the ground truth: a functional core and torchmetrics ``Metric``s over it.

Every function takes CAMs ``[B, K, H, W]`` (one map per class in ``classes``; ``[B, K, D, H, W]``
for volumes), ground truth at the same resolution and the output channels the ``K`` maps belong
to. Ground truth is either integer labels ``[B, H, W]`` or per-class masks ``[B, K_out, H, W]``
(one-hot, or multi-hot for multi-label models; with a depth dimension for volumes). Regions come
from :func:`segcam_lightning.cam.functional.class_regions`, so binary models (one output
channel, foreground label 1) and ignored pixels (a label such as 255 given as
``ignore_index``) are read the same way everywhere. Ignored pixels take no part: they count
neither in a map's energy nor as its peak.

An image counts for a class only if the class is in its ground truth; a class seen in no image
computes to NaN ("no evidence"), not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from segcam_lightning.cam.functional import class_regions

__all__ = [
    "CAMEnergyInside",
    "PointingGame",
    "cam_energy_inside",
    "energy_inside_regions",
    "ground_truth_regions",
    "pointing_game_hits",
    "pointing_hits_regions",
]


def ground_truth_regions(
    masks: Tensor,
    classes: Sequence[int],
    kind: str = "multiclass",
    ignore_index: int | None = None,
    spatial_dims: int = 2,
) -> tuple[Tensor, Tensor | None]:
    """The classes' ground-truth regions and the pixels that count.

    Args:
        masks: labels ``[B, *S]`` or per-class masks ``[B, K_out, *S]`` (``S`` = ``H, W``, or
            ``D, H, W`` with ``spatial_dims=3``).
        classes: the output channel of each map.
        kind: the model's output kind (``"multiclass"``, ``"binary"``, ``"multilabel"``).
        ignore_index: a label value that belongs to no class and is left out (label masks).
        spatial_dims: 2 for images, 3 for volumes.

    Returns:
        ``(regions [B, K, *S] bool, valid [B, 1, *S] bool or None when every pixel counts)``.
    """
    per_class = masks.ndim == spatial_dims + 2
    if per_class:
        num_outputs = masks.shape[1]
    else:
        num_outputs = 1 if kind == "binary" else max(int(c) for c in classes) + 1
    regions = class_regions(masks, list(classes), num_outputs, kind, spatial_dims=spatial_dims)
    valid = None
    if ignore_index is not None and not per_class:
        valid = (masks != ignore_index).unsqueeze(1)
    return regions, valid


def _check_shapes(cams: Tensor, masks: Tensor, classes: Sequence[int]) -> int:
    """The maps' number of spatial dimensions, after checking the shapes agree."""
    spatial = cams.ndim - 2
    if (
        spatial not in (2, 3)
        or masks.ndim not in (spatial + 1, spatial + 2)
        or cams.shape[0] != masks.shape[0]
    ):
        raise ValueError(
            f"Expected CAMs [B, K, H, W] and masks [B, H, W] (or [B, K_out, H, W]), or the same "
            f"with a depth D for volumes, but got {tuple(cams.shape)} and {tuple(masks.shape)}."
        )
    if cams.shape[1] != len(classes) or cams.shape[2:] != masks.shape[-spatial:]:
        raise ValueError(
            f"Expected {len(classes)} maps (one per class in {list(classes)}) of size"
            f" {tuple(masks.shape[-spatial:])}, but got CAMs of shape {tuple(cams.shape)}."
        )
    return spatial


def cam_energy_inside(
    cams: Tensor,
    masks: Tensor,
    classes: Sequence[int],
    kind: str = "multiclass",
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Share of each map's energy (sum of values) that falls inside its class's GT region.

    Returns:
        ``(share [B, K], present [B, K])``: share in [0, 1] (0 for an all-zero map);
        ``present`` is whether the class is in the image's ground truth.
    """
    spatial = _check_shapes(cams, masks, classes)
    regions, valid = ground_truth_regions(masks, classes, kind, ignore_index, spatial)
    share = energy_inside_regions(cams, regions, valid, spatial)
    return share, regions.flatten(2).any(dim=-1)


def pointing_game_hits(
    cams: Tensor,
    masks: Tensor,
    classes: Sequence[int],
    tolerance: int = 0,
    kind: str = "multiclass",
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Whether each map's maximum lies on its class (within ``tolerance`` pixels).

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016. An all-zero map
    points nowhere and misses.

    Returns:
        ``(hits [B, K], present [B, K])`` as booleans; ``present`` as in
        :func:`cam_energy_inside`.
    """
    spatial = _check_shapes(cams, masks, classes)
    regions, valid = ground_truth_regions(masks, classes, kind, ignore_index, spatial)
    present = regions.flatten(2).any(dim=-1)
    if tolerance > 0:
        pool = F.max_pool2d if spatial == 2 else F.max_pool3d
        regions = pool(regions.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0
    return pointing_hits_regions(cams, regions, valid, spatial), present


def energy_inside_regions(
    cams: Tensor, regions: Tensor, valid: Tensor | None = None, spatial_dims: int = 2
) -> Tensor:
    """Share of each map's energy inside a region.

    Args:
        cams: maps ``[..., *S]``; negative values count as 0.
        regions: bool, broadcastable to ``cams``.
        valid: bool pixels that count (broadcastable), or ``None`` for all.
        spatial_dims: how many trailing dimensions make one map (2, or 3 for volumes).

    Returns:
        ``[...]`` float32 in [0, 1]; 0 for a map with no energy.
    """
    cams = cams.float().clamp_min(0)
    if valid is not None:
        cams = cams * valid
    dims = tuple(range(-spatial_dims, 0))
    total = cams.sum(dim=dims)
    inside = (cams * regions).sum(dim=dims)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def pointing_hits_regions(
    cams: Tensor, regions: Tensor, valid: Tensor | None = None, spatial_dims: int = 2
) -> Tensor:
    """Whether each map's peak lies on a region (the first maximum counts).

    Args:
        cams: maps ``[..., *S]``.
        regions: bool, broadcastable to ``cams``.
        valid: bool pixels that may hold the peak (broadcastable), or ``None`` for all.
        spatial_dims: how many trailing dimensions make one map (2, or 3 for volumes).

    Returns:
        ``[...]`` bool; ``False`` for a map whose peak is not above 0.
    """
    cams = cams.float()
    if valid is not None:
        cams = cams.masked_fill(~valid, float("-inf"))
    flat = cams.flatten(-spatial_dims)
    peak_value, peak = flat.max(dim=-1, keepdim=True)
    on_region = regions.expand(cams.shape).flatten(-spatial_dims).gather(-1, peak)
    return (on_region & (peak_value > 0)).squeeze(-1)


class _PerClassMean(Metric):
    """Mean of a per-image, per-class value over the images where the class is present.

    Args:
        classes: the output channel of each of the ``K`` maps passed to ``update``.
        kind: the model's output kind; ``"binary"`` reads label 1 as the foreground.
        ignore_index: a label value left out of the measurement.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        classes: Sequence[int],
        kind: str = "multiclass",
        ignore_index: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if len(classes) == 0:
            raise ValueError("Expected at least one class id in `classes`, but got none.")
        self.classes = [int(c) for c in classes]
        self.kind = kind
        self.ignore_index = ignore_index
        self.add_state("total", torch.zeros(len(self.classes)), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.classes)), dist_reduce_fx="sum")

    def _values(self, cams: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, cams: Tensor, masks: Tensor) -> None:
        values, present = self._values(cams, masks)
        self.total += (values.float() * present).sum(dim=0).to(self.total)
        self.count += present.sum(dim=0).to(self.count)

    def compute(self) -> Tensor:
        """Per-class mean ``[K]``; NaN for a class present in no image."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), float("nan"))


class CAMEnergyInside(_PerClassMean):
    """Mean share of CAM energy inside the class's ground-truth region, per class.

    Example:
        >>> metric = CAMEnergyInside(classes=[0, 1])
        >>> metric.update(torch.rand(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8)))
        >>> metric.compute().shape
        torch.Size([2])
    """

    def _values(self, cams: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        return cam_energy_inside(cams, masks, self.classes, self.kind, self.ignore_index)


class PointingGame(_PerClassMean):
    """Pointing-game hit rate per class: the CAM's peak lies on the class's ground truth.

    Args:
        classes: the output channel of each of the ``K`` maps passed to ``update``.
        tolerance: pixels of slack around the region (the original paper used 15 px at 224²).
        kind, ignore_index: as for :class:`CAMEnergyInside`.
    """

    def __init__(
        self,
        classes: Sequence[int],
        tolerance: int = 0,
        kind: str = "multiclass",
        ignore_index: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(classes, kind, ignore_index, **kwargs)
        if tolerance < 0:
            raise ValueError(f"Expected `tolerance` >= 0 pixels, but got {tolerance}.")
        self.tolerance = tolerance

    def _values(self, cams: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        return pointing_game_hits(
            cams, masks, self.classes, self.tolerance, self.kind, self.ignore_index
        )
