"""The CAM engine: every class of every image from one forward pass, without side effects.

How a call works (docs/architecture.md explains the facts behind each step):

1. Every module goes to eval mode (each module's own flag is restored afterwards), RNG states
   are forked, compiled code runs eagerly (``torch.compiler.set_stance("force_eager")``) and an
   outer ``torch.inference_mode()`` is left; the input is cloned so inference tensors can be
   used.
2. One forward with forward hooks on the requested layers. The forward starts under
   ``torch.no_grad()``; the first hooked layer to run turns the graph on and makes its output a
   leaf, so nothing before the earliest layer is recorded (parameters may all be frozen). Each
   hook hands a copy of the output downstream, so later in-place ops (the seed's layers *are*
   ``ReLU(inplace=True)``) cannot change what was captured. Module backward hooks are not used:
   they fail on in-place ops (pytorch#61519).
3. The target reduces the logits (at the model's output resolution, which may be lower than the
   input's) to scores ``[B, K]``, read as the output kind says (softmax for ``"multiclass"``,
   sigmoids for ``"binary"`` and ``"multilabel"``); for each class,
   ``torch.autograd.grad(scores[:, k].sum(), activations)`` gives every image its own gradient
   (images are independent in eval mode) for all layers at once. Never ``.backward()``, never
   ``zero_grad()``: parameters' ``.grad`` are untouched. The head path skips these passes for
   Grad-CAM at a layer whose only way to the logits is a pointwise linear head (a 1×1
   convolution, as after the seed's ``d4``): its weights are ``Wᵀ · mean(dS/dlogits)`` for all
   classes at once (see :class:`_Heads`).
4. CAM maths in float32 (float64 for a float64 model) under ``torch.no_grad()`` with autocast
   off: weights, weighted sum, ReLU at the layer's resolution, bilinear upsampling to the input
   size, raw maxima, normalisation. Everything stays on the model's device. A class whose
   score has exactly zero gradient at every hooked layer (a constant or saturated score) would
   get blank maps: the call warns instead of returning them silently.

Images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]`` go through the same steps: the engine
reads which from ``images.ndim``, expects the hooked layers and the logits to have as many
dimensions as the input (``[B, C, d, h, w]``, ``[B, K, D, H, W]`` for volumes), averages
weights over all ``d·h·w`` positions, upsamples trilinearly (``align_corners=False``) and
normalises each map over all its voxels. Shapes below are written for images; a volume has
``D`` (``d``) before ``H, W`` (``h, w``).

Example:
    >>> import torch
    >>> from segcam_lightning.models import UNet
    >>> net = UNet(num_classes=3, base_width=4)
    >>> engine = CAMEngine(net, layers=["d4.conv.conv.5"], method="gradcam")
    >>> result = engine(torch.rand(2, 3, 32, 32))
    >>> result.cams.shape, result.raw_max.shape
    (torch.Size([2, 1, 3, 32, 32]), torch.Size([2, 1, 3]))
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import (
    NORMALIZE_MODES,
    OUTPUT_KINDS,
    NormalizeMode,
    OutputKind,
)
from segcam_lightning.cam.layers import (
    _LIST_HINT,
    default_output_adapter,
    eval_mode,
    find_layer,
    force_eager,
    layers_to_logits,
    preserve_rng,
    unwrap_compiled,
)
from segcam_lightning.cam.methods import _CAM, Probe, _GradientCAM, get_method
from segcam_lightning.cam.targets import Reading, Target, get_target

__all__ = ["GRAD_MODES", "OUTPUT_KINDS", "CAMEngine", "CAMResult", "default_output_adapter"]

GradMode = Literal["auto", "loop", "batched"]
GRAD_MODES: tuple[str, ...] = ("auto", "loop", "batched")
#: ``grad_mode="auto"`` batches the classes' gradients on CUDA for this many classes or more, up
#: to this many input pixels per channel in the batch (4 images of 256²): where it was faster
#: than the loop at the encoder and the decoder layers measured.
BATCHED_MIN_CLASSES = 8
BATCHED_MAX_ELEMENTS = 4 * 256 * 256


@dataclass(frozen=True)
class CAMResult:
    """What one engine call returns; every tensor is detached and on the model's device.

    Attributes:
        cams: ``[B, L, K, H, W]`` float32 maps at input resolution, in ``[0, 1]`` unless
            ``normalize="none"``; ``[B, L, K, D, H, W]`` for volumes (``[B, L, K, *spatial]``).
        raw_max: ``[B, L, K]`` maxima of the ReLU'd, upsampled maps before normalisation (the
            scale ``minmax`` divides away: compare classes with it).
        logits: the model's logits ``[B, K_all, H, W]`` (``[B, K_all, D, H, W]``) from the same
            forward, in the model's dtype.
        scores: ``[B, K_all]`` float32 target scores of every class.
        present: ``[B, K]`` bool, false where a region target is empty (its maps are zero).
        layers: the ``L`` layer names, in the order of ``cams``' second dimension.
        classes: the ``K`` output channel indices, in the order of ``cams``' third dimension
            (``(0,)`` for a binary model: the map of its one channel explains the foreground).
        guided_backprop: ``[B, K, C_in, *spatial]`` float32 guided backpropagation (raw, signed)
            when the engine is ``guided``, else ``None``.
        output_kind: the resolved output kind, ``"multiclass"``, ``"binary"`` or
            ``"multilabel"``.
    """

    cams: Tensor
    raw_max: Tensor
    logits: Tensor
    scores: Tensor
    present: Tensor
    layers: tuple[str, ...]
    classes: tuple[int, ...]
    guided_backprop: Tensor | None = None
    output_kind: str = "multiclass"

    @property
    def guided_cams(self) -> Tensor:
        """Guided Grad-CAM ``[B, L, K, C_in, *spatial]``: guided backpropagation × ``cams``.

        Raises:
            ValueError: when the engine was not guided.
        """
        if self.guided_backprop is None:
            raise ValueError(
                "This result has no guided backpropagation: create the engine with "
                "`method='guided_gradcam'` or `guided=True`."
            )
        return FC.guided_gradcam(self.guided_backprop, self.cams)

    def layer(self, name: str) -> Tensor:
        """The maps ``[B, K, *spatial]`` of one layer.

        Raises:
            KeyError: when ``name`` is not one of ``layers``.
        """
        if name not in self.layers:
            raise KeyError(f"Expected one of the layers {list(self.layers)}, but got {name!r}.")
        return self.cams[:, self.layers.index(name)]


class CAMEngine:
    """Class activation maps for every requested class, image and layer from one forward pass.

    Args:
        model: segmentation network returning logits ``[B, K, h, w]`` at any resolution (or a
            dict/tuple, see ``output_adapter``); the maps are upsampled to the input's ``H, W``.
            A 3-D network takes volumes ``[B, C, D, H, W]`` and returns ``[B, K, d, h, w]``.
            It is never modified: flags, gradients, statistics and RNG states are the same after
            a call, and no hook outlives a call.
        layers: layer name(s) as in ``model.named_modules()`` (or the modules themselves);
            resolved here, so a typo fails early with suggestions.
        method: a name in :data:`~segcam_lightning.cam.methods.METHODS` (``"gradcam"``,
            ``"hirescam"``, ``"xgradcam"``, ``"gradcam++"``, ``"layercam"``, ``"scorecam"``,
            ``"eigencam"``, ``"guided_gradcam"``), a method instance (e.g.
            ``ScoreCAM(max_channels=32)``) or a weight function ``f(A, dY/dA) -> [..., C]``.
        target: a name in :data:`~segcam_lightning.cam.targets.TARGETS` (``"softmax_mean"``,
            ``"logit_region"``, ``"gt_region"``), a :class:`~segcam_lightning.cam.targets.Target`
            (``PixelTarget``, ``BoxTarget``) or a callable
            ``f(logits [B, K, H, W], masks) -> scores [B, K]`` (or ``(scores, present)``).
        normalize: ``"minmax"`` (each map to ``[0, 1]``), ``"global"`` (one scale per image and
            layer, shared by the classes) or ``"none"``; see
            :func:`~segcam_lightning.cam.functional.normalize_cams`. Maps are normalised after
            upsampling to the input size, as the seed did, so every map peaks at exactly 1.
        output_kind: how the logits' channels are read, one of :data:`OUTPUT_KINDS`:
            ``"multiclass"`` (softmax over K >= 2 channels), ``"binary"`` (one sigmoid channel;
            ``classes`` is ``(0,)`` and its map explains the foreground, label 1),
            ``"multilabel"`` (K independent sigmoids, overlapping classes) or ``"auto"`` (one
            channel is binary, more are multiclass; multi-label must be asked for). Resolved at
            call time from the logits; ``"multiclass"`` on one channel raises.
        threshold: probability in ``(0, 1)`` above which a sigmoid pixel is predicted (binary,
            multilabel): ``logit_region`` uses ``logit > log(t / (1 - t))``.
        guided: also return guided backpropagation (``result.guided_backprop``) and guided CAMs
            (``result.guided_cams``); implied by ``method="guided_gradcam"``. Needs a gradient
            method and one extra backward pass to the input per class.
        output_adapter: ``f(model_output) -> logits``; default :func:`default_output_adapter`.
        grad_mode: how per-class gradients are taken: ``"loop"`` (one
            ``autograd.grad`` per class, ``retain_graph`` between them), ``"batched"`` (one call
            with ``is_grads_batched=True``) or ``"auto"`` (batched for small inputs on a CUDA
            device, else the loop; see :meth:`_use_batched`). With ``"auto"``, Grad-CAM at a
            layer that reaches the logits only through a 1×1 convolution (or is the logits)
            takes no per-class gradient at all: the head path, see :class:`_Heads`.

    Raises:
        TypeError, ValueError: for invalid arguments; messages say what was expected.

    Example:
        >>> engine = CAMEngine(net, ["e4.conv.conv.5", "d4.conv.conv.5"], method="layercam")
        >>> result = engine(images, classes=[1, 2])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | nn.Module | Sequence[str | nn.Module],
        method: str | _CAM | type[_CAM] | Callable[[Tensor, Tensor], Tensor] = "gradcam",
        target: str | Target | Callable[..., Any] = "softmax_mean",
        normalize: NormalizeMode = "minmax",
        *,
        output_kind: OutputKind = "auto",
        threshold: float = 0.5,
        guided: bool = False,
        output_adapter: Callable[[Any], Tensor] | None = None,
        grad_mode: GradMode = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}."
            )
        self.model = model
        self.layer_names, self._modules = _resolve_layers(model, layers)
        self.method = get_method(method)
        self.target = get_target(target)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(
                f"Expected `normalize` to be one of {NORMALIZE_MODES}, but got {normalize!r}."
            )
        self.normalize: NormalizeMode = normalize
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(
                f"Expected `output_kind` to be one of {OUTPUT_KINDS}, but got {output_kind!r}."
            )
        self.output_kind: OutputKind = output_kind
        FC.threshold_logit(threshold)  # validates
        self.threshold = float(threshold)
        if not isinstance(guided, bool):
            raise TypeError(f"Expected `guided` to be a bool, but got {type(guided).__name__}.")
        self.guided = guided or self.method.guided
        if self.guided and not self.method.needs_gradients:
            raise ValueError(
                f"Guided backpropagation needs a gradient method (e.g. 'gradcam'), but `method` "
                f"is {self.method!r}, which is gradient-free; drop `guided=True`."
            )
        if output_adapter is not None and not callable(output_adapter):
            raise TypeError(
                "Expected `output_adapter` to be a callable f(model_output) -> logits or None, "
                f"but got {type(output_adapter).__name__}."
            )
        self.output_adapter = output_adapter or default_output_adapter
        if grad_mode not in GRAD_MODES:
            raise ValueError(
                f"Expected `grad_mode` to be one of {GRAD_MODES}, but got {grad_mode!r}."
            )
        self.grad_mode: GradMode = grad_mode

    def __repr__(self) -> str:
        return (
            f"CAMEngine(layers={self.layer_names}, method={self.method!r}, "
            f"target={self.target!r}, normalize={self.normalize!r}, "
            f"output_kind={self.output_kind!r}, guided={self.guided})"
        )

    def __call__(
        self,
        images: Tensor,
        classes: int | Sequence[int] | Tensor | None = None,
        masks: Tensor | None = None,
    ) -> CAMResult:
        """Compute the CAMs of a batch.

        Args:
            images: ``[B, C_in, H, W]`` float batch of images, or ``[B, C_in, D, H, W]`` of
                volumes (moved to the model's device; inference tensors are fine).
            classes: class indices to explain (``K`` of them, in this order); ``None`` for all.
            masks: ground truth for ``target="gt_region"``: labels ``[B, H, W]`` or per-class
                masks ``[B, K_all, H, W]`` (volumes: ``[B, D, H, W]``, ``[B, K_all, D, H, W]``)
                at the input's resolution (nearest-resized to the logits') or the logits';
                passed to callable targets as is.

        Returns:
            A :class:`CAMResult` with ``cams`` ``[B, L, K, H, W]`` (``[B, L, K, D, H, W]``).
        """
        _check_images(images)
        wanted = _check_classes(classes)
        device = _model_device(self.model, images)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(preserve_rng(device))
            stack.enter_context(force_eager())
            x = images.to(device).clone()
            if isinstance(masks, Tensor):
                masks = masks.to(device).clone()
            try:
                return self._run(x, wanted, masks)
            except _NotReached as error:
                raise RuntimeError(self._not_reached_message(error.names, x)) from None

    def _not_reached_message(self, names: Sequence[str], x: Tensor) -> str:
        """Says which hooked layers the logits do not depend on, and names layers that they
        do depend on (the last few through which every path to the logits runs)."""
        try:
            reaching = layers_to_logits(self.model, x[:1], self.output_adapter)
        except Exception:  # the listing is a courtesy: the error stands without it
            reaching = []
        shown = ", ".join(repr(n) for n in reaching[-6:])
        listed = f" Layers that do: {shown}." if reaching else ""
        which = ", ".join(repr(n) for n in names)
        return (
            f"Layer {which} does not reach the logits: the scores the target computes from the "
            f"logits do not depend on its output (a branch such as an auxiliary head, or a "
            f"module the forward does not use for the logits the output adapter picks).{listed} "
            f"{_LIST_HINT} On torch < 2.6 a torch.compile'd model also gets here: pass the "
            "uncompiled module."
        )

    def _run(self, x: Tensor, wanted: list[int] | None, masks: Tensor | None) -> CAMResult:
        # Score-CAM's masked forwards run inside the float32 block below: they get the caller's
        # autocast back, so they see the precision the main forward saw.
        device_type = x.device.type
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        capture = _Capture(self.layer_names, self._modules, self.method.needs_gradients, x.ndim)
        guide = _GuidedReLU(unwrap_compiled(self.model)) if self.guided else None
        heads = _Heads(unwrap_compiled(self.model), capture, x.ndim) if self._may_skip() else None
        with ExitStack() as stack:
            stack.enter_context(capture.hooks())
            if heads is not None:
                stack.enter_context(heads.hooks())
            if guide is not None:
                x.requires_grad_(True)
                stack.enter_context(guide.hooks())
            # Without guided backprop the graph only has to start at the earliest hooked layer:
            # the capture hook switches grad mode on there (see _Capture._hook).
            stack.enter_context(torch.enable_grad() if guide is not None else torch.no_grad())
            output = self.model(x)
        capture.check_ran()
        logits = self._adapt(output, x)
        kind = FC.resolve_output_kind(self.output_kind, logits.shape[1])
        classes = _select_classes(wanted, logits.shape[1], x.device)
        size = tuple(x.shape[2:])  # the input's H, W (D, H, W)
        if self.target.needs_masks:
            _check_masks(masks, size, logits.shape)
        read = Reading(kind, self.threshold)
        with torch.set_grad_enabled(self.method.needs_gradients):
            float_logits = _at_least_float32(logits)
            scores, present = self.target(float_logits, masks, read)
            # One scalar per class: summing over the batch gives each image its own gradient.
            class_scores = scores[:, classes].sum(dim=0).unbind()

        guided_backprop = None
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            activations = [_at_least_float32(a.detach()) for a in capture.activations]
            if isinstance(self.method, _GradientCAM):
                if not scores.requires_grad:
                    if not float_logits.requires_grad:
                        # The capture switches grad mode on at the first hooked layer: logits
                        # without a graph were computed from none of them.
                        raise _NotReached(self.layer_names)
                    raise RuntimeError(
                        f"The target scores do not depend on the hooked layers "
                        f"{self.layer_names}: the target returned scores without a graph. A "
                        "target must compute its scores from the logits it receives with "
                        "differentiable operations."
                    )
                flow = _GradientFlow(x.shape[0], len(classes), x.device)
                weights = {} if heads is None else heads.weights(logits)
                maps_at: dict[int, Tensor] = {}
                if weights:
                    # The head path: Grad-CAM weights without a backward pass.
                    grads = self.target.mean_logit_gradients(float_logits, classes, masks, read)
                    for i, head in weights.items():
                        w = grads if head is None else grads @ head.to(grads.dtype)
                        w = w.transpose(0, 1).to(activations[i].dtype)  # [K, B, C]
                        flow.add_all(w)
                        maps_at[i] = self.method.from_mean_gradients(  # type: ignore[attr-defined]
                            activations[i], w
                        ).transpose(0, 1)
                rest = [i for i in range(len(activations)) if i not in maps_at]
                if rest:
                    layers = _Layers(
                        [self.layer_names[i] for i in rest],
                        [capture.activations[i] for i in rest],
                        [activations[i] for i in rest],
                    )
                    batched = guide is None and self._use_batched(len(classes), x)
                    if (
                        guide is None
                        and not batched
                        and self._derive_one_class(kind, len(classes), scores.shape[1])
                    ):
                        found = self._gradient_maps_derived(scores, layers, classes, flow)
                    else:
                        found, guided_backprop = self._gradient_maps(
                            scores, class_scores, layers, classes, x, guide, flow
                        )
                    maps_at.update(zip(rest, found, strict=True))
                maps = [maps_at[i] for i in range(len(activations))]
                flow.warn_if_blank(present[:, classes], classes, self.layer_names, kind)
            else:
                probe = Probe(
                    images=x.detach(),
                    forward=partial(self._forward_logits, autocast=autocast),
                    score=self.target.scorer(_at_least_float32(logits.detach()), masks, read),
                    baseline=scores.detach(),
                    classes=classes,
                )
                maps = [self.method(a, probe) for a in activations]  # type: ignore[operator]
            cams = torch.stack([FC.upsample(m, size) for m in maps], dim=1)  # [B, L, K, *size]
            present = present[:, classes]
            cams = cams * present.view(*present.shape[:1], 1, -1, *[1] * len(size))
            raw_max = cams.flatten(3).amax(dim=-1)
            cams = FC.normalize_cams(cams, self.normalize, spatial_dims=len(size))
        return CAMResult(
            cams=cams.float(),
            raw_max=raw_max.float(),
            logits=logits.detach(),
            scores=scores.detach().float(),
            present=present,
            layers=tuple(self.layer_names),
            classes=tuple(classes.tolist()),
            guided_backprop=guided_backprop,
            output_kind=kind,
        )

    def _gradient_maps(
        self,
        scores: Tensor,
        class_scores: Sequence[Tensor],
        layers: _Layers,
        classes: Tensor,
        x: Tensor,
        guide: _GuidedReLU | None,
        flow: _GradientFlow,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Per-layer maps ``[B, K, *s]`` (and guided backprop) from one set of backward passes."""
        method: _GradientCAM = self.method  # type: ignore[assignment]
        outputs, activations = layers.outputs, layers.activations
        if guide is None and self._use_batched(len(classes), x):
            eye = torch.eye(scores.shape[1], device=scores.device, dtype=scores.dtype)
            cotangents = eye[classes].unsqueeze(1).expand(-1, scores.shape[0], -1).contiguous()
            grads = torch.autograd.grad(
                scores, outputs, cotangents, is_grads_batched=True, allow_unused=True
            )
            _check_connected(layers.names, grads)
            for g in grads:
                flow.add_all(g)
            # [K, B, *s] -> [B, K, *s]
            maps = [method(a, g.to(a.dtype)) for a, g in zip(activations, grads, strict=True)]
            return [m.transpose(0, 1) for m in maps], None

        per_layer: list[list[Tensor]] = [[] for _ in outputs]
        guided: list[Tensor] = []
        for j, score in enumerate(class_scores):
            last = j == len(classes) - 1
            grads = torch.autograd.grad(
                score, outputs, retain_graph=not last or guide is not None, allow_unused=True
            )
            _check_connected(layers.names, grads)
            for maps, a, g in zip(per_layer, activations, grads, strict=True):
                flow.add(g, j)
                maps.append(method(a, g.to(a.dtype)))
            del grads
            if guide is not None:
                with guide.guiding():
                    (grad_x,) = torch.autograd.grad(score, x, retain_graph=not last)
                guided.append(grad_x.float())
        maps = [torch.stack(m, dim=1) for m in per_layer]
        return maps, (torch.stack(guided, dim=1) if guide is not None else None)

    def _derive_one_class(self, kind: str, num_wanted: int, num_classes: int) -> bool:
        """Whether to take K - 1 backward passes and derive the last class's gradient.

        Possible when all K classes are wanted and the target's scores sum to a constant per
        image (the gradients then sum to zero): softmax scores of a multiclass output, never
        sigmoid ones. Not with ``grad_mode="batched"``, which takes all classes in one call,
        nor with guided backprop, whose clamped backward is not linear.
        """
        return (
            kind == "multiclass"
            and self.target.scores_sum_to_constant
            and self.grad_mode != "batched"
            and num_wanted == num_classes > 1
        )

    def _gradient_maps_derived(
        self, scores: Tensor, layers: _Layers, classes: Tensor, flow: _GradientFlow
    ) -> list[Tensor]:
        """Per-layer maps ``[B, K, *s]`` from K - 1 backward passes (all K classes wanted).

        For scores that sum to a constant, ``sum_k dS_k/dA = 0``, so one class's gradient is
        minus the sum of the others'. Each image derives its own highest-scoring class (never an
        absent one, whose tiny gradient would drown in the others' rounding error); pass ``j``
        takes, per image, the gradient of that image's ``j``-th remaining class with a one-hot
        cotangent on ``scores``. Measured against K direct passes in the tests.
        """
        method: _GradientCAM = self.method  # type: ignore[assignment]
        outputs, activations = layers.outputs, layers.activations
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
            for i, (a, g) in enumerate(zip(activations, grads, strict=True)):
                g = g.to(a.dtype)
                flow.add(g, order[:, j])
                per_layer[i].append(method(a, g))
                # In place: the first gradient is not needed any more once its map is made.
                total[i] = g if total[i] is None else total[i].add_(g)  # type: ignore[union-attr]
            del grads
        maps = []
        for i, a in enumerate(activations):
            flow.add(total[i], order[:, -1])  # type: ignore[arg-type]
            per_layer[i].append(method(a, total[i].neg_()))  # type: ignore[union-attr]
            stacked = torch.stack(per_layer[i], dim=1)  # [B, K, *s] in `order`
            index = order.view(*order.shape, *[1] * (a.ndim - 2)).expand_as(stacked)
            maps.append(torch.empty_like(stacked).scatter_(1, index, stacked))
        return maps

    def _use_batched(self, num_classes: int, x: Tensor) -> bool:
        """Whether to take all classes' gradients in one ``is_grads_batched`` call.

        ``auto`` batches on a CUDA device for :data:`BATCHED_MIN_CLASSES` classes or more when
        the batch holds at most :data:`BATCHED_MAX_ELEMENTS` input pixels (voxels) per channel:
        there the many small backward passes are bound by kernel launches, which one batched
        call saves. Elsewhere it loops: batching runs the same convolutions on a K-times larger
        batch, so on the CPU it saves no work and adds its own overhead, and on larger GPU
        inputs it loses at encoder layers and holds all K gradients at once
        (``benchmarks/RESULTS.md``, CAM engine on CPU and GPU).
        """
        if num_classes < 2 or self.grad_mode == "loop":
            return False
        return self.grad_mode == "batched" or auto_batches(
            x.device.type, num_classes, x[:, 0].numel()
        )

    def _may_skip(self) -> bool:
        """Whether a layer behind a pointwise head may take the head path (see :class:`_Heads`):
        a method whose weights are the mean gradient (Grad-CAM), no guided backprop, and
        ``grad_mode="auto"`` (``"loop"`` and ``"batched"`` always take per-class gradients)."""
        return (
            self.grad_mode == "auto"
            and not self.guided
            and getattr(self.method, "uses_mean_gradient", False)
        )

    def _adapt(self, output: Any, images: Tensor) -> Tensor:
        """The logits in the model's output; they have as many dimensions as ``images``."""
        logits = self.output_adapter(output)
        batch_size = images.shape[0]
        if (
            not isinstance(logits, Tensor)
            or logits.ndim != images.ndim
            or logits.shape[0] != batch_size
        ):
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            expected = FC.shape_label("B", "K", spatial_dims=images.ndim - 2)
            volume = f" for volumes {list(images.shape)}" if images.ndim == 5 else ""
            raise ValueError(
                f"Expected the model's logits as a tensor {expected} with B = {batch_size}"
                f"{volume}, but the output adapter gave {got}. Pass `output_adapter=` to pick "
                "them from the model's output."
            )
        return logits

    def _forward_logits(self, images: Tensor, autocast: tuple[bool, torch.dtype]) -> Tensor:
        """Float32 logits of a batch, no graph, under the caller's autocast (Score-CAM)."""
        enabled, dtype = autocast
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=enabled):
            logits = self._adapt(self.model(images), images)
        return _at_least_float32(logits)


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


