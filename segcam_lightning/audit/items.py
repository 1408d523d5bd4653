"""The audited items read again after the main pass, for the checks that run on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan


def read_images(plan: AuditPlan, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """The images ``[N, 3, H, W]`` in [0, 1] (the network's own inputs where the user's
    pipeline gives them) and masks ``[N, H, W]`` (``None`` without ground truth) of the
    dataset's ``indices``, read as the main pass read them (the checks after it read
    their images here)."""
    samples = [plan.dataset[i] for i in indices]
    samples = [s for s in samples if s["ok"]]
    if not samples:
        size = plan.size
        empty = torch.zeros(0, 3, *size)
        return empty, torch.zeros(0, *size, dtype=torch.int64) if plan.dataset.has_masks else None
    if "input" in samples[0]:  # the user's pipeline: the network's inputs as they come
        images = torch.stack([s["input"] for s in samples]).float()
    else:  # pictures (uint8) to [0, 1]; volumes are read in [0, 1] already
        pictures = torch.stack([s["image"] for s in samples])
        images = pictures.float().div_(255.0) if pictures.dtype == torch.uint8 else pictures.float()
    masks = torch.stack([s["mask"] for s in samples]) if plan.dataset.has_masks else None
    return images, masks
