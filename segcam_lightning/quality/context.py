"""The objects-alone test: does a class keep its label when its objects are shown alone?

A CAM says where a model looks; this test asks the model directly whether a class's objects
carry the class. For each class, every pixel outside its ground-truth objects is flattened to
the mean colour of the pixels it replaces (:func:`~segcam_lightning.quality.functional.isolate`)
and the model predicts again; the score is the share of the class's segmented pixels (ground
truth and predicted on the untouched image) that it still predicts as the class.

A model that recognises a plant by its shape keeps it (0.96-0.99 for the plant classes of the
default run's clean twins); a model that reads the plant's class from the soil around it loses
it (0.00 for the planted class on both measured shortcut runs:
``benchmarks/quality/RESULTS.md``, "Planted shortcut"). No map, layer or method is involved, so
the test is also the check of what a layer's maps claim.

Cost: one forward pass of the images that hold a class, per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from segcam_lightning.cam.functional import class_regions, predicted_masks
from segcam_lightning.cam.layers import force_eager
from segcam_lightning.cam.readout import Readout
from segcam_lightning.networks import example_logits
from segcam_lightning.quality import functional as QF

__all__ = ["ObjectsAloneRow", "objects_alone", "objects_alone_report", "scored_classes"]


def objects_alone(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    classes: Sequence[int] | None = None,
    *,
    readout: Readout | None = None,
    output_adapter: Callable[[Any], Tensor] | None = None,
    batch_size: int = 16,
    logits: Tensor | None = None,
    lockstep: bool = False,
) -> Tensor:
    r"""Share of each class's segmented pixels the model keeps when the class's objects are
    shown alone.

    Args:
        model: the segmentation network (never modified: eval mode, no graph, flags and RNG
            restored; compiled code runs eagerly). Runs under whatever autocast context the
            caller opened.
        images: ``[N, C, H, W]`` or volumes ``[N, C, D, H, W]``.
        masks: ground truth: labels ``[N, *S]`` or per-class masks ``[N, K_out, *S]``, at the
            images' size.
        classes: output channels to test; default all (``(0,)`` for a binary model).
        readout: how logits are read, as the engine does (default
            :class:`~segcam_lightning.cam.Readout`\ ``()``); its ``ignore_index`` labels
            unlabelled pixels: they belong to no object, so they are flattened, and they are
            not scored.
        output_adapter: ``f(model_output) -> logits``.
        batch_size: images per forward pass.
        logits: the model's logits on the untouched ``images`` when the caller has them (saves
            one forward pass).
        lockstep: run every class's forward pass on all the images, not only on those that
            hold and predict the class (the others are discarded), so that processes calling
            this on shards of a batch run the same passes: sharded strategies (FSDP, ZeRO-3)
            need it.

    Returns:
        ``[N, len(classes)]`` float: the share kept, NaN where the class has no pixel that is
        both in the ground truth and predicted (not counted).
    """
    kept, _ = _objects_alone(
        model,
        images,
        masks,
        classes,
        readout=readout,
        output_adapter=output_adapter,
        batch_size=batch_size,
        logits=logits,
        lockstep=lockstep,
    )
    return kept


@dataclass(frozen=True)
class ObjectsAloneRow:
    """One class's objects-alone result.

    Attributes:
        class_index, class_name: the output channel and its name.
        num_images: images where the class is both in the ground truth and predicted.
        kept_alone: mean share of its segmented pixels kept alone over those images (NaN
            without any).
        iou: the class's IoU over all the images (pooled, at the logits' resolution).
        area: its mean ground-truth share of those images.
        kept_threshold, iou_threshold: the rule's thresholds
            (:func:`~segcam_lightning.quality.functional.context_suspects`).
        verdict: ``"suspect"`` (segmented well, loses its label alone), ``"keeps"`` (judged,
            not suspect) or ``""`` (not judged: too few images, too low an IoU, background).
        labels: e.g. ``(("checkpoint", "last.ckpt"),)``.
    """

    class_index: int
    class_name: str
    num_images: int
    kept_alone: float
    iou: float
    area: float
    kept_threshold: float
    iou_threshold: float
    verdict: str
    labels: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain values, labels first."""
        values = asdict(self)
        labels = dict(values.pop("labels"))
        return {**labels, **values}


def objects_alone_report(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    classes: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    kept_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    readout: Readout | None = None,
    output_adapter: Callable[[Any], Tensor] | None = None,
    batch_size: int = 16,
    labels: dict[str, str] | None = None,
) -> list[ObjectsAloneRow]:
    """:func:`objects_alone` per class with the rule's verdict, as ``explain.py
    --objects-alone`` reports it (arguments as there; ``labels`` are added to every row).

    Returns:
        One row per class, in class order (none without images).
    """
    if images.shape[0] == 0:
        return []
    kept, regions = _objects_alone(
        model,
        images,
        masks,
        classes,
        readout=readout,
        output_adapter=output_adapter,
        batch_size=batch_size,
    )
    truth, predicted = regions.truth.flatten(2), regions.predicted_before.flatten(2)
    counted, iou, area = QF.segmentation_statistics(truth, predicted)
    counted &= ~kept.isnan()
    rule = {"kept_threshold": kept_threshold, "iou_threshold": iou_threshold}
    suspects = {s.class_index for s in QF.context_suspects(kept, counted, iou, area, **rule)}
    counts, means, judged = QF.judged_classes(kept, counted, area)
    _, areas, _ = QF.judged_classes(area, counted, area)
    tag = tuple((str(a), str(b)) for a, b in (labels or {}).items())
    rows = []
    for k, class_index in enumerate(regions.wanted):
        q, n = float(iou[k]), int(counts[k])
        verdict = ""
        if k in suspects:
            verdict = "suspect"
        elif judged[k] and q >= iou_threshold:  # NaN compares False
            verdict = "keeps"
        rows.append(
            ObjectsAloneRow(
                class_index=class_index,
                class_name=QF.class_name(class_names, class_index),
                num_images=n,
                kept_alone=float(means[k]) if n else float("nan"),
                iou=q,
                area=float(areas[k]) if n else float("nan"),
                verdict=verdict,
                labels=tag,
                **rule,
            )
        )
    return rows