@dataclass(frozen=True)
class _Layers:
    """The hooked layers that take per-class gradients: names, kept outputs (the tensors the
    gradients are taken w.r.t.) and their float32 (float64) detached copies for the maths."""

    names: list[str]
    outputs: list[Tensor]
    activations: list[Tensor]


_POINTWISE_CONVS = {4: nn.Conv2d, 5: nn.Conv3d}
#: A module's hook dictionaries (``torch.nn.modules.module`` has the global ones, ``_global``
#: before each name).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def _forward_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register each ``(module, hook)`` forward hook; all are removed on exit, also on error."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Heads:
    """Finds hooked layers whose only way to the logits is a pointwise linear head.

    Grad-CAM's weights at a layer ``A`` with ``logits = W · A + b`` at every position (a 1×1
    convolution, stride 1, no padding, one group; or ``A`` is the logits, ``W = I``) are
    ``mean_p dS/dA(p) = Wᵀ · mean_p dS/dlogits(p)``: one ``[K, K_all] × [K_all, C]`` product per
    image from the target's :meth:`~segcam_lightning.cam.targets.Target.mean_logit_gradients`,
    instead of a backward pass per class that writes a ``[B, C, h, w]`` gradient. Equal in exact
    arithmetic; the tests compare both paths.

    The structure is read from the forward, not assumed: a forward hook on every plain
    ``nn.Conv2d`` (``nn.Conv3d`` for volumes) with a 1×1 kernel notes when one receives the very
    tensor a hooked layer handed downstream, unmodified (same object, same version counter), and
    :meth:`weights` accepts it only when its output is, unmodified, the tensor the output adapter
    returns as logits. Subclasses of the convolutions (they may change the forward) and
    parametrised weights are not recognised; those layers take the general path.
    """

    def __init__(self, model: nn.Module, capture: _Capture, ndim: int) -> None:
        conv = _POINTWISE_CONVS.get(ndim)
        # Global module hooks may change any output: then nothing is proven.
        hooked = any(getattr(torch.nn.modules.module, f"_global{name}") for name in _HOOK_DICTS)
        self.convs = [
            m for m in model.modules() if conv is not None and not hooked and _is_pointwise(m, conv)
        ]
        self.capture = capture
        # (layer index, head weight [K_all, C], weak reference to the output, its version)
        self._found: list[tuple[int, Tensor, weakref.ref[Tensor], int]] = []

    def hooks(self) -> AbstractContextManager[None]:
        return _forward_hooks((module, self._hook) for module in self.convs)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not inputs or not isinstance(output, Tensor):
            return
        index = self.capture.handed_index(inputs[0])
        if index is not None and not inputs[0]._backward_hooks:
            weight = module.weight.detach().flatten(1)  # type: ignore[union-attr]
            self._found.append((index, weight, weakref.ref(output), output._version))

    def weights(self, logits: Tensor) -> dict[int, Tensor | None]:
        """Layer index -> head weight ``[K_all, C]`` (``None``: the layer is the logits) for
        every hooked layer the head path may serve."""
        found: dict[int, Tensor | None] = {}
        if getattr(logits, "_backward_hooks", None):
            return found  # a tensor hook would change the gradients the loop takes
        for index, weight, output, version in self._found:
            if output() is logits and logits._version == version:
                found[index] = weight
        index = self.capture.handed_index(logits)
        if index is not None:
            found[index] = None
        return found


