"""One batch through every checkpoint's engine: CAMs, predictions and alignment values.

Images and volumes go the same way: a batch of images ``[B, 3, H, W]`` (uint8 RGB) or of volumes
``[B, C, D, H, W]`` (float32 in [0, 1]) gives maps ``[B, L, K, *S]`` and values over its pixels
or voxels ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcam_lightning.audit.settings import VALUE_NAMES
from segcam_lightning.cam import CAMEngine, Readout
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import class_regions
from segcam_lightning.cam.readout import SOFTMAX
from segcam_lightning.cam.windows import SlidingWindow, explain
from segcam_lightning.loading import LoadedCheckpoint
from segcam_lightning.metrics import (
    energy_inside_regions,
    ground_truth_regions,
    pointing_hits_regions,
)
from segcam_lightning.overlays import Painter

#: The panels' overlays: the blog's ``addWeighted(image, 0.4, JET(cam), 0.6)``, composed on the
#: maps' device (the render threads only lay the panels out and encode them).
PAINTER = Painter(0.4, cv2.COLORMAP_JET)
# cv2.cvtColor(..., COLOR_RGB2GRAY)'s weights of R, G and B.
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class AuditModel:
    """One checkpoint ready to explain: its engine, folder label and what its network is fed.

    ``gray``: the network takes one channel, so it is fed the images' luma (as cv2 converts
    colour to grey) instead of their three channels. ``mean``/``std``: the normalisation the
    network was trained with, per input channel in the order it is fed (one value: every
    channel), applied after the channel order and grey conversion; ``None`` feeds [0, 1].
    Volumes are fed their own channels: ``bgr`` and ``gray`` do not apply to them.
    ``readout``: how the output channels are read, resolved (its ``kind`` ``"multiclass"``,
    ``"binary"`` or ``"multilabel"``).
    ``layers``: the layer names as the outputs show them (the engine's may carry the
    LightningModule's network prefix). ``direct``: where the inputs come from when the user's
    own pipeline makes them (e.g. ``"--config run/config.yaml, split val"``): the data gives
    the network's input itself, and :meth:`prepare_input` passes it through. ``window``: the
    sliding windows the engine runs through (``--roi-size``), ``None`` for whole inputs.
    """

    label: str
    loaded: LoadedCheckpoint
    engine: CAMEngine
    bgr: bool
    gray: bool = False
    readout: Readout = SOFTMAX
    layers: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    direct: str | None = None
    window: SlidingWindow | None = None

    @property
    def net(self) -> nn.Module:
        return self.loaded.net

    @property
    def volumes(self) -> bool:
        """Whether the network takes volumes ``[B, C, D, H, W]``."""
        return self.loaded.dims == 3

    @property
    def input_description(self) -> str:
        """What the network is fed: ``"RGB"``, ``"BGR"`` or ``"gray"`` (a volume's channel
        count), then its normalisation and its sliding windows, e.g. ``"RGB, normalised: mean
        [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]"``."""
        windows = ""
        if self.window is not None:  # also what a resumed run must match
            w = self.window
            roi = w.roi_size if isinstance(w.roi_size, int) else "x".join(map(str, w.roi_size))
            windows = f", through {roi} windows (overlap {w.overlap:g}, {w.mode}, {w.weights})"
        return self._fed() + windows

    def _fed(self) -> str:
        if self.direct is not None:
            return f"as the data module gives it ({self.direct})"
        if self.volumes:
            channels = self.loaded.in_channels
            order = f"volume, {channels} channel{'s' if channels != 1 else ''}"
        else:
            order = "gray" if self.gray else "BGR" if self.bgr else "RGB"
        if self.mean is None and self.std is None:
            return order
        mean, std = list(self.mean or (0.0,)), list(self.std or (1.0,))
        return f"{order}, normalised: mean {mean}, std {std}"

    def prepare_input(self, images: Tensor) -> Tensor:
        """The network's input from RGB images ``[B, 3, H, W]`` in [0, 1], or from volumes
        ``[B, C, D, H, W]`` in [0, 1] (fed their channels as they are). A model fed by the
        user's pipeline (``direct``) gets its inputs as they are."""
        if self.direct is not None:
            return images
        per_channel = (1, -1) + (1,) * (images.ndim - 2)
        if self.volumes:
            x = images
        elif self.gray:
            luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            # Rounded to 8 bits, as a grey image read from disk is.
            x = (images * luma).sum(1, keepdim=True).mul_(255).round_().div_(255)
        else:
            x = images.flip(1) if self.bgr else images
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(per_channel)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(per_channel)
        return x


def alignment_values(
    cams: Tensor,
    raw_max: Tensor,
    predicted: Tensor,
    truth: Tensor | None,
    reference: Tensor | None = None,
    counts: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per image, layer and class: how the CAMs and predictions sit on the ground truth.

    Energy inside and the pointing game are :mod:`segcam_lightning.metrics`' own
    (:func:`~segcam_lightning.metrics.energy_inside_regions`,
    :func:`~segcam_lightning.metrics.pointing_hits_regions`), the values the callback's metrics
    average.

    Args:
        cams: ``[B, L, K, *S]`` maps in [0, 1] (the engine's ``cams``; ``S`` is ``H, W``, or
            ``D, H, W`` for volumes).
        raw_max: ``[B, L, K]`` maxima before normalisation.
        predicted: bool ``[B, K, *S]``, each class's predicted region at the maps' resolution
            (:func:`~segcam_lightning.cam.functional.class_regions` of the predictions).
        truth: bool ``[B, K, *S]``, each class's ground-truth region, or ``None``.
        reference: another checkpoint's ``cams`` of the same images, or ``None``.
        counts: :func:`region_counts` of ``predicted`` and ``truth``, if already counted.

    Returns:
        ``{name: [B, L, K] float32}`` for each of :data:`VALUE_NAMES`, NaN where undefined:
        ``gt_present`` (1/0), ``energy_inside`` (share of CAM energy inside the class's GT
        region) and ``pointing_game`` (1/0: the CAM's peak lies on the class) where the class is
        in the ground truth; ``raw_max``; ``pred_area`` and ``gt_area`` (fractions of the
        image's pixels or the volume's voxels); ``iou`` of the predicted and GT regions where
        their union is not empty; ``similarity_to_first`` (cosine similarity with
        ``reference``'s map).
    """
    batch, num_layers, num_classes = raw_max.shape
    shape = (batch, num_layers, num_classes)
    spatial = cams.ndim - 3
    nan = torch.full(shape, float("nan"), device=cams.device)
    pixels = predicted[0, 0].numel()
    # Counts of boolean maps, not means of float copies, and one pass over all layers: this
    # runs once per batch beside the engine (benchmarks/RESULTS.md, Implementation notes).
    counts = counts if counts is not None else region_counts(predicted, truth, spatial)
    pred_count = counts["predicted"]
    per_class = {"pred_area": pred_count / pixels}
    values = {name: nan for name in VALUE_NAMES}
    values["raw_max"] = raw_max.float()
    if truth is not None:
        gt_count, inter, union = counts["truth"], counts["intersection"], counts["union"]
        per_class["iou"] = torch.where(union > 0, inter / union.clamp_min(1), float("nan"))
        per_class["gt_area"] = gt_count / pixels
        present = (gt_count > 0).unsqueeze(1)  # [B, 1, K]
        regions = truth.unsqueeze(1)  # every layer's maps against the same regions
        share = energy_inside_regions(cams, regions, spatial_dims=spatial)
        hits = pointing_hits_regions(cams, regions, spatial_dims=spatial).float()
        values["energy_inside"] = torch.where(present, share, float("nan"))
        values["pointing_game"] = torch.where(present, hits, float("nan"))
        per_class["gt_present"] = (gt_count > 0).float()
    for name, value in per_class.items():
        values[name] = value.unsqueeze(1).expand(shape).float()
    if reference is not None:
        values["similarity_to_first"] = F.cosine_similarity(
            cams.flatten(-spatial).float(), reference.flatten(-spatial).float(), dim=-1
        )
    return values


def region_counts(predicted: Tensor, truth: Tensor | None, spatial: int) -> dict[str, Tensor]:
    """Pixels (voxels) per image and class ``[B, K]`` (int32) of the ``predicted`` regions
    and, with ``truth``, of the ground truth, their intersection and their union:
    :data:`~segcam_lightning.audit.tallies.COUNT_NAMES`."""
    pred_count = _count(predicted, spatial)
    if truth is None:
        return {"predicted": pred_count}
    gt_count = _count(truth, spatial)
    inter = _count(predicted & truth, spatial)
    union = pred_count + gt_count - inter
    return {"predicted": pred_count, "truth": gt_count, "intersection": inter, "union": union}


def confusion_counts(
    predicted: Tensor, masks: Tensor, num_labels: int, ignore_index: int | None = None
) -> Tensor:
    """Pixels (voxels) of each (true label, predicted label) pair per image ``[B, n, n]``
    (int64; row: the ground truth, column: the prediction) for labels ``[B, *S]`` in
    ``0..n-1``; a pixel whose mask label is outside that range or ``ignore_index`` counts
    nowhere."""
    batch = masks.shape[0]
    truth = masks.reshape(batch, -1).long()
    guess = predicted.reshape(batch, -1).long().clamp(0, num_labels - 1)
    valid = (truth >= 0) & (truth < num_labels)
    if ignore_index is not None:
        valid &= truth != ignore_index
    pair = truth.clamp(0, num_labels - 1) * num_labels + guess
    offset = torch.arange(batch, device=pair.device).view(-1, 1) * num_labels**2
    counts = torch.bincount((pair + offset)[valid], minlength=batch * num_labels**2)
    return counts.view(batch, num_labels, num_labels)


def _count(regions: Tensor, spatial: int) -> Tensor:
    """Pixels (voxels) in each boolean map ``[..., *S]`` of ``spatial`` dimensions; int32 sums
    are ~3x faster than int64 ones."""
    return regions.sum(dim=tuple(range(-spatial, 0)), dtype=torch.int32)


@dataclass
class ModelBatch:
    """One checkpoint's results on a batch, on the CPU (``S``: ``H, W`` or ``D, H, W``)."""

    cams: np.ndarray  # [B, L, K, *S] float32 in [0, 1]
    preds: np.ndarray  # [B, *S] int64 mask labels at the input's resolution, for display
    values: dict[str, np.ndarray]  # name -> [B, L, K] float32
    #: [B] bool: the image's logits are all finite (NaN or inf: the checkpoint is broken there).
    finite: np.ndarray | None = None
    #: name -> [B, K] pixel counts (:func:`region_counts`) and, for multiclass and binary
    #: outputs, ``"confusion"`` ``[B, n, n]`` (:func:`confusion_counts`, ``n`` labels);
    #: ``None`` without ground truth.
    counts: dict[str, np.ndarray] | None = None
    #: Images (not volumes): each map blended over its image as the panels show it, RGB uint8
    #: ``[B, L, K, H, W, 3]``, composed on the maps' device (:data:`PAINTER`).
    overlays: np.ndarray | None = None


@dataclass
class BatchResult:
    """A batch after every checkpoint's engine call, on the CPU, ready to write."""

    indices: list[int]
    names: list[str]
    sources: list[str]
    images: np.ndarray  # [B, H, W, 3] uint8 RGB; volumes: [B, D, H, W] uint8 grey (channel 0)
    masks: np.ndarray | None  # [B, *S] int64 mask labels
    models: list[ModelBatch]
    skipped: list[dict[str, Any]]
    truth: np.ndarray | None = None  # [B, K, *S] bool: the explained classes' GT regions
    volumes: bool = False  # S is D, H, W

    def select(self, keep: Sequence[bool]) -> BatchResult:
        """The images where ``keep`` is true (skipped entries are filtered by the caller)."""
        rows = np.flatnonzero(np.asarray(keep, dtype=bool))
        return BatchResult(
            indices=[self.indices[i] for i in rows],
            names=[self.names[i] for i in rows],
            sources=[self.sources[i] for i in rows],
            images=self.images[rows],
            masks=self.masks[rows] if self.masks is not None else None,
            models=[
                ModelBatch(
                    m.cams[rows],
                    m.preds[rows],
                    {k: v[rows] for k, v in m.values.items()},
                    m.finite[rows] if m.finite is not None else None,
                    {k: v[rows] for k, v in m.counts.items()} if m.counts is not None else None,
                    m.overlays[rows] if m.overlays is not None else None,
                )
                for m in self.models
            ],
            skipped=self.skipped,
            truth=self.truth[rows] if self.truth is not None else None,
            volumes=self.volumes,
        )


def explain_batch(
    models: Sequence[AuditModel],
    batch: dict[str, Any],
    classes: Sequence[int],
    device: torch.device,
) -> BatchResult:
    """Run every checkpoint's engine on the readable images of a batch.

    Args:
        models: the checkpoints, each with its engine (on ``device``).
        batch: a collated batch of :class:`AuditDataset` samples.
        classes: the class ids to explain.
        device: where the models are.

    Returns:
        A :class:`BatchResult` with the CAMs, predictions and :func:`alignment_values` of each
        checkpoint, and the batch's skipped items.
    """
    ok = torch.as_tensor(batch["ok"], dtype=torch.bool).cpu()
    indices = [int(i) for i in torch.as_tensor(batch["index"]).tolist()]
    skipped = _skipped(batch, ok, indices)
    keep = ok.nonzero().flatten().tolist()
    images = batch["image"][keep]
    spatial = images.ndim - 2
    masks = batch["mask"][keep].to(device, non_blocking=True) if "mask" in batch else None
    readout = models[0].readout
    kind = readout.kind
    truth = None
    if masks is not None:
        truth = ground_truth_regions(masks, list(classes), kind, spatial_dims=spatial)[0]
    results: list[ModelBatch] = []
    shown = _display(images)
    if keep:
        x = images.to(device, non_blocking=True).float()
        if images.dtype == torch.uint8:
            x = x.div_(255.0)
        # The user's pipeline gives the network's input itself; the audit's own data gives
        # pictures that each checkpoint's input is made from.
        given = batch["input"][keep].to(device, non_blocking=True) if "input" in batch else None
        pictures = shown.to(device) if spatial == 2 else None  # the panels' images
        reference = None
        for model in models:
            fed = given if given is not None else model.prepare_input(x)
            result = explain(model.engine, model.window, fed, classes=list(classes), masks=masks)
            preds = FC.resize_labels(readout.predicted(result.logits), x.shape[2:])
            num_outputs = result.logits.shape[1]
            predicted = class_regions(preds, list(classes), num_outputs, kind, spatial_dims=spatial)
            counts = region_counts(predicted, truth, spatial)
            if masks is not None and kind != "multilabel":
                labels = 2 if kind == "binary" else num_outputs
                counts["confusion"] = confusion_counts(preds, masks, labels, readout.ignore_index)
            values = alignment_values(
                result.cams, result.raw_max, predicted, truth, reference, counts
            )
            reference = result.cams if reference is None else reference
            results.append(
                ModelBatch(
                    cams=result.cams.cpu().numpy(),
                    preds=FC.label_map(preds, kind, spatial).cpu().numpy(),
                    values={k: v.cpu().numpy() for k, v in values.items()},
                    finite=result.logits.flatten(1).isfinite().all(1).cpu().numpy(),
                    counts=(
                        {k: v.cpu().numpy() for k, v in counts.items()}
                        if truth is not None
                        else None
                    ),
                    overlays=_overlays(pictures, result.cams),
                )
            )
    return BatchResult(
        indices=[indices[i] for i in keep],
        names=[batch["name"][i] for i in keep],
        sources=[batch["source"][i] for i in keep],
        images=shown.cpu().numpy(),
        masks=masks.cpu().numpy() if masks is not None else None,
        models=results,
        skipped=skipped,
        truth=truth.cpu().numpy() if truth is not None else None,
        volumes=spatial == 3,
    )


def _overlays(pictures: Tensor | None, cams: Tensor) -> np.ndarray | None:
    """The panels' overlays ``[B, L, K, H, W, 3]`` on the CPU, composed where ``cams`` are
    (``pictures``: the images ``[B, H, W, 3]`` there); ``None`` for volumes."""
    return None if pictures is None else PAINTER.overlays(pictures, cams).cpu().numpy()


def _skipped(batch: dict[str, Any], ok: Tensor, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The batch's unreadable items, each with its index, name, source, path and reason."""
    return [
        {
            "index": indices[i],
            "name": batch["name"][i],
            "source": batch["source"][i],
            "path": batch["path"][i],
            "reason": r,
        }
        for i, r in enumerate(batch["reason"])
        if not ok[i]
    ]


def _display(images: Tensor) -> Tensor:
    """What panels show: images ``[B, 3, H, W]`` uint8 as ``[B, H, W, 3]``; volumes
    ``[B, C, D, H, W]`` in [0, 1] as their first channel in 8-bit grey ``[B, D, H, W]``."""
    if images.ndim == 4:
        return images.permute(0, 2, 3, 1).contiguous()
    volumes = images[:, 0].float()
    if volumes.numel() and (volumes.amin() < 0 or volumes.amax() > 1):
        # z-scored (or otherwise unscaled) volumes: one window per volume, for every view
        low = volumes.amin(dim=(1, 2, 3), keepdim=True)
        span = volumes.amax(dim=(1, 2, 3), keepdim=True) - low
        volumes = torch.where(span > 0, (volumes - low) / span.clamp_min(1e-12), 0.0)
    return volumes.clamp(0, 1).mul(255).round().to(torch.uint8)
