"""Pure tensor maths of the CAM engine: channel weights, weighted sum, normalisation, upsampling.

Every function here is stateless and needs no graph (callers run it under ``torch.no_grad``),
works on any device and broadcasts over leading dimensions, so the same code serves one class
(``[B, C, h, w]``) or all classes at once (``[K, B, C, h, w]``). Shapes below use ``...`` for those
leading dimensions, ``C`` for channels and ``*s`` for the hooked layer's spatial size: ``h, w``
for images, ``d, h, w`` for volumes. Functions that reduce over the spatial dimensions take
``spatial_dims`` (2 for images, the default, 3 for volumes) and reduce over that many trailing
dimensions, so a map's weights are averaged over all its ``h·w`` pixels or ``d·h·w`` voxels.

Inputs are expected in float32: the engine casts activations and gradients before calling here
(autocast runs the model in bf16/fp16, the maps must not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORMALIZE_MODES",
    "OUTPUT_KINDS",
    "class_regions",
    "eigencam_map",
    "elementwise_sum",
    "gradcam_weights",
    "gradcampp_weights",
    "grid_label",
    "guided_gradcam",
    "hirescam_weights",
    "label_map",
    "layercam_weights",
    "minmax_scale",
    "normalize_cams",
    "predicted_classes",
    "predicted_masks",
    "resize_labels",
    "resolve_output_kind",
    "safe_divide",
    "scorecam_weights",
    "shape_label",
    "spatial_dims_of",
    "threshold_logit",
    "upsample",
    "weighted_sum",
    "xgradcam_weights",
]

NormalizeMode = Literal["minmax", "global", "none"]
NORMALIZE_MODES: tuple[str, ...] = ("minmax", "global", "none")

OutputKind = Literal["auto", "multiclass", "binary", "multilabel"]
#: How a model's output channels turn into classes: ``"multiclass"`` (a softmax over K >= 2
#: channels, one class per pixel), ``"binary"`` (one sigmoid channel, its foreground),
#: ``"multilabel"`` (K independent sigmoids, classes may overlap) or ``"auto"`` (one channel is
#: binary, more are multiclass; multi-label cannot be told from the shape).
OUTPUT_KINDS: tuple[str, ...] = ("auto", "multiclass", "binary", "multilabel")

#: A range below this fraction of the map's magnitude is float32 rounding noise (~100 ulps):
#: such a map is treated as constant. Relative, so it does not depend on the map's scale.
RELATIVE_TOLERANCE = 1e-5
#: Smallest normal float32: below it a map is zero for all purposes (and division would overflow).
ABSOLUTE_TOLERANCE = torch.finfo(torch.float32).tiny

#: Spatial dimensions the engine handles: images ``H, W`` and volumes ``D, H, W``.
SPATIAL_DIMS: tuple[int, ...] = (2, 3)
_SPATIAL_NAMES = {2: ("H", "W"), 3: ("D", "H", "W")}


def shape_label(*leading: str, spatial_dims: int = 2) -> str:
    """A shape for messages and docs: ``shape_label("B", "K", spatial_dims=3)`` is
    ``"[B, K, D, H, W]"``."""
    return "[" + ", ".join((*leading, *_SPATIAL_NAMES[spatial_dims])) + "]"


def grid_label(size: Sequence[int]) -> str:
    """A grid's size for messages: ``"16×16"``, or ``"4×16×16"`` for a volume."""
    return "×".join(str(side) for side in size)


def spatial_dims_of(logits: Tensor) -> int:
    """The number of spatial dimensions of logits ``[B, K, H, W]`` (2) or ``[B, K, D, H, W]`` (3).

    Raises:
        ValueError: for anything else; the message names both accepted shapes.
    """
    if not isinstance(logits, Tensor) or logits.ndim - 2 not in SPATIAL_DIMS:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected logits of shape [B, K, H, W], but got {got}; volumes take [B, K, D, H, W]."
        )
    return logits.ndim - 2


def _spatial(spatial_dims: int) -> tuple[int, ...]:
    """The trailing ``spatial_dims`` dimensions, as negative indices for reductions."""
    return tuple(range(-spatial_dims, 0))


