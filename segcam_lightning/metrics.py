"""How well CAMs sit on the ground truth: torchmetrics ``Metric``s over a functional core.

Both metrics take CAMs ``[B, K, H, W]`` (one map per class in ``classes``), integer masks
``[B, H, W]`` and the class ids the ``K`` maps belong to. An image counts for a class only if the
class is in its ground truth; a class seen in no image computes to NaN ("no evidence"), not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def _class_regions(masks: torch.Tensor, classes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(list(classes), device=masks.device).view(1, -1, 1, 1)
    if like.ndim != 4 or masks.ndim != 3 or like.shape[0] != masks.shape[0]:
        raise ValueError(
            f"Expected CAMs [B, K, H, W] and masks [B, H, W], but got {tuple(like.shape)} and"
            f" {tuple(masks.shape)}."
        )
    if like.shape[1] != ids.shape[1] or like.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"Expected {ids.shape[1]} maps (one per class in {list(classes)}) of size"
            f" {tuple(masks.shape[-2:])}, but got CAMs of shape {tuple(like.shape)}."
        )
    return masks.unsqueeze(1) == ids


def cam_energy_inside(
    cams: torch.Tensor, masks: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of each map's energy (sum of values) that falls inside its class's GT region.

    Returns:
        ``(share [B, K], valid [B, K])``: share in [0, 1] (0 for an all-zero map); ``valid`` is
        whether the class is present in the image's ground truth.
    """
    region = _class_regions(masks, classes, cams)
    return energy_inside_regions(cams, region), region.flatten(-2).any(dim=-1)


def pointing_game_hits(
    cams: torch.Tensor, masks: torch.Tensor, classes: Sequence[int], tolerance: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each map's maximum lies on its class (within ``tolerance`` pixels).

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016. An all-zero map
    points nowhere and misses.

    Returns:
        ``(hits [B, K], valid [B, K])`` as booleans; ``valid`` as in :func:`cam_energy_inside`.
    """
    region = _class_regions(masks, classes, cams)
    present = region.flatten(-2).any(dim=-1)
    if tolerance > 0:
        size = 2 * tolerance + 1
        region = F.max_pool2d(region.float(), size, stride=1, padding=tolerance) > 0
    return pointing_hits_regions(cams, region), present


def energy_inside_regions(cams: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """:func:`cam_energy_inside`'s share for given regions: maps ``[..., H, W]`` (negative values
    count as 0) and boolean ``regions`` broadcastable to them; returns ``[...]``."""
    cams = cams.float().clamp_min(0)
    total = cams.sum(dim=(-2, -1))
    inside = (cams * regions).sum(dim=(-2, -1))
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def pointing_hits_regions(cams: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """:func:`pointing_game_hits`' hits for given regions: maps ``[..., H, W]`` and boolean
    ``regions`` broadcastable to them; returns ``[...]`` bool (the first maximum counts)."""
    flat = cams.float().flatten(-2)
    peak_value, peak = flat.max(dim=-1, keepdim=True)
    on_region = regions.expand(cams.shape).flatten(-2).gather(-1, peak)
    return (on_region & (peak_value > 0)).squeeze(-1)


class _PerClassMean(Metric):
    """Mean of a per-image, per-class value over the images where the class is present."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, classes: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(classes) == 0:
            raise ValueError("Expected at least one class id in `classes`, but got none.")
        self.classes = [int(c) for c in classes]
        self.add_state("total", torch.zeros(len(self.classes)), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.classes)), dist_reduce_fx="sum")

    def _values(self, cams: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, cams: torch.Tensor, masks: torch.Tensor) -> None:
        values, valid = self._values(cams, masks)
        self.total += (values.float() * valid).sum(dim=0).to(self.total)
        self.count += valid.sum(dim=0).to(self.count)

    def compute(self) -> torch.Tensor:
        """Per-class mean ``[K]``; NaN for a class present in no image."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), float("nan"))


class CAMEnergyInside(_PerClassMean):
    """Mean share of CAM energy inside the class's ground-truth region, per class.

    Args:
        classes: the class id of each of the ``K`` maps passed to ``update``.

    Example:
        >>> metric = CAMEnergyInside(classes=[0, 1])
        >>> metric.update(torch.rand(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8)))
        >>> metric.compute().shape
        torch.Size([2])
    """

    def _values(self, cams: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cam_energy_inside(cams, masks, self.classes)


class PointingGame(_PerClassMean):
    """Pointing-game hit rate per class: the CAM's peak lies on the class's ground truth.

    Args:
        classes: the class id of each of the ``K`` maps passed to ``update``.
        tolerance: pixels of slack around the region (the original paper used 15 px at 224²).
    """

    def __init__(self, classes: Sequence[int], tolerance: int = 0, **kwargs) -> None:
        super().__init__(classes, **kwargs)
        if tolerance < 0:
            raise ValueError(f"Expected `tolerance` >= 0 pixels, but got {tolerance}.")
        self.tolerance = tolerance

    def _values(self, cams: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pointing_game_hits(cams, masks, self.classes, self.tolerance)
