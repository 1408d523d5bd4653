"""The objects-alone test: does a class keep its label when its objects are shown alone?

A CAM says where a model looks; this test asks the model directly whether a class's objects
carry the class. For each class, every pixel outside its ground-truth objects is flattened to
the mean colour of the pixels it replaces (:func:`~segcam_lightning.quality.functional.isolate`)
and the model predicts again; the score is the share of the class's segmented pixels (ground
truth and predicted on the untouched image) that it still predicts as the class.

A model that recognises a plant by its shape keeps it (0.92-0.98 for the plant classes of the
default run's clean twins); a model that reads the plant's class from the soil around it loses
it (0.00 for the planted class on both measured shortcut runs: ``docs/QUALITY.md``, "Planted
shortcut"). No map, layer or method is involved, so the test is also the check of what a
layer's maps claim.

Cost: one forward pass of the images that hold a class, per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segcam_lightning.cam import default_output_adapter
from segcam_lightning.cam.functional import class_regions, predicted_masks, resolve_output_kind
from segcam_lightning.cam.layers import eval_mode, preserve_rng
from segcam_lightning.quality import functional as QF

__all__ = ["objects_alone"]


def objects_alone(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    classes: Sequence[int] | None = None,
    *,
    output_kind: str = "auto",
    threshold: float = 0.5,
    ignore_index: int | None = None,
    output_adapter: Callable[[Any], Tensor] | None = None,
    batch_size: int = 16,
    logits: Tensor | None = None,
) -> Tensor:
    """Share of each class's segmented pixels the model keeps when the class's objects are
    shown alone.

    Args:
        model: the segmentation network (never modified: eval mode, no graph, flags and RNG
            restored). Runs under whatever autocast context the caller opened.
        images: ``[N, C, H, W]`` or volumes ``[N, C, D, H, W]``.
        masks: ground truth: labels ``[N, *S]`` or per-class masks ``[N, K_out, *S]``, at the
            images' size.
        classes: output channels to test; default all (``(0,)`` for a binary model).
        output_kind, threshold: how logits are read, as the engine does.
        ignore_index: mask label of unlabelled pixels: they belong to no object, so they are
            flattened, and they are not scored.
        output_adapter: ``f(model_output) -> logits``.
        batch_size: images per forward pass.
        logits: the model's logits on the untouched ``images`` when the caller has them (saves
            one forward pass).

    Returns:
        ``[N, len(classes)]`` float: the share kept, NaN where the class has no pixel that is
        both in the ground truth and predicted (not counted).
    """
    if images.ndim not in (4, 5):
        raise ValueError(
            f"Expected images [N, C, H, W] or volumes [N, C, D, H, W], but got "
            f"{list(images.shape)}."
        )
    adapter = output_adapter or default_output_adapter
    device = next((p.device for p in model.parameters()), images.device)
    images, masks = images.to(device), masks.to(device)
    spatial = images.ndim - 2

    def forward(batch: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.no_grad(), eval_mode(model), preserve_rng(device):
            parts = [
                adapter(model(batch[i : i + batch_size])).float()
                for i in range(0, batch.shape[0], batch_size)
            ]
        return torch.cat(parts)

    if logits is None:
        logits = forward(images)
    logits = logits.float()
    num_outputs, size = logits.shape[1], tuple(logits.shape[2:])
    kind = resolve_output_kind(output_kind, num_outputs)
    wanted = list(classes) if classes is not None else list(range(num_outputs))

    def predicted(out: Tensor) -> Tensor:
        preds = predicted_masks(out, kind, threshold)
        return class_regions(preds, wanted, num_outputs, kind, spatial_dims=spatial)

    # Objects at the images' size (what is kept), scored at the logits' (what is predicted).
    objects = class_regions(masks, wanted, num_outputs, kind, spatial_dims=spatial)
    truth = class_regions(masks, wanted, num_outputs, kind, size=size, spatial_dims=spatial)
    if ignore_index is not None and masks.ndim == spatial + 1:
        ignored = (masks == ignore_index).long()  # as binary labels: 1 = ignored
        objects &= ~ignored.bool().unsqueeze(1)
        truth &= ~class_regions(ignored, [0], 1, "binary", size=size, spatial_dims=spatial)
    before = (truth & predicted(logits)).flatten(2)  # [N, K, P]
    kept = torch.full(before.shape[:2], float("nan"), device=device)
    for k in range(len(wanted)):
        index = before[:, k].any(-1).nonzero().flatten()
        if index.numel() == 0:
            continue
        alone = QF.isolate(images[index], objects[index, k])
        after = predicted(forward(alone))[:, k].flatten(1)
        kept[index, k] = QF.kept_share(before[index, k], after)
    return kept