def predicted_classes(logits: Tensor) -> Tensor:
    """Each pixel's highest-scoring class: ``[B, K, *S]`` → ``[B, *S]`` int64 (``S`` = ``H, W``
    or ``D, H, W``).

    Equal to ``logits.argmax(dim=1)``, ties to the first class included, but through
    ``max(dim=1)``, which is about ten times faster over the class dimension on the CPU
    (benchmarks/RESULTS.md, "Implementation notes").
    """
    return logits.max(dim=1).indices


def resolve_output_kind(kind: str, num_outputs: int) -> str:
    """The output kind to use for a model with ``num_outputs`` channels.

    ``"auto"`` is ``"binary"`` for one channel and ``"multiclass"`` for more; an explicit kind is
    checked against the channel count.

    Raises:
        ValueError: for an unknown kind, ``"multiclass"`` with one channel (its softmax is the
            constant 1, so every gradient is zero) or ``"binary"`` with more than one.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"Expected the output kind to be one of {OUTPUT_KINDS}, but got {kind!r}.")
    if kind == "auto":
        return "binary" if num_outputs == 1 else "multiclass"
    if kind == "multiclass" and num_outputs == 1:
        raise ValueError(
            "kind='multiclass' needs at least two output channels, but the model has one: "
            "the softmax of one channel is the constant 1, so every score has zero gradient and "
            "every CAM would be blank. For a one-channel sigmoid model pass "
            "Readout(kind='binary') (or 'auto')."
        )
    if kind == "binary" and num_outputs != 1:
        raise ValueError(
            f"kind='binary' expects one output channel (the foreground logit), but the "
            f"model has {num_outputs}. Pass Readout(kind='multiclass') for a softmax over the "
            "channels or 'multilabel' for independent sigmoids."
        )
    return kind


def threshold_logit(threshold: float) -> float:
    """The logit of a probability threshold, ``log(t / (1 - t))`` (0 for 0.5).

    A pixel is predicted for a sigmoid channel when its probability exceeds ``threshold``, i.e.
    when its logit exceeds this value.

    Raises:
        ValueError: unless ``threshold`` is a number in ``(0, 1)``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"Expected `threshold` to be a float in (0, 1), but got {threshold!r}.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"Expected `threshold` to be a float in (0, 1), but got {threshold!r}.")
    return math.log(threshold / (1.0 - threshold))


def predicted_masks(logits: Tensor, kind: str, threshold: float = 0.5) -> Tensor:
    """What the model predicts at each pixel (voxel), for each output kind.

    Args:
        logits: ``[B, K, H, W]`` (or a volume's ``[B, K, D, H, W]``) at any resolution; the
            returned ``H, W`` below are then ``D, H, W``.
        kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"auto"`` (see
            :func:`resolve_output_kind`).
        threshold: probability above which a sigmoid pixel is predicted (binary, multilabel):
            ``logit > log(t / (1 - t))``, i.e. ``logit > 0`` at 0.5.

    Returns:
        multiclass: labels ``[B, H, W]`` int64, each pixel's highest-scoring class
        (:func:`predicted_classes`); binary: labels ``[B, H, W]`` int64 in ``{0, 1}``, 1 where
        the one channel's logit is above the threshold's (foreground); multilabel: bool
        ``[B, K, H, W]``, one mask per channel, possibly overlapping.

    Raises:
        ValueError: for logits that are neither ``[B, K, H, W]`` nor ``[B, K, D, H, W]``, or a
            kind that does not fit.
    """
    spatial_dims_of(logits)
    kind = resolve_output_kind(kind, logits.shape[1])
    if kind == "multiclass":
        return predicted_classes(logits)
    above = logits > threshold_logit(threshold)
    return above[:, 0].long() if kind == "binary" else above