def _is_pointwise(module: nn.Module, conv: type[nn.Module]) -> bool:
    """A plain convolution of type ``conv`` with a 1×1 kernel, stride 1, no padding, one group,
    an ordinary weight (not parametrised) and no hooks of its own (a hook may replace its output
    or its gradients)."""
    if type(module) is not conv or any(getattr(module, name) for name in _HOOK_DICTS):
        return False
    padding = module.padding  # type: ignore[attr-defined]
    return (
        all(k == 1 for k in module.kernel_size)  # type: ignore[attr-defined]
        and all(s == 1 for s in module.stride)  # type: ignore[attr-defined]
        and (padding in ("valid", "same") or all(p == 0 for p in padding))
        and module.groups == 1  # type: ignore[attr-defined]
        and isinstance(module._parameters.get("weight"), Tensor)
    )


class _Capture:
    """Forward hooks that keep each hooked layer's output for the gradients.

    Args:
        names, modules: the hooked layers.
        track_grad: keep a graph from the earliest layer on (gradient methods).
        ndim: the input's number of dimensions (4 for images, 5 for volumes), which every
            hooked layer's output must have.
    """

    def __init__(
        self, names: list[str], modules: list[nn.Module], track_grad: bool, ndim: int = 4
    ) -> None:
        self.names = names
        self.modules = modules
        self.track_grad = track_grad
        self.ndim = ndim
        self.activations: list[Tensor] = []
        self._slots: list[Tensor | None] = [None] * len(names)
        # What each layer handed downstream (weakly: downstream may free it), and its version
        # counter then.
        self._handed: list[tuple[weakref.ref[Tensor], int] | None] = [None] * len(names)

    def hooks(self) -> AbstractContextManager[None]:
        return _forward_hooks(
            (module, partial(self._hook, index)) for index, module in enumerate(self.modules)
        )

    def _hook(self, index: int, module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
        name = self.names[index]
        if not isinstance(output, Tensor) or output.ndim != self.ndim:
            got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            if self.ndim == 5:
                expected = (
                    "one tensor [B, C, d, h, w] with the input's 5 dimensions (the input is a "
                    "volume [B, C, D, H, W])"
                )
            else:
                expected = "one tensor [B, C, h, w]"
            raise ValueError(
                f"Layer {name!r} ({type(module).__name__}) returned {got}; a CAM layer must "
                f"return {expected}. Pick another from "
                "segcam_lightning.cam.candidate_layers(model, example_input)."
            )
        if self._slots[index] is not None:
            raise RuntimeError(
                f"Layer {name!r} ran more than once in one forward (a module used in several "
                "places), so its activation is ambiguous. Pick a layer that runs once."
            )
        if not self.track_grad:
            self._slots[index] = output.detach().clone()
            return None
        if output.requires_grad:
            self._slots[index] = output
        else:
            # The earliest hooked layer: the forward ran without a graph so far, and nothing
            # before this point is needed for gradients w.r.t. it. Record from here on.
            torch.set_grad_enabled(True)
            self._slots[index] = output.detach().requires_grad_(True)
        # Downstream gets a copy, so in-place ops after the layer cannot change the kept
        # activation (nor touch a leaf that requires grad).
        handed = self._slots[index].clone()  # type: ignore[union-attr]
        self._handed[index] = (weakref.ref(handed), handed._version)
        return handed

    def handed_index(self, tensor: Tensor) -> int | None:
        """The index of the layer that handed ``tensor`` downstream, if it is still as handed
        (not modified in place since), else ``None``."""
        for index, entry in enumerate(self._handed):
            if entry is not None and entry[0]() is tensor and tensor._version == entry[1]:
                return index
        return None

    def check_ran(self) -> None:
        missing = [name for name, slot in zip(self.names, self._slots, strict=True) if slot is None]
        if missing:
            raise RuntimeError(
                f"Layer(s) {missing} did not run during the forward pass, so there is nothing to "
                "explain. Pick layers the forward uses (see "
                "segcam_lightning.cam.candidate_layers(model, example_input))."
            )
        self.activations = [slot for slot in self._slots if slot is not None]


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
            "output_kind='binary'), a target that does not use the logits, or probabilities "
            "rounded to exactly 0 or 1 everywhere. Use another target (e.g. 'logit_region', "
            "which does not saturate), another layer, or check the model's logits for these "
            "classes.",
            RuntimeWarning,
            stacklevel=4,
        )