def _objects_alone(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    classes: Sequence[int] | None,
    *,
    readout: Readout | None,
    output_adapter: Callable[[Any], Tensor] | None,
    batch_size: int,
    logits: Tensor | None = None,
    lockstep: bool = False,
) -> tuple[Tensor, _Regions]:
    """The share kept ``[N, K]`` and the regions it was scored on."""
    if images.ndim not in (4, 5):
        raise ValueError(
            f"Expected images [N, C, H, W] or volumes [N, C, D, H, W], but got "
            f"{list(images.shape)}."
        )
    device = next((p.device for p in model.parameters()), images.device)
    images, masks = images.to(device), masks.to(device)
    if logits is None:
        logits = eager_logits(model, images, output_adapter, batch_size)
    logits = logits.float()
    read = (readout or Readout()).resolved(logits.shape[1])
    wanted = list(classes) if classes is not None else list(range(logits.shape[1]))
    regions = _Regions(
        masks, logits, wanted, read.kind, read.threshold, read.ignore_index, images.ndim - 2
    )
    before = (regions.truth & regions.predicted_before).flatten(2)  # [N, K, P]
    kept = torch.full(before.shape[:2], float("nan"), device=device)
    for k in range(len(wanted)):
        counted = before[:, k].any(-1)
        index = torch.arange(len(images), device=device) if lockstep else counted.nonzero()[:, 0]
        if index.numel() == 0:
            continue
        alone = QF.isolate(images[index], regions.objects[index, k])
        out = eager_logits(model, alone, output_adapter, batch_size).float()
        after = regions.predicted(out, index)
        share = QF.kept_share(before[index, k], after[:, k].flatten(1))
        kept[index, k] = torch.where(counted[index], share, float("nan"))
    return kept, regions


def scored_classes(
    masks: Tensor, logits: Tensor, classes: Sequence[int], readout: Readout | None = None
) -> Tensor:
    """bool ``[N, len(classes)]``: where :func:`objects_alone` scores each class (its ground
    truth and the prediction from ``logits`` share a pixel); elsewhere its share is NaN."""
    read = (readout or Readout()).resolved(logits.shape[1])
    spatial = logits.ndim - 2
    regions = _Regions(
        masks, logits.float(), list(classes), read.kind, read.threshold, read.ignore_index, spatial
    )
    return (regions.truth & regions.predicted_before).flatten(2).any(-1)


class _Regions:
    """A batch's regions for the test: each class's objects at the images' size (what is
    kept), its ground truth and prediction at the logits' size (what is scored), ignored
    pixels left out of all three."""

    def __init__(
        self,
        masks: Tensor,
        logits: Tensor,
        wanted: list[int],
        kind: str,
        threshold: float,
        ignore_index: int | None,
        spatial: int,
    ) -> None:
        self.wanted, self.kind, self.threshold, self.spatial = wanted, kind, threshold, spatial
        self.num_outputs, size = logits.shape[1], tuple(logits.shape[2:])
        options = {"spatial_dims": spatial}
        self.objects = class_regions(masks, wanted, self.num_outputs, kind, **options)
        self.truth = class_regions(masks, wanted, self.num_outputs, kind, size=size, **options)
        self.valid: Tensor | None = None
        if ignore_index is not None and masks.ndim == spatial + 1:
            ignored = (masks == ignore_index).long()  # as binary labels: 1 = ignored
            self.objects &= ~ignored.bool().unsqueeze(1)
            self.valid = ~class_regions(ignored, [0], 1, "binary", size=size, **options)
            self.truth &= self.valid
        self.predicted_before = self.predicted(logits)

    def predicted(self, logits: Tensor, index: Tensor | None = None) -> Tensor:
        """bool ``[n, K, *size]``: where each class is predicted (on valid pixels), for the
        logits of the batch's images ``index`` (default all)."""
        preds = predicted_masks(logits, self.kind, self.threshold)
        out = class_regions(
            preds, self.wanted, self.num_outputs, self.kind, spatial_dims=self.spatial
        )
        if self.valid is None:
            return out
        return out & (self.valid if index is None else self.valid[index])


def eager_logits(
    model: nn.Module,
    images: Tensor,
    output_adapter: Callable[[Any], Tensor] | None,
    batch_size: int,
) -> Tensor:
    """The model's logits in batches (:func:`~segcam_lightning.networks.example_logits`: eval
    mode, no graph, inputs cloned, flags and RNG restored), compiled code run eagerly."""
    with force_eager():
        parts = [
            example_logits(model, images[i : i + batch_size], output_adapter)
            for i in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(parts)