def class_regions(
    masks: Tensor,
    classes: Sequence[int] | Tensor,
    num_outputs: int,
    kind: str,
    size: Sequence[int] | None = None,
    spatial_dims: int | None = None,
) -> Tensor:
    """Per-class boolean regions ``[B, len(classes), h, w]`` from ground truth (or predictions).

    Volumes work alike with one more spatial dimension: labels ``[B, D, H, W]``, per-class
    masks ``[B, K, D, H, W]``, regions ``[B, len(classes), d, h, w]`` (``spatial_dims=3``).

    Args:
        masks: integer labels ``[B, H, W]`` or per-class masks ``[B, num_outputs, H, W]`` (bool
            or 0/1; multi-hot for multilabel; ``[B, 1, H, W]`` for binary). Labels: the region
            of output channel ``k`` is ``labels == k`` (multiclass, multilabel); for binary the
            one channel's region is the foreground ``labels == 1``. Any other value (e.g. an
            ignore index 255) belongs to no class.
        classes: output channel indices, in ``[0, num_outputs)``; ``(0,)`` for binary.
        num_outputs: the model's number of output channels ``K``.
        kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"auto"``.
        size: ``(h, w)`` (``(d, h, w)``) of the regions; ``None`` keeps the masks' size. A
            different size is reached by nearest-neighbour resizing, so labels are never
            blended: ``F.interpolate(mode="nearest-exact")``, where each output pixel takes the
            mask value under its centre (``"nearest"`` would take each block's top-left pixel
            and shift regions by half a block). This is how masks at the input's resolution
            meet logits at a lower one (e.g. ``4 i + 2`` for logits at 1/4).
        spatial_dims: 2 for images, 3 for volumes; ``None`` takes ``len(size)``, or 2 without
            a size. It tells labels ``[B, D, H, W]`` from per-class masks ``[B, K, H, W]``.

    Returns:
        bool ``[B, len(classes), *size]``.

    Raises:
        TypeError: for a non-tensor, or label masks that are not integers.
        ValueError: for masks of another shape, classes outside ``[0, num_outputs)``, or a size
            of another dimensionality.
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"Expected `masks` to be a torch.Tensor, but got {type(masks).__name__}.")
    kind = resolve_output_kind(kind, num_outputs)
    n = _region_dims(size, spatial_dims)
    ids = _channel_ids(classes, num_outputs)
    labels_shape, per_class_shape = (
        shape_label("B", spatial_dims=n),
        shape_label("B", "K", spatial_dims=n),
    )
    if masks.ndim == n + 1:
        if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
            raise TypeError(
                f"Expected label masks {labels_shape} to hold integer class indices, but got "
                f"dtype {masks.dtype}; pass `masks.long()` or per-class masks {per_class_shape}."
            )
        if kind == "binary":
            per_class = (masks == 1).unsqueeze(1)[:, ids]
        else:
            labels = masks.unsqueeze(1)
            if size is not None and tuple(size) != tuple(masks.shape[1:]):
                # Resize the labels, not K regions. Values outside [0, K) mean "no class": once
                # clamped to -1 or K, float32 holds every label exactly.
                labels = _resize_nearest(labels.long().clamp(-1, num_outputs), size).long()
            wanted = torch.tensor(ids, dtype=torch.long, device=masks.device)
            return labels == wanted.view(1, -1, *[1] * n)
    elif masks.ndim == n + 2 and masks.shape[1] == num_outputs:
        per_class = masks[:, ids] != 0
    else:
        raise ValueError(
            f"Expected `masks` as integer labels {labels_shape} or per-class masks "
            f"{per_class_shape} with K = {num_outputs} (the model's output channels, {kind}), "
            f"but got {list(masks.shape)}."
        )
    if size is not None and tuple(size) != tuple(per_class.shape[2:]):
        per_class = _resize_nearest(per_class, size) != 0
    return per_class


def _channel_ids(classes: Sequence[int] | Tensor, num_outputs: int) -> list[int]:
    """``classes`` as a list of output channel indices, each in ``[0, num_outputs)``."""
    ids = torch.as_tensor(classes, dtype=torch.long).reshape(-1).tolist()
    if any(not 0 <= k < num_outputs for k in ids):
        raise ValueError(
            f"Expected `classes` in [0, {num_outputs}) (the model's {num_outputs} output "
            f"channel(s)), but got {ids}."
        )
    return ids


def _region_dims(size: Sequence[int] | None, spatial_dims: int | None) -> int:
    """The regions' number of spatial dimensions, from ``spatial_dims`` or ``size``."""
    n = spatial_dims if spatial_dims is not None else (2 if size is None else len(size))
    if n not in SPATIAL_DIMS:
        raise ValueError(
            f"Expected `spatial_dims` in {SPATIAL_DIMS} (images or volumes), but got {n}."
        )
    if size is not None and len(size) != n:
        raise ValueError(
            f"Expected `size` with {n} entries ({shape_label(spatial_dims=n)[1:-1]}), but got "
            f"{tuple(size)}."
        )
    return n