def _nonzero(values: Tensor) -> Tensor:
    """Whether any entry of the last dimension is non-zero (NaN counts): its maximum or minimum
    is. Two reductions read the gradient and write nothing of its size, where ``abs().amax()``
    wrote a copy (15% of a K = 19 call at 256² on the CPU); ``aminmax`` and ``ne(0).any()`` are
    several times slower there."""
    return values.amax(dim=-1).ne(0) | values.amin(dim=-1).ne(0)


class _GuidedReLU:
    """Guided backpropagation: ``nn.ReLU`` outputs pass back only positive gradients.

    A forward hook registers a tensor hook on each ReLU output (this works with in-place ReLUs,
    unlike module backward hooks). The tensor hooks act only inside :meth:`guiding`, so the same
    graph also serves the ordinary gradients of the CAM; they die with the graph.
    """

    def __init__(self, model: nn.Module) -> None:
        self.relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        self.active = False

    def hooks(self) -> AbstractContextManager[None]:
        return _forward_hooks((relu, self._hook) for relu in self.relus)

    @contextmanager
    def guiding(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._clamp)

    def _clamp(self, grad: Tensor) -> Tensor | None:
        return grad.clamp(min=0) if self.active else None


def auto_batches(device_type: str, num_classes: int, elements: int) -> bool:
    """``grad_mode="auto"``'s choice: batch the classes' gradients on CUDA for
    :data:`BATCHED_MIN_CLASSES` classes or more and at most :data:`BATCHED_MAX_ELEMENTS` input
    pixels per channel in the batch (``elements``)."""
    return (
        device_type == "cuda"
        and num_classes >= BATCHED_MIN_CLASSES
        and elements <= BATCHED_MAX_ELEMENTS
    )


