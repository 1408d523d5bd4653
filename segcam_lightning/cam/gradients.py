"""The engine's third step: each hooked layer's maps from the scores, one strategy per way.

docs/architecture.md ("A call of the engine", step 3) explains the facts behind each. Every
strategy has the signature ``strategy(call, layers, flow) -> LayerMaps`` (maps ``[B, K, *s]``
per layer of ``layers``, in their order); :func:`layer_maps` chooses among them in one place:

- :func:`without_gradients`: gradient-free methods (EigenCAM, Score-CAM), all layers;
- :func:`head_path`: Grad-CAM at a layer whose only way to the logits is a pointwise linear
  head, ``Wᵀ · mean(dS/dlogits)`` without a backward pass (see
  :class:`~segcam_lightning.cam.capture._Heads`);
- the other layers, per class (:func:`per_class_strategy`): :func:`batched` (one
  ``is_grads_batched`` call), :func:`derived` (K - 1 passes for scores that sum to a constant)
  or :func:`per_class_loop` (one ``autograd.grad`` per class, also guided backprop).

Never ``.backward()``, never ``zero_grad()``: parameters' ``.grad`` are untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from segcam_lightning.cam.capture import _Capture, _GuidedReLU, _Heads
from segcam_lightning.cam.methods import _CAM, Rerun, _GradientCAM
from segcam_lightning.cam.readout import Readout
from segcam_lightning.cam.targets import Target

#: ``grad_mode="auto"`` batches the classes' gradients on CUDA for this many classes or more, up
#: to this many input pixels per channel in the batch (4 images of 256²): where it was faster
#: than the loop at the encoder and the decoder layers measured.
BATCHED_MIN_CLASSES = 8
BATCHED_MAX_ELEMENTS = 4 * 256 * 256


@dataclass(frozen=True)
class GradientCall:
    """What the strategies read: the engine's settings and one call's forward and scores.

    Attributes:
        method, target, grad_mode: the engine's.
        x: the input the forward ran on (requires grad with guided backprop).
        logits: the adapted logits ``[B, K_all, *s]``, in the model's dtype.
        float_logits: ``logits`` in float32 (float64), with the graph the scores hang on.
        scores, present: the target's ``[B, K_all]`` scores and presence.
        class_scores: per wanted class, its scores summed over the batch (one scalar each).
        classes: the ``K`` wanted class indices.
        masks, read: the target's ground truth and the reading (its kind resolved).
        guide: guided backprop's ReLU hooks, or ``None``.
        heads: the pointwise heads the forward found, or ``None`` (no head path).
        forward: float32 logits of a batch without a graph (Score-CAM's re-runs).
    """

    method: _CAM
    target: Target
    grad_mode: str
    x: Tensor
    logits: Tensor
    float_logits: Tensor
    scores: Tensor
    present: Tensor
    class_scores: Sequence[Tensor]
    classes: Tensor
    masks: Tensor | None
    read: Readout
    guide: _GuidedReLU | None
    heads: _Heads | None
    forward: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Layers:
    """The hooked layers a strategy serves: names, kept outputs (the tensors the gradients are
    taken w.r.t.), their float32 (float64) detached copies for the maths and, for the head
    path, each layer's head weight ``[K_all, C]`` (``None``: the layer is the logits)."""

    names: list[str]
    outputs: list[Tensor]
    activations: list[Tensor]
    heads: list[Tensor | None] = field(default_factory=list)

    def subset(self, indices: Sequence[int], heads: Sequence[Tensor | None] = ()) -> Layers:
        return Layers(
            [self.names[i] for i in indices],
            [self.outputs[i] for i in indices],
            [self.activations[i] for i in indices],
            list(heads),
        )


class LayerMaps(NamedTuple):
    """A strategy's result: maps ``[B, K, *s]`` per layer, and guided backprop
    ``[B, K, C_in, *spatial]`` when the strategy took it."""

    maps: list[Tensor]
    guided_backprop: Tensor | None = None


Strategy = Callable[[GradientCall, Layers, "_GradientFlow"], LayerMaps]


def layer_maps(call: GradientCall, capture: _Capture) -> LayerMaps:
    """Maps ``[B, K, *s]`` of every hooked layer, in the capture's order; warns about classes
    whose maps are blank. The choice of strategy is made here and in
    :func:`per_class_strategy`."""
    activations = [_at_least_float32(a.detach()) for a in capture.activations]
    layers = Layers(list(capture.names), list(capture.activations), activations)
    flow = _GradientFlow(call.x.shape[0], len(call.classes), call.x.device)
    if not isinstance(call.method, _GradientCAM):
        return without_gradients(call, layers, flow)
    _check_scores_have_graph(call, layers.names)
    served = {} if call.heads is None else call.heads.weights(call.logits)
    maps_at: dict[int, Tensor] = {}
    if served:
        found = head_path(call, layers.subset(list(served), list(served.values())), flow)
        maps_at.update(zip(served, found.maps, strict=True))
    rest = [i for i in range(len(activations)) if i not in maps_at]
    guided_backprop = None
    if rest:
        strategy = per_class_strategy(call)
        found = strategy(call, layers.subset(rest), flow)
        maps_at.update(zip(rest, found.maps, strict=True))
        guided_backprop = found.guided_backprop
    flow.warn_if_blank(call.present[:, call.classes], call.classes, layers.names, call.read.kind)
    return LayerMaps([maps_at[i] for i in range(len(activations))], guided_backprop)


def per_class_strategy(call: GradientCall) -> Strategy:
    """How the layers off the head path take per-class gradients: batched where
    :func:`use_batched` says so, derived where :func:`derives_one_class` does, else the loop.
    Guided backprop always loops: its clamped backward is taken per class, to the input."""
    if call.guide is None and use_batched(call.grad_mode, len(call.classes), call.x):
        return batched
    if call.guide is None and derives_one_class(call):
        return derived
    return per_class_loop


def may_take_head_path(method: _CAM, grad_mode: str, guided: bool) -> bool:
    """Whether a layer behind a pointwise head may take the head path (see
    :class:`~segcam_lightning.cam.capture._Heads`): a method whose weights are the mean
    gradient (Grad-CAM), no guided backprop, and ``grad_mode="auto"`` (``"loop"`` and
    ``"batched"`` always take per-class gradients). Decided before the forward, whose hooks
    find the heads."""
    return grad_mode == "auto" and not guided and getattr(method, "uses_mean_gradient", False)


def use_batched(grad_mode: str, num_classes: int, x: Tensor) -> bool:
    """Whether to take all classes' gradients in one ``is_grads_batched`` call.

    ``auto`` batches on a CUDA device for :data:`BATCHED_MIN_CLASSES` classes or more when
    the batch holds at most :data:`BATCHED_MAX_ELEMENTS` input pixels (voxels) per channel:
    there the many small backward passes are bound by kernel launches, which one batched
    call saves. Elsewhere it loops: batching runs the same convolutions on a K-times larger
    batch, so on the CPU it saves no work and adds its own overhead, and on larger GPU
    inputs it loses at encoder layers and holds all K gradients at once
    (``benchmarks/RESULTS.md``, CAM engine on CPU and GPU).
    """
    if num_classes < 2 or grad_mode == "loop":
        return False
    return grad_mode == "batched" or auto_batches(x.device.type, num_classes, x[:, 0].numel())


def derives_one_class(call: GradientCall) -> bool:
    """Whether to take K - 1 backward passes and derive the last class's gradient.

    Possible when all K classes are wanted and the target's scores sum to a constant per
    image (the gradients then sum to zero): softmax scores of a multiclass output, never
    sigmoid ones. Not with ``grad_mode="batched"``, which takes all classes in one call,
    nor with guided backprop, whose clamped backward is not linear.
    """
    return (
        call.read.kind == "multiclass"
        and call.target.scores_sum_to_constant
        and call.grad_mode != "batched"
        and len(call.classes) == call.scores.shape[1] > 1
    )


def without_gradients(call: GradientCall, layers: Layers, flow: _GradientFlow) -> LayerMaps:
    """Gradient-free methods (EigenCAM, Score-CAM): the maps from the activations and, for
    Score-CAM, masked forwards through the rerun context. ``flow`` is not used."""
    rerun = Rerun(
        images=call.x.detach(),
        forward=call.forward,
        score=call.target.scorer(_at_least_float32(call.logits.detach()), call.masks, call.read),
        baseline=call.scores.detach(),
        classes=call.classes,
    )
    return LayerMaps([call.method(a, rerun) for a in layers.activations])  # type: ignore[operator]


def head_path(call: GradientCall, layers: Layers, flow: _GradientFlow) -> LayerMaps:
    """Grad-CAM weights without a backward pass: ``Wᵀ · mean_p dS/dlogits(p)`` per layer,
    from the target's :meth:`~segcam_lightning.cam.targets.Target.mean_logit_gradients`."""
    method: _GradientCAM = call.method  # type: ignore[assignment]
    grads = call.target.mean_logit_gradients(call.float_logits, call.classes, call.masks, call.read)
    maps = []
    for a, head in zip(layers.activations, layers.heads, strict=True):
        w = grads if head is None else grads @ head.to(grads.dtype)
        w = w.transpose(0, 1).to(a.dtype)  # [K, B, C]
        flow.add_all(w)
        maps.append(method.from_mean_gradients(a, w).transpose(0, 1))  # type: ignore[attr-defined]
    return LayerMaps(maps)


def batched(call: GradientCall, layers: Layers, flow: _GradientFlow) -> LayerMaps:
    """All classes' gradients in one ``autograd.grad(..., is_grads_batched=True)`` call."""
    method: _GradientCAM = call.method  # type: ignore[assignment]
    scores, classes = call.scores, call.classes
    eye = torch.eye(scores.shape[1], device=scores.device, dtype=scores.dtype)
    cotangents = eye[classes].unsqueeze(1).expand(-1, scores.shape[0], -1).contiguous()
    grads = torch.autograd.grad(
        scores, layers.outputs, cotangents, is_grads_batched=True, allow_unused=True
    )
    _check_connected(layers.names, grads)
    for g in grads:
        flow.add_all(g)
    # [K, B, *s] -> [B, K, *s]
    maps = [method(a, g.to(a.dtype)) for a, g in zip(layers.activations, grads, strict=True)]
    return LayerMaps([m.transpose(0, 1) for m in maps])


def per_class_loop(call: GradientCall, layers: Layers, flow: _GradientFlow) -> LayerMaps:
    """One ``autograd.grad`` per class (``retain_graph`` between them) for all layers at once;
    with guided backprop, one more per class to the input through the clamped ReLUs."""
    method: _GradientCAM = call.method  # type: ignore[assignment]
    guide, num = call.guide, len(call.classes)
    per_layer: list[list[Tensor]] = [[] for _ in layers.outputs]
    guided: list[Tensor] = []
    for j, score in enumerate(call.class_scores):
        last = j == num - 1
        grads = torch.autograd.grad(
            score, layers.outputs, retain_graph=not last or guide is not None, allow_unused=True
        )
        _check_connected(layers.names, grads)
        for maps, a, g in zip(per_layer, layers.activations, grads, strict=True):
            flow.add(g, j)
            maps.append(method(a, g.to(a.dtype)))
        del grads
        if guide is not None:
            with guide.guiding():
                (grad_x,) = torch.autograd.grad(score, call.x, retain_graph=not last)
            guided.append(grad_x.float())
    maps = [torch.stack(m, dim=1) for m in per_layer]
    return LayerMaps(maps, torch.stack(guided, dim=1) if guide is not None else None)


def derived(call: GradientCall, layers: Layers, flow: _GradientFlow) -> LayerMaps:
    """K - 1 backward passes (all K classes wanted, scores that sum to a constant).

    For such scores ``sum_k dS_k/dA = 0``, so one class's gradient is minus the sum of the
    others'. Each image derives its own highest-scoring class (never an absent one, whose tiny
    gradient would drown in the others' rounding error); pass ``j`` takes, per image, the
    gradient of that image's ``j``-th remaining class with a one-hot cotangent on ``scores``.
    Measured against K direct passes in the tests.
    """
    method: _GradientCAM = call.method  # type: ignore[assignment]
    scores, classes, outputs = call.scores, call.classes, layers.outputs
    num = len(classes)
    # Positions in `classes` per image: the K - 1 computed ones, then the derived one.
    order = scores.detach()[:, classes].argsort(dim=1, stable=True)
    per_layer: list[list[Tensor]] = [[] for _ in outputs]
    total: list[Tensor | None] = [None] * len(outputs)
    for j in range(num - 1):
        cotangent = torch.zeros_like(scores)
        cotangent.scatter_(1, classes[order[:, j : j + 1]], 1.0)
        grads = torch.autograd.grad(
            scores, outputs, cotangent, retain_graph=j < num - 2, allow_unused=True
        )
        _check_connected(layers.names, grads)
        for i, (a, g) in enumerate(zip(layers.activations, grads, strict=True)):
            g = g.to(a.dtype)
            flow.add(g, order[:, j])
            per_layer[i].append(method(a, g))
            # In place: the first gradient is not needed any more once its map is made.
            total[i] = g if total[i] is None else total[i].add_(g)  # type: ignore[union-attr]
        del grads
    maps = []
    for i, a in enumerate(layers.activations):
        flow.add(total[i], order[:, -1])  # type: ignore[arg-type]
        per_layer[i].append(method(a, total[i].neg_()))  # type: ignore[union-attr]
        stacked = torch.stack(per_layer[i], dim=1)  # [B, K, *s] in `order`
        index = order.view(*order.shape, *[1] * (a.ndim - 2)).expand_as(stacked)
        maps.append(torch.empty_like(stacked).scatter_(1, index, stacked))
    return LayerMaps(maps)


def _check_scores_have_graph(call: GradientCall, names: Sequence[str]) -> None:
    if call.scores.requires_grad:
        return
    if not call.float_logits.requires_grad:
        # The capture switches grad mode on at the first hooked layer: logits without a graph
        # were computed from none of them.
        raise _NotReached(names)
    raise RuntimeError(
        f"The target scores do not depend on the hooked layers {list(names)}: the target "
        "returned scores without a graph. A target must compute its scores from the logits it "
        "receives with differentiable operations."
    )


class _NotReached(Exception):
    """Hooked layers whose outputs the logits do not depend on; :meth:`CAMEngine.__call__`
    turns it into a message that lists layers that do."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(", ".join(names))
        self.names = list(names)


def _check_connected(names: Sequence[str], grads: Sequence[Tensor | None]) -> None:
    unreached = [name for name, grad in zip(names, grads, strict=True) if grad is None]
    if unreached:
        raise _NotReached(unreached)


class _GradientFlow:
    """Which images and classes got a non-zero gradient at some hooked layer, to warn about
    blank maps.

    A class's maps are blank (all zero) when its score's gradient is exactly zero at every
    hooked layer: a constant score (a softmax over one channel, a target that ignores the
    logits) or a saturated one (probabilities rounded to exactly 0 or 1). Nothing in the maps
    says why, so :meth:`warn_if_blank` does. The check reads every gradient once (two
    reductions, nothing written of the gradient's size): see benchmarks/RESULTS.md,
    "Implementation notes", for what it costs.
    """

    def __init__(self, batch_size: int, num_classes: int, device: torch.device) -> None:
        self.nonzero = torch.zeros(batch_size, num_classes, dtype=torch.bool, device=device)
        self._rows = torch.arange(batch_size, device=device)

    def add(self, grads: Tensor, positions: int | Tensor) -> None:
        """Record gradients ``[B, C, *s]``: image ``b``'s is that of class ``positions[b]``
        (a position in the call's ``classes``; an int for all images)."""
        self.nonzero[self._rows, positions] |= _nonzero(grads.flatten(1))

    def add_all(self, grads: Tensor) -> None:
        """Record gradients ``[K, B, C, *s]`` of every class at once."""
        self.nonzero |= _nonzero(grads.flatten(2)).T

    def warn_if_blank(
        self, present: Tensor, classes: Tensor, layers: Sequence[str], kind: str
    ) -> None:
        """One ``RuntimeWarning`` naming the classes that are present in some image but got a
        zero gradient at every layer in every image where they are present."""
        present_somewhere = present.any(dim=0)
        flowing = (present & self.nonzero).any(dim=0)
        blank = classes[present_somewhere & ~flowing].tolist()
        if not blank:
            return
        warnings.warn(
            f"The CAMs of class(es) {blank} are blank (all zero): their target score has exactly "
            f"zero gradient w.r.t. the hooked layers {list(layers)} ({kind} output) wherever the "
            "class is present, so the maps explain nothing. The score is constant or saturated: "
            "e.g. a softmax over one output channel (for a one-channel sigmoid model pass "
            "Readout('binary')), a target that does not use the logits, or probabilities "
            "rounded to exactly 0 or 1 everywhere. Use another target (e.g. 'logit_region', "
            "which does not saturate), another layer, or check the model's logits for these "
            "classes.",
            RuntimeWarning,
            stacklevel=5,  # warn_if_blank, layer_maps, CAMEngine._run, __call__, caller
        )


def _nonzero(values: Tensor) -> Tensor:
    """Whether any entry of the last dimension is non-zero (NaN counts): its maximum or minimum
    is. Two reductions read the gradient and write nothing of its size (the measured choice:
    benchmarks/RESULTS.md, "Implementation notes")."""
    return values.amax(dim=-1).ne(0) | values.amin(dim=-1).ne(0)


def auto_batches(device_type: str, num_classes: int, elements: int) -> bool:
    """``grad_mode="auto"``'s choice: batch the classes' gradients on CUDA for
    :data:`BATCHED_MIN_CLASSES` classes or more and at most :data:`BATCHED_MAX_ELEMENTS` input
    pixels per channel in the batch (``elements``)."""
    return (
        device_type == "cuda"
        and num_classes >= BATCHED_MIN_CLASSES
        and elements <= BATCHED_MAX_ELEMENTS
    )


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Half-precision tensors (autocast) to float32; float32 and float64 unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
