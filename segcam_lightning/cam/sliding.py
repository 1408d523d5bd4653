"""Sliding-window CAMs: every class's maps of a volume (or a large image) too big for one pass.

:func:`sliding_window_cams` runs a :class:`~segcam_lightning.cam.engine.CAMEngine` over
windows (patches) of the input the way MONAI's ``sliding_window_inference`` runs a predictor:
the same window positions (``roi_size``, ``overlap``; a dimension smaller than the window is
padded first, ``padding_mode``/``cval``), the same importance map ``w`` (``mode="constant"``:
ones; ``"gaussian"``: MONAI's ``compute_importance_map`` with ``sigma_scale``), the same order
and the same blending of the logits::

    logits(x) = sum_p w_p(x) · logits_p(x) / sum_p w_p(x)        (over the windows p holding x)

and returns one :class:`~segcam_lightning.cam.engine.CAMResult` for the whole input, so
everything that reads a result works unchanged. Two definitions of a class's map
(docs/volumes.md, "Sliding windows"):

- ``weights="patch"``: each window's own maps (the engine on the window, every method, layer
  and target, the head path included) blended with the logits' weights,
  ``cam(x) = sum_p w_p(x) · cam_p(x) / sum_p w_p(x)``. A window's region target reads that
  window's logits (and masks).
- ``weights="whole"``: the maps of the stitched score. ``S_k = target(logits)`` on the
  stitched logits (regions from the stitched prediction or the masks of the whole input); its
  gradient reaches window ``p`` through the blending, ``dS_k/dlogits_p = G_k · w_p / sum_q w_q``
  with ``G_k = dS_k/dlogits`` (the chain rule); channel weights pool over every window before
  any map is made (Grad-CAM: ``alpha_k = sum_p sum_i g_p(i) / N`` with ``N`` the positions of
  all windows; XGrad-CAM: ``sum_p sum_i A g / sum_p sum_i A``), then each window's map
  ``ReLU(sum_c alpha_c A_p,c)`` is blended as above. HiResCAM and LayerCAM weigh each position
  by its own gradient: a window's map uses that window's share of the stitched score's
  gradient, then the maps are blended. Methods whose weights cannot pool this way (Grad-CAM++,
  Score-CAM, Eigen-CAM, custom weight functions, guided backpropagation) are refused.

In both, maps are zeroed where the class is absent from the stitched logits' target
(``present``), ``raw_max`` is taken, and the engine's ``normalize`` is applied after stitching.
Plain PyTorch: MONAI is not imported.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.capture import _Capture, _Heads
from segcam_lightning.cam.engine import (
    CAMEngine,
    CAMResult,
    _check_classes,
    _check_images,
    _check_masks,
    _model_device,
    _select_classes,
)
from segcam_lightning.cam.gradients import _at_least_float32, may_take_head_path
from segcam_lightning.cam.layers import eval_mode, force_eager, preserve_rng, unwrap_compiled
from segcam_lightning.cam.methods import GradCAM, HiResCAM, LayerCAM, XGradCAM

__all__ = ["BLEND_MODES", "PADDING_MODES", "WEIGHTS", "importance_map", "sliding_window_cams"]

WEIGHTS: tuple[str, ...] = ("patch", "whole")
BLEND_MODES: tuple[str, ...] = ("constant", "gaussian")
PADDING_MODES: tuple[str, ...] = ("constant", "reflect", "replicate", "circular")
#: Methods whose channel weights pool over windows in ``weights="whole"``, and the elementwise
#: ones (a window's map from its own share of the stitched score's gradient).
_POOLED = (GradCAM, XGradCAM)
_ELEMENTWISE = (HiResCAM, LayerCAM)

Window = tuple[int, tuple[slice, ...]]  # (image index in the batch, spatial slices)


def sliding_window_cams(
    engine: CAMEngine,
    x: Tensor,
    roi_size: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sw_batch_size: int = 1,
    weights: str = "patch",
    padding_mode: str = "constant",
    cval: float = 0.0,
    sigma_scale: float | Sequence[float] = 0.125,
    classes: int | Sequence[int] | Tensor | None = None,
    masks: Tensor | None = None,
) -> CAMResult:
    """The engine's CAMs of a whole input, computed window by window (module docstring).

    Args:
        engine: the :class:`CAMEngine` to run (never modified; its ``normalize`` applies to the
            stitched maps). Its model must return logits at the input's resolution.
        x: images ``[B, C, H, W]`` or volumes ``[B, C, D, H, W]``.
        roi_size: the window, one size per spatial dimension (an int for all); an entry that is
            ``None`` or ``<= 0`` takes the input's size there (MONAI's ``fall_back_tuple``). A
            window larger than the input is fine: the input is padded, the result cropped.
        overlap: fraction of a window shared with the next, in ``[0, 1)`` (one per dimension or
            one for all); the step is ``int(roi · (1 - overlap))`` (at least 1).
        mode: ``"constant"`` (equal weights) or ``"gaussian"`` (less weight at window edges,
            ``sigma = sigma_scale · roi``).
        sw_batch_size: windows per engine call (windows of different images may share one).
        weights: ``"patch"`` or ``"whole"`` (module docstring; docs/volumes.md).
        padding_mode, cval: how a dimension smaller than the window is padded
            (``torch.nn.functional.pad``'s modes; ``cval`` for ``"constant"``).
        sigma_scale: the Gaussian's width as a fraction of the window (one per dimension or one).
        classes, masks: as for the engine (masks at the input's resolution).

    Returns:
        A :class:`CAMResult` for the whole input: stitched ``logits``, ``cams``
        ``[B, L, K, *spatial]`` (normalised after stitching), ``raw_max``, and ``scores`` and
        ``present`` of the engine's target on the stitched logits.

    Raises:
        TypeError, ValueError: for invalid arguments, saying what was expected.
    """
    if not isinstance(engine, CAMEngine):
        raise TypeError(
            f"Expected `engine` to be a segcam_lightning.cam.CAMEngine, but got "
            f"{type(engine).__name__}; build one with CAMEngine(model, layers, ...)."
        )
    _check_images(x)
    wanted = _check_classes(classes)
    _check_choice("weights", weights, WEIGHTS)
    window = _check_window_args(
        tuple(x.shape[2:]), roi_size, overlap, mode, sw_batch_size, padding_mode, cval, sigma_scale
    )
    if weights == "whole":
        _check_whole_method(engine)
    device = _model_device(engine.model, x)
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(eval_mode(engine.model))
        stack.enter_context(preserve_rng(device))
        stack.enter_context(force_eager())
        x = x.to(device).clone()
        masks = masks.to(device).clone() if isinstance(masks, Tensor) else masks
        plan = _plan(x, window, mode, sw_batch_size, padding_mode, cval)
        if weights == "patch":
            return _patch_cams(engine, plan, wanted, masks)
        return _whole_cams(engine, plan, wanted, masks)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.")


def _check_whole_method(engine: CAMEngine) -> None:
    """``weights="whole"`` takes Grad-CAM, XGrad-CAM (pooled weights), HiResCAM and LayerCAM
    (elementwise), without guided backpropagation."""
    method = engine.method
    if engine.guided:
        raise ValueError(
            "weights='whole' does not take guided backpropagation (it would need the gradient "
            "of the stitched score at every input voxel of every window); use weights='patch' "
            "or an engine without `guided`."
        )
    if type(method) not in (*_POOLED, *_ELEMENTWISE):
        raise ValueError(
            f"weights='whole' takes the methods 'gradcam', 'xgradcam', 'hirescam' and "
            f"'layercam', whose weights pool over windows or are per position, but the engine's "
            f"method is {method!r}: Grad-CAM++'s weights need sums over the whole input before "
            "the gradients, gradient-free methods have no stitched score's gradient, and a "
            "custom weight function cannot be pooled. Use weights='patch' (each window's own "
            "maps, blended) for it."
        )


# --- Windows: MONAI's positions, importance map and blending -------------------------------


@dataclass(frozen=True)
class _Plan:
    """The padded input, the windows and the weights of one call.

    Attributes:
        x: the input, padded where a dimension is smaller than the window.
        size: the input's spatial size before padding.
        pad: ``torch.nn.functional.pad``'s list (last dimension first), as MONAI pads.
        roi: the window size.
        slices: the windows' spatial slices, in MONAI's order.
        importance: ``[*roi]`` MONAI's importance map, in the input's dtype.
        count: ``[1, 1, *padded]`` the sum of the weights of the windows over each position.
        sw_batch_size: windows per engine call.
    """

    x: Tensor
    size: tuple[int, ...]
    pad: list[int]
    roi: tuple[int, ...]
    slices: list[tuple[slice, ...]]
    importance: Tensor
    count: Tensor
    sw_batch_size: int

    def batches(self) -> Iterator[list[Window]]:
        """Windows of all images, ``sw_batch_size`` at a time, image by image (MONAI's order:
        window ``i`` is image ``i // n``, slice ``i % n``)."""
        n = len(self.slices)
        total = self.x.shape[0] * n
        for start in range(0, total, self.sw_batch_size):
            stop = min(start + self.sw_batch_size, total)
            yield [(i // n, self.slices[i % n]) for i in range(start, stop)]

    def take(self, tensor: Tensor, windows: Sequence[Window]) -> Tensor:
        """The windows of ``tensor [B, C, *padded]``: ``[n, C, *roi]``."""
        return torch.cat([tensor[(slice(b, b + 1), slice(None), *s)] for b, s in windows])

    def crop(self, tensor: Tensor) -> Tensor:
        """``[..., *padded]`` back to the input's size (MONAI's final slicing)."""
        n = len(self.size)
        starts = [self.pad[2 * (n - 1 - d)] for d in range(n)]
        index = [slice(a, a + s) for a, s in zip(starts, self.size, strict=True)]
        return tensor[(Ellipsis, *index)]

    def pad_like_input(self, tensor: Tensor, value: float = 0.0) -> Tensor:
        """``[B, C, *size]`` padded like the input (constant ``value``)."""
        return F.pad(tensor, self.pad, value=value) if any(self.pad) else tensor


def _check_window_args(
    size: tuple[int, ...],
    roi_size: Any,
    overlap: Any,
    mode: Any,
    sw_batch_size: Any,
    padding_mode: Any,
    cval: Any,
    sigma_scale: Any,
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """The windows' arguments checked before anything runs: ``(roi, overlaps, sigma_scales)``
    per spatial dimension of an input of spatial ``size``."""
    n = len(size)
    roi = _check_roi(roi_size, size)
    overlaps = _per_dim("overlap", overlap, n, lambda o: 0 <= o < 1, "in [0, 1)")
    _check_choice("mode", mode, BLEND_MODES)
    _check_choice("padding_mode", padding_mode, PADDING_MODES)
    sigmas = _per_dim("sigma_scale", sigma_scale, n, lambda s: s > 0, "> 0")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(
            f"Expected `sw_batch_size` to be a positive int (windows per engine call), but got "
            f"{sw_batch_size!r}."
        )
    if isinstance(cval, bool) or not isinstance(cval, (int, float)):
        raise TypeError(f"Expected `cval` to be a number, but got {type(cval).__name__}.")
    return roi, overlaps, sigmas


def _plan(
    x: Tensor,
    window: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]],
    mode: str,
    sw_batch_size: int,
    padding_mode: str = "constant",
    cval: float = 0.0,
) -> _Plan:
    """The padded input, MONAI's windows and weights for checked arguments ``window``."""
    roi, overlaps, sigmas = window
    n, size = x.ndim - 2, tuple(x.shape[2:])
    pad: list[int] = []
    for d in reversed(range(n)):  # MONAI's pad_size: last dimension first, half before
        diff = max(roi[d] - size[d], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        value = {"value": float(cval)} if padding_mode == "constant" else {}
        x = F.pad(x, pad, mode=padding_mode, **value)
    padded = tuple(x.shape[2:])
    slices = _window_slices(padded, roi, overlaps)
    importance = importance_map(roi, mode, sigmas).to(x.dtype)
    count = x.new_zeros((1, 1, *padded))
    for s in slices:
        count[(slice(None), slice(None), *s)] += importance
    return _Plan(x, size, pad, roi, slices, importance, count, sw_batch_size)


def _check_roi(roi_size: Any, size: tuple[int, ...]) -> tuple[int, ...]:
    n = len(size)
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi_size = (roi_size,) * n
    if not isinstance(roi_size, Sequence) or any(
        r is not None and (isinstance(r, bool) or not isinstance(r, int)) for r in roi_size
    ):
        raise TypeError(
            f"Expected `roi_size` to be an int or {n} ints (the window's "
            f"{FC.shape_label(spatial_dims=n)[1:-1]}), but got {roi_size!r}."
        )
    if len(roi_size) != n:
        kind = "volumes [B, C, D, H, W]" if n == 3 else "images [B, C, H, W]"
        raise ValueError(
            f"Expected `roi_size` with {n} entries for {kind} (input {list(size)}), but got "
            f"{len(roi_size)}: {tuple(roi_size)}. Give one window size per spatial dimension."
        )
    # MONAI's fall_back_tuple: None or a non-positive size takes the input's.
    return tuple(r if r is not None and r > 0 else s for r, s in zip(roi_size, size, strict=True))


def _per_dim(name: str, value: Any, n: int, valid: Any, rule: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not valid(v) for v in values
    ):
        raise ValueError(
            f"Expected `{name}` to be a number {rule} or {n} of them (one per spatial "
            f"dimension), but got {value!r}."
        )
    return tuple(float(v) for v in values)


def _window_slices(
    size: tuple[int, ...], roi: tuple[int, ...], overlap: tuple[float, ...]
) -> list[tuple[slice, ...]]:
    """MONAI's ``_get_scan_interval`` and ``dense_patch_slices``: per dimension the step is
    ``int(roi · (1 - overlap))`` (at least 1; the whole size when the window fills it), as many
    windows as reach the end, the last one moved back to end at the border."""
    starts = []
    for s, r, o in zip(size, roi, overlap, strict=True):
        step = r if r == s else max(int(r * (1 - o)), 1)
        num = math.ceil(s / step)
        last = next((d for d in range(num) if d * step + r >= s), 0)
        starts.append([i * step - max(i * step + r - s, 0) for i in range(last + 1)])
    return [
        tuple(slice(a, a + r) for a, r in zip(corner, roi, strict=True))
        for corner in itertools.product(*starts)
    ]


def importance_map(
    roi: Sequence[int], mode: str = "constant", sigma_scale: Sequence[float] = (0.125,)
) -> Tensor:
    """MONAI's ``compute_importance_map`` (float32 ``[*roi]``): ones, or the product of 1-D
    Gaussians ``exp(-t² / (2 (sigma_scale · roi)²))`` over ``t`` centred on the window,
    clamped below at ``max(min, 1e-3)``. The same float32 operations as MONAI's."""
    if mode == "constant":
        return torch.ones(tuple(roi), dtype=torch.float)
    scales = list(sigma_scale) * (len(roi) if len(sigma_scale) == 1 else 1)
    weights = torch.empty(0)
    for i, (r, scale) in enumerate(zip(roi, scales, strict=True)):
        sigma = r * scale
        t = torch.arange(start=-(r - 1) / 2.0, end=(r - 1) / 2.0 + 1, dtype=torch.float)
        t = torch.exp(t**2 / (-2 * sigma**2))
        weights = weights.unsqueeze(-1) * t[(None,) * i] if i > 0 else t
    return weights.clamp_(min=max(weights.min().item(), 1e-3))


class _Blend:
    """``sum_p w_p · values_p`` over the windows, divided by ``sum_p w_p`` at the end."""

    def __init__(self, plan: _Plan, channels: int, dtype: torch.dtype) -> None:
        self.plan = plan
        shape = (plan.x.shape[0], channels, *plan.x.shape[2:])
        self.total = plan.x.new_zeros(shape, dtype=dtype)
        self.weight = plan.importance.to(dtype)

    def add(self, values: Tensor, windows: Sequence[Window], first: int = 0) -> None:
        """Add ``values [n, C, *roi]`` of ``windows`` at channels ``first .. first + C``."""
        weighted = values.to(self.total.dtype) * self.weight
        channels = slice(first, first + values.shape[1])
        for v, (b, s) in zip(weighted, windows, strict=True):
            self.total[(b, channels, *s)] += v

    def result(self) -> Tensor:
        """The blend ``[B, C, *size]``, cropped to the input."""
        return self.plan.crop(self.total.div_(self.plan.count.to(self.total.dtype)))


# --- weights="patch" ----------------------------------------------------------------------


def _patch_cams(
    engine: CAMEngine, plan: _Plan, wanted: list[int] | None, masks: Tensor | None
) -> CAMResult:
    """Each window's maps (a copy of the engine with ``normalize="none"``), blended."""
    sibling = copy.copy(engine)
    sibling.normalize = "none"
    window_masks = _pad_masks(masks, plan)
    logits = cams = guided = None
    result = None
    for windows in plan.batches():
        xb = plan.take(plan.x, windows)
        mb = None if window_masks is None else _take_masks(plan, window_masks, windows)
        result = sibling(xb, classes=wanted, masks=mb)
        _check_logits_size(result.logits, plan)
        if logits is None:
            float_type = _at_least_float32(result.logits).dtype
            logits = _Blend(plan, result.logits.shape[1], _logits_type(plan, result.logits))
            cams = _Blend(plan, result.cams.shape[1] * result.cams.shape[2], float_type)
            if result.guided_backprop is not None:
                guided = _Blend(plan, result.guided_backprop[0].flatten(0, 1).shape[0], float_type)
        logits.add(result.logits, windows)
        cams.add(result.cams.flatten(1, 2), windows)  # type: ignore[union-attr]
        if guided is not None:
            guided.add(result.guided_backprop.flatten(1, 2), windows)  # type: ignore[union-attr]
    assert result is not None and logits is not None and cams is not None
    stitched = logits.result().to(result.logits.dtype)
    guided_backprop = None
    if guided is not None:
        shape = result.guided_backprop.shape[1:3]  # type: ignore[union-attr]
        guided_backprop = guided.result().unflatten(1, shape).float()
    maps = cams.result().unflatten(1, result.cams.shape[1:3])
    scored = _stitched_scores(engine, plan, stitched, wanted, masks)
    return _finish(engine, plan, stitched, maps, scored, guided_backprop)


def _pad_masks(masks: Tensor | None, plan: _Plan) -> Tensor | None:
    """Masks at the input's resolution as ``[B, C, *padded]`` for slicing: labels ``[B, *S]``
    become ``[B, 1, *padded]`` padded with -1 (no class), per-class masks are padded with 0."""
    if not isinstance(masks, Tensor):
        return masks
    n = len(plan.size)
    if masks.ndim not in (n + 1, n + 2) or tuple(masks.shape[-n:]) != plan.size:
        raise ValueError(
            f"Expected `masks` at the input's resolution, labels "
            f"{[plan.x.shape[0], *plan.size]} or per-class masks "
            f"{[plan.x.shape[0], 'K', *plan.size]}, for weights='patch' (each window takes its "
            f"part), but got {list(masks.shape)}."
        )
    if masks.ndim == n + 1:
        return plan.pad_like_input(masks.long().unsqueeze(1), value=-1)
    return plan.pad_like_input(masks.float())


def _take_masks(plan: _Plan, masks: Tensor, windows: Sequence[Window]) -> Tensor:
    taken = plan.take(masks, windows)
    return taken.squeeze(1) if taken.dtype == torch.long else taken


def _check_logits_size(logits: Tensor, plan: _Plan) -> None:
    if tuple(logits.shape[2:]) != plan.roi:
        raise ValueError(
            f"sliding_window_cams needs logits at the input's resolution, but windows of "
            f"{list(plan.roi)} gave logits {list(logits.shape)}. Wrap the model so that it "
            "upsamples its logits to its input, or run the engine on the whole input."
        )


def _logits_type(plan: _Plan, logits: Tensor) -> torch.dtype:
    """The logits are blended in the input's dtype, as MONAI does (at least the logits')."""
    return torch.promote_types(plan.x.dtype, logits.dtype)


def _finish(
    engine: CAMEngine,
    plan: _Plan,
    logits: Tensor,
    cams: Tensor,
    scored: tuple[Tensor, Tensor, Tensor, Any],
    guided_backprop: Tensor | None = None,
) -> CAMResult:
    """The stitched result: the target's scores and presence on the stitched logits, maps
    zeroed where a class is absent, raw maxima, the engine's normalisation."""
    scores, present, classes, read = scored
    n = len(plan.size)
    with torch.no_grad():
        kept = present[:, classes]
        cams = cams * kept.view(kept.shape[0], 1, -1, *[1] * n).to(cams.dtype)
        raw_max = cams.flatten(3).amax(dim=-1)
        cams = FC.normalize_cams(cams, engine.normalize, spatial_dims=n)
    return CAMResult(
        cams=cams.float(),
        raw_max=raw_max.float(),
        logits=logits.detach(),
        scores=scores.detach().float(),
        present=kept,
        layers=tuple(engine.layer_names),
        classes=tuple(classes.tolist()),
        guided_backprop=guided_backprop,
        output_kind=read.kind,
    )


def _stitched_scores(
    engine: CAMEngine, plan: _Plan, logits: Tensor, wanted: list[int] | None, masks: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Any]:
    """``(scores [B, K_all], present [B, K_all], classes, readout)`` of the stitched logits."""
    read = engine.readout.resolved(logits.shape[1])
    classes = _select_classes(wanted, logits.shape[1], logits.device)
    if engine.target.needs_masks:
        _check_masks(masks, plan.size, logits.shape)
    with torch.no_grad():
        scores, present = engine.target(_at_least_float32(logits), masks, read)
    return scores, present, classes, read


# --- weights="whole" ----------------------------------------------------------------------


def _whole_cams(
    engine: CAMEngine, plan: _Plan, wanted: list[int] | None, masks: Tensor | None
) -> CAMResult:
    """Maps of the stitched score: logits pass, then a gradient pass (layers off the head
    path), then a maps pass (channel weights pooled over every window)."""
    stitched, served = _stitched_logits(engine, plan)
    scored = _stitched_scores(engine, plan, stitched, wanted, masks)
    classes, read = scored[2], scored[3]
    float_logits = _at_least_float32(stitched)
    num_layers, k = len(engine.layer_names), len(classes)
    cams = _Blend(plan, num_layers * k, float_logits.dtype)
    alphas: dict[int, Tensor] = {}
    if served:
        grads = engine.target.mean_logit_gradients(float_logits, classes, masks, read)
        # sum_x G_k(x) = mean * N_S, over the N positions of all windows (per image).
        grads = grads * (math.prod(plan.size) / (len(plan.slices) * math.prod(plan.roi)))
        for layer, head in served.items():
            alphas[layer] = grads if head is None else grads @ head.to(grads.dtype)
    rest = [layer for layer in range(num_layers) if layer not in alphas]
    if rest:
        cotangents = _cotangents(engine, plan, float_logits, classes, masks, read)
        alphas.update(_gradient_pass(engine, plan, rest, cotangents, cams))
    if alphas:
        _maps_pass(engine, plan, alphas, k, cams)
    maps = cams.result().unflatten(1, (num_layers, k))
    return _finish(engine, plan, stitched, maps, scored)


def _stitched_logits(engine: CAMEngine, plan: _Plan) -> tuple[Tensor, dict[int, Tensor | None]]:
    """The stitched logits (no graph) and, from the first window batch's forward, the layers
    the head path serves (Grad-CAM behind a pointwise head, see ``_Heads``)."""
    probe = may_take_head_path(engine.method, engine.grad_mode, engine.guided)
    blend, dtype, served = None, None, {}
    for i, windows in enumerate(plan.batches()):
        xb = plan.take(plan.x, windows)
        if i == 0 and probe:
            capture = _new_capture(engine, range(len(engine.layer_names)), True, xb)
            heads = _Heads(unwrap_compiled(engine.model), capture, xb.ndim)
            with capture.hooks(), heads.hooks(), torch.no_grad():
                logits = engine._adapt(engine.model(xb), xb)
            capture.check_ran()
            served = heads.weights(logits)
            logits = logits.detach()
        else:
            with torch.no_grad():
                logits = engine._adapt(engine.model(xb), xb)
        _check_logits_size(logits, plan)
        if blend is None:
            blend, dtype = _Blend(plan, logits.shape[1], _logits_type(plan, logits)), logits.dtype
        blend.add(logits, windows)
    assert blend is not None and dtype is not None
    return blend.result().to(dtype), served


def _cotangents(
    engine: CAMEngine, plan: _Plan, logits: Tensor, classes: Tensor, masks: Tensor | None, read: Any
) -> list[Tensor]:
    """Per wanted class, ``G_k / sum_p w_p`` on the padded grid (``[B, K_all, *padded]``,
    zero in the padding): window ``p``'s cotangent is its slice times ``w_p``."""
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = engine.target(leaf, masks, read).scores
        if not scores.requires_grad:
            raise RuntimeError(
                f"The scores of target {engine.target!r} do not depend on the logits: it "
                "returned scores without a graph, so weights='whole' has no gradient to take."
            )
        class_scores = scores[:, classes].sum(dim=0).unbind()
    count = plan.count.to(leaf.dtype)
    out = []
    for j, score in enumerate(class_scores):
        (grad,) = torch.autograd.grad(
            score, leaf, retain_graph=j < len(class_scores) - 1, allow_unused=True
        )
        grad = torch.zeros_like(leaf) if grad is None else grad
        out.append(plan.pad_like_input(grad).div_(count))
    return out


def _new_capture(
    engine: CAMEngine, layers: Sequence[int], track_grad: bool, xb: Tensor
) -> _Capture:
    """The engine's capture hooks for ``layers`` (indices in ``engine.layer_names``), built as
    the engine builds its own (with the engine's ``reshape`` of token layers)."""
    names = [engine.layer_names[i] for i in layers]
    modules = [engine._modules[i] for i in layers]
    return _Capture(names, modules, track_grad, xb.shape, engine.reshape)


def _forward_with_graph(
    engine: CAMEngine, xb: Tensor, layers: Sequence[int]
) -> tuple[list[Tensor], Tensor]:
    """One window batch's hooked activations (a graph from the earliest on) and logits."""
    names = [engine.layer_names[i] for i in layers]
    capture = _new_capture(engine, layers, True, xb)
    with capture.hooks(), torch.no_grad():
        logits = engine._adapt(engine.model(xb), xb)
    capture.check_ran()
    if not logits.requires_grad:
        raise RuntimeError(engine._not_reached_message(names, xb))
    return capture.activations, logits


def _gradient_pass(
    engine: CAMEngine, plan: _Plan, layers: list[int], cotangents: list[Tensor], cams: _Blend
) -> dict[int, Tensor]:
    """Every window's gradients of every class's stitched score at ``layers``: elementwise
    methods blend their maps into ``cams``; pooled ones return the weights ``[B, K, C]``."""
    method, k = engine.method, len(cotangents)
    elementwise = isinstance(method, _ELEMENTWISE)
    pools: dict[int, list[Tensor]] = {}
    for windows in plan.batches():
        xb = plan.take(plan.x, windows)
        outputs, logits = _forward_with_graph(engine, xb, layers)
        acts = [_at_least_float32(a.detach()) for a in outputs]
        weight = plan.importance.to(logits.dtype)
        images = torch.tensor([b for b, _ in windows], device=xb.device)
        for j in range(k):
            cotangent = (plan.take(cotangents[j], windows) * weight).to(logits.dtype)
            grads = torch.autograd.grad(
                logits, outputs, cotangent, retain_graph=j < k - 1, allow_unused=True
            )
            unreached = [
                engine.layer_names[i] for i, g in zip(layers, grads, strict=True) if g is None
            ]
            if unreached:
                raise RuntimeError(engine._not_reached_message(unreached, xb))
            for layer, a, g in zip(layers, acts, grads, strict=True):
                g = g.to(a.dtype)
                if elementwise:
                    maps = method(a, g).unsqueeze(1)  # type: ignore[operator]
                    cams.add(FC.upsample(maps, plan.roi), windows, first=layer * k + j)
                    continue
                num, den = _pool_terms(method, a, g)
                if layer not in pools:
                    shape = (cams.total.shape[0], k, num.shape[1])
                    pools[layer] = [num.new_zeros(shape), num.new_zeros(shape)]
                pools[layer][0][:, j].index_add_(0, images, num)
                pools[layer][1][:, j].index_add_(0, images, den)
    return {layer: FC.safe_divide(num, den) for layer, (num, den) in pools.items()}


def _pool_terms(method: Any, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One window batch's share ``(num, den) [n, C]`` of the pooled channel weights
    ``sum num / sum den``: Grad-CAM ``(sum_i g, positions)``, XGrad-CAM
    ``(sum_i A g, sum_i A)``."""
    dims = tuple(range(2, a.ndim))
    if isinstance(method, XGradCAM):
        return (a * g).sum(dim=dims), a.sum(dim=dims)
    num = g.sum(dim=dims)
    return num, torch.full_like(num, float(math.prod(a.shape[2:])))


def _maps_pass(
    engine: CAMEngine, plan: _Plan, alphas: dict[int, Tensor], k: int, cams: _Blend
) -> None:
    """Each window's maps ``ReLU(sum_c alpha_c A_c)`` from the pooled weights, blended."""
    layers = sorted(alphas)
    for windows in plan.batches():
        xb = plan.take(plan.x, windows)
        capture = _new_capture(engine, layers, False, xb)
        with capture.hooks(), torch.no_grad():
            engine.model(xb)
        capture.check_ran()
        images = torch.tensor([b for b, _ in windows], device=xb.device)
        for layer, a in zip(layers, capture.activations, strict=True):
            a = _at_least_float32(a)
            w = alphas[layer][images].to(a.dtype).transpose(0, 1)  # [K, n, C]
            maps = FC.weighted_sum(w, a, a.ndim - 2).clamp_(min=0).transpose(0, 1)
            cams.add(FC.upsample(maps, plan.roi), windows, first=layer * k)