def _resolve_layers(
    model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]
) -> tuple[list[str], list[nn.Module]]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, Sequence) or isinstance(layers, (bytes, bytearray)):
        raise TypeError(
            "Expected `layers` to be a layer name or a list of names (e.g. ['d4.conv.conv.5']), "
            f"but got {type(layers).__name__}."
        )
    if len(layers) == 0:
        raise ValueError(
            "Expected `layers` to name at least one layer (e.g. ['d4.conv.conv.5']), but got an "
            "empty list."
        )
    names: list[str] = []
    modules: list[nn.Module] = []
    by_identity = {id(m): n for n, m in unwrap_compiled(model).named_modules()}
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_identity:
                raise ValueError(
                    f"The {type(layer).__name__} module passed in `layers` is not in the model."
                )
            name = by_identity[id(layer)]
        else:
            name = layer
        module = find_layer(model, name)  # type: ignore[arg-type]
        names.append(by_identity[id(module)])
        modules.append(module)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct layers, but `layers` repeats some: {names}.")
    return names, modules


def _check_images(images: Any) -> None:
    """Images ``[B, C, H, W]`` or volumes ``[B, C, D, H, W]``, floating point."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"Expected `images` to be a float tensor [B, C, H, W], but got "
            f"{type(images).__name__}; volumes take [B, C, D, H, W]."
        )
    if images.ndim - 2 not in FC.SPATIAL_DIMS or not images.is_floating_point():
        raise ValueError(
            "Expected `images` to be a float tensor [B, C, H, W], but got shape "
            f"{list(images.shape)} and dtype {images.dtype}; volumes take [B, C, D, H, W]."
        )


def _check_classes(classes: Any) -> list[int] | None:
    if classes is None:
        return None
    if isinstance(classes, Tensor):
        if classes.ndim > 1 or classes.is_floating_point() or classes.dtype == torch.bool:
            raise TypeError(
                "Expected `classes` as integer indices (an int, a list or a 1-D integer tensor), "
                f"but got a tensor of shape {list(classes.shape)} and dtype {classes.dtype}."
            )
        classes = classes.reshape(-1).tolist()
    elif isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, Sequence) or any(
        isinstance(c, bool) or not isinstance(c, int) for c in classes
    ):
        raise TypeError(
            "Expected `classes` as integer indices (an int, a list or a 1-D integer tensor), "
            f"but got {classes!r}."
        )
    classes = list(classes)
    if not classes:
        raise ValueError("Expected `classes` to hold at least one class index, but got none.")
    if len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(f"Expected distinct non-negative class indices, but got {classes}.")
    return classes


def _check_masks(
    masks: Tensor | None, input_size: tuple[int, ...], logits_shape: torch.Size
) -> None:
    """Ground-truth masks must be at the input's resolution or the logits'; anything else is a
    mistake the nearest resizing to the logits would hide."""
    if not isinstance(masks, Tensor):
        return  # the target says what it needs
    b, k, *logit_size = logits_shape
    n = len(input_size)
    sizes = {tuple(input_size), tuple(logit_size)}
    if masks.ndim in (n + 1, n + 2) and masks.shape[0] == b and tuple(masks.shape[-n:]) in sizes:
        return
    also = (
        ""
        if tuple(logit_size) == tuple(input_size)
        else f" (or the logits' {FC.grid_label(logit_size)})"
    )
    raise ValueError(
        f"Expected `masks` of shape {FC.shape_label('B', spatial_dims=n)} = {[b, *input_size]} "
        f"(labels) or {FC.shape_label('B', 'K', spatial_dims=n)} = {[b, k, *input_size]} (per "
        f"class) at the input's resolution{also}, but got {list(masks.shape)}."
    )


def _select_classes(wanted: list[int] | None, num_classes: int, device: torch.device) -> Tensor:
    if wanted is None:
        return torch.arange(num_classes, device=device)
    if max(wanted) >= num_classes:
        raise ValueError(
            f"Expected `classes` in [0, {num_classes}) (the model has {num_classes} output "
            f"classes), but got {wanted}."
        )
    return torch.tensor(wanted, device=device, dtype=torch.long)


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Half-precision tensors (autocast) to float32; float32 and float64 unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _model_device(model: nn.Module, images: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return images.device