def _resize_nearest(masks: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize (``nearest-exact``) of ``[B, C, *S]`` as float32."""
    return F.interpolate(masks.float(), size=tuple(size), mode="nearest-exact")


def resize_labels(preds: Tensor, size: Sequence[int]) -> Tensor:
    """Labels ``[N, *S]`` or per-class masks ``[N, K, *S]`` at ``size`` (``len(size)`` =
    ``len(S)``), nearest-neighbour as masks are resized for targets (``nearest-exact``: each
    output pixel takes the value under its centre), never blended; the dtype is kept. The one
    rule the callback's grids and the audit's panels and metrics share."""
    if tuple(preds.shape[-len(size) :]) == tuple(size):
        return preds
    labels = preds.ndim == len(size) + 1
    resized = _resize_nearest(preds.unsqueeze(1) if labels else preds, size)
    return (resized.squeeze(1) if labels else resized).to(preds.dtype)


def label_map(masks: Tensor, kind: str, spatial_dims: int = 2) -> Tensor:
    """One label per pixel, for pictures: labels ``[N, *S]`` as they are; per-class masks
    ``[N, K, *S]`` by their highest set channel (overlapping multi-label classes show the last,
    a pixel with none 0); a binary model's one channel as 0 (background) and 1 (foreground)."""
    if masks.ndim == spatial_dims + 1:
        return masks.long().clone()
    shape = (1, -1) + (1,) * spatial_dims
    channels = torch.arange(1, masks.shape[1] + 1, device=masks.device).view(shape)
    labels = (masks.bool() * channels).amax(dim=1) - 1
    if kind == "binary":
        return (labels + 1).clamp(0, 1)
    return labels.clamp_min(0)


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else ``0`` (no eps, so the result keeps its scale)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def gradcam_weights(activations: Tensor, gradients: Tensor, spatial_dims: int = 2) -> Tensor:
    """Grad-CAM channel weights: spatial mean of the gradients.

    Args:
        activations: ``[..., C, *s]`` (unused, kept for a uniform signature).
        gradients: ``[..., C, *s]`` gradients of the class score w.r.t. the activations.
        spatial_dims: number of trailing spatial dimensions in ``s`` (3 for ``d, h, w``).

    Returns:
        ``[..., C]`` weights ``w_c = mean_i dY/dA_c(i)`` over the ``h·w`` (``d·h·w``) positions.
    """
    del activations
    return gradients.mean(dim=_spatial(spatial_dims))


def hirescam_weights(activations: Tensor, gradients: Tensor, spatial_dims: int = 2) -> Tensor:
    """HiResCAM element-wise weights: the gradients themselves (no spatial averaging).

    Returns:
        ``[..., C, *s]``, so the map is ``sum_c dY/dA_c * A_c``.
    """
    del activations, spatial_dims
    return gradients


def xgradcam_weights(activations: Tensor, gradients: Tensor, spatial_dims: int = 2) -> Tensor:
    """XGrad-CAM channel weights: gradients averaged with the normalised activations as weights.

    ``w_c = sum_i A_c(i) dY/dA_c(i) / sum_i A_c(i)`` over the spatial positions ``i``; a channel
    whose activations sum to zero gets weight 0 (its contribution to the map is zero anyway).

    Returns:
        ``[..., C]``.
    """
    dims = _spatial(spatial_dims)
    num = (activations * gradients).sum(dim=dims)
    den = activations.sum(dim=dims)
    return safe_divide(num, den)


def gradcampp_weights(activations: Tensor, gradients: Tensor, spatial_dims: int = 2) -> Tensor:
    """Grad-CAM++ channel weights with the closed-form ``alpha`` of the paper (exp score).

    With ``g = dY/dA`` and the higher derivatives of ``exp(Y)`` written through ``g``::

        alpha_c(i) = g² / (2 g² + sum_a A_c(a) · g³)        (0 where the denominator is 0)
        w_c = sum_i alpha_c(i) · relu(g_c(i))

    over the spatial positions ``i`` and ``a``. This is the form torchcam and pytorch-grad-cam
    use, without their ``eps`` in the denominator.

    Returns:
        ``[..., C]``.
    """
    dims = _spatial(spatial_dims)
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    sum_a = activations.sum(dim=dims, keepdim=True)
    alpha = safe_divide(g2, 2 * g2 + sum_a * g3)
    return (alpha * gradients.clamp(min=0)).sum(dim=dims)


def layercam_weights(activations: Tensor, gradients: Tensor, spatial_dims: int = 2) -> Tensor:
    """LayerCAM element-wise weights: the positive part of the gradients.

    Returns:
        ``[..., C, *s]``, so the map is ``sum_c relu(dY/dA_c) * A_c``.
    """
    del activations, spatial_dims
    return gradients.clamp(min=0)


def weighted_sum(weights: Tensor, activations: Tensor, spatial_dims: int = 2) -> Tensor:
    """Combine activation channels with one weight per channel.

    Args:
        weights: ``[..., C]``.
        activations: ``[..., C, *s]``; leading dimensions broadcast against ``weights``.
        spatial_dims: number of trailing spatial dimensions in ``s``.

    Returns:
        ``[..., *s]`` map ``sum_c weights_c * A_c`` (no ReLU).
    """
    spatial = activations.shape[activations.ndim - spatial_dims :]
    # A batched matrix product over the flattened positions: no [..., C, *s] temporary.
    flat = torch.einsum("...c,...cn->...n", weights, activations.flatten(-spatial_dims))
    return flat.unflatten(-1, spatial)


def elementwise_sum(weights: Tensor, activations: Tensor, spatial_dims: int = 2) -> Tensor:
    """Combine activation channels with one weight per element.

    Args:
        weights: ``[..., C, *s]``.
        activations: ``[..., C, *s]``; leading dimensions broadcast.
        spatial_dims: number of trailing spatial dimensions in ``s``.

    Returns:
        ``[..., *s]`` map ``sum_c weights_c ⊙ A_c`` (no ReLU).
    """
    return (weights * activations).sum(dim=-spatial_dims - 1)


def scorecam_weights(increase: Tensor, selected: Tensor | None = None) -> Tensor:
    """Score-CAM channel weights: softmax over channels of each channel's score increase.

    Args:
        increase: ``[..., C]`` target score of the masked input minus that of the input.
        selected: optional bool ``[..., C]``; channels not selected get weight 0 and take no part
            in the softmax.

    Returns:
        ``[..., C]`` weights summing to 1 over the selected channels.
    """
    if selected is None:
        return increase.softmax(dim=-1)
    return increase.masked_fill(~selected, float("-inf")).softmax(dim=-1)


def minmax_scale(maps: Tensor, spatial_dims: int = 2) -> Tensor:
    """Scale-invariant min-max normalisation of each map to ``[0, 1]``.

    ``(m - min) / (max - min)`` when ``max - min`` exceeds float32 noise relative to the map's
    magnitude (and the smallest normal float), else ``0``. A map multiplied by ``1e-6``
    normalises to the same map; a constant or all-zero map gives zeros, never NaN.

    Args:
        maps: ``[..., *spatial]`` float tensor.
        spatial_dims: how many trailing dimensions make one map.

    Returns:
        Tensor of the same shape, in ``[0, 1]``.
    """
    dims = tuple(range(-spatial_dims, 0))
    lo = maps.amin(dim=dims, keepdim=True)
    hi = maps.amax(dim=dims, keepdim=True)
    span = hi - lo
    magnitude = torch.maximum(hi.abs(), lo.abs())
    valid = (span > RELATIVE_TOLERANCE * magnitude) & (span > ABSOLUTE_TOLERANCE)
    scale = torch.where(valid, span, torch.ones_like(span))
    return torch.where(valid, (maps - lo) / scale, 0.0).clamp_(0.0, 1.0)


def normalize_cams(cams: Tensor, mode: NormalizeMode = "minmax", spatial_dims: int = 2) -> Tensor:
    """Normalise non-negative CAMs ``[B, L, K, H, W]`` (volumes: ``[B, L, K, D, H, W]`` with
    ``spatial_dims=3``).

    Modes:
        ``"minmax"``: every map on its own to ``[0, 1]`` (the blog post's choice) via
            :func:`minmax_scale`, over all its pixels (voxels).
        ``"global"``: one scale per image and layer, shared by all its classes: maps are divided
            by the largest value over the classes, so a weak class looks weak. Layers keep
            separate scales because their activations have unrelated units. Images whose maps
            are all below the smallest normal float32 give zeros.
        ``"none"``: returned as is.

    Returns:
        Tensor of the same shape and dtype.
    """
    if mode == "none":
        return cams
    if mode == "minmax":
        return minmax_scale(cams, spatial_dims=spatial_dims)
    if mode == "global":
        peak = cams.amax(dim=_spatial(spatial_dims + 1), keepdim=True)
        valid = peak > ABSOLUTE_TOLERANCE
        scale = torch.where(valid, peak, torch.ones_like(peak))
        return torch.where(valid, cams / scale, 0.0).clamp_(0.0, 1.0)
    raise ValueError(f"Expected `normalize` to be one of {NORMALIZE_MODES}, but got {mode!r}.")


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize maps ``[N, C, *s]`` to ``size``, on device, with ``align_corners=False``.

    Bilinear for images (``size`` = ``(H, W)``), trilinear for volumes (``(D, H, W)``).
    Returns ``maps`` unchanged when it already has that size.
    """
    size = tuple(size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def eigencam_map(activations: Tensor) -> Tensor:
    """Projection of the activations on their first principal component (Eigen-CAM).

    For each image, the ``h·w × C`` (volumes: ``d·h·w × C``) activation matrix is centred over
    positions and projected on its first right singular vector. The sign of a singular vector is
    arbitrary, so it is fixed to make the map correlate positively with the channel-mean
    activation map.

    Args:
        activations: ``[B, C, *s]`` float tensor, ``s`` = ``h, w`` or ``d, h, w``.

    Returns:
        ``[B, *s]`` map (no ReLU).
    """
    b, c, *spatial = activations.shape
    x = activations.reshape(b, c, -1).transpose(1, 2)  # [B, n, C], n positions
    x = x - x.mean(dim=1, keepdim=True)
    # The C × C Gram matrix is tiny next to [hw, C]: its top eigenvector is the first right
    # singular vector of x, at a fraction of an SVD's cost.
    gram = x.transpose(1, 2) @ x
    _, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -1]  # [B, C]; eigenvalues come in ascending order
    projection = (x @ top.unsqueeze(-1)).squeeze(-1)  # [B, n]
    mean_map = activations.mean(dim=1).reshape(b, -1)
    mean_map = mean_map - mean_map.mean(dim=1, keepdim=True)
    sign = torch.where((projection * mean_map).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    return (projection * sign).reshape(b, *spatial)


def guided_gradcam(guided_backprop: Tensor, cams: Tensor) -> Tensor:
    """Guided Grad-CAM: guided backpropagation times the (upsampled) CAM.

    Args:
        guided_backprop: ``[B, K, C_in, *S]`` guided gradients w.r.t. the input, ``S`` = ``H, W``
            or ``D, H, W``.
        cams: ``[B, L, K, *S]`` maps at input resolution.

    Returns:
        ``[B, L, K, C_in, *S]``.
    """
    return guided_backprop.unsqueeze(1) * cams.unsqueeze(3)
