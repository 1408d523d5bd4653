"""The CAM engine: every class of every image from one forward pass, without side effects.

How a call works (docs/architecture.md explains the facts behind each step):

1. Every module goes to eval mode (each module's own flag is restored afterwards), RNG states
   are forked, compiled code runs eagerly (``torch.compiler.set_stance("force_eager")``) and an
   outer ``torch.inference_mode()`` is left; the input is cloned so inference tensors can be
   used.
2. One forward with forward hooks on the requested layers. The forward starts under
   ``torch.no_grad()``; the first hooked layer to run turns the graph on and makes its output a
   leaf, so nothing before the earliest layer is recorded (parameters may all be frozen). Each
   hook hands a copy of the output downstream, so later in-place ops (the blog U-Net's layers *are*
   ``ReLU(inplace=True)``) cannot change what was captured. Module backward hooks are not used:
   they fail on in-place ops (pytorch#61519).
3. The target reduces the logits (at the model's output resolution, which may be lower than the
   input's) to scores ``[B, K]``, read as the output kind says (softmax for ``"multiclass"``,
   sigmoids for ``"binary"`` and ``"multilabel"``); for each class,
   ``torch.autograd.grad(scores[:, k].sum(), activations)`` gives every image its own gradient
   (images are independent in eval mode) for all layers at once. Never ``.backward()``, never
   ``zero_grad()``: parameters' ``.grad`` are untouched. The head path skips these passes for
   Grad-CAM at a layer whose only way to the logits is a pointwise linear head (a 1×1
   convolution, as after the blog U-Net's ``d4``): its weights are ``Wᵀ · mean(dS/dlogits)`` for all
   classes at once (see :class:`~segcam_lightning.cam.capture._Heads`). The strategies live in
   :mod:`segcam_lightning.cam.gradients`.
4. CAM maths in float32 (float64 for a float64 model) under ``torch.no_grad()`` with autocast
   off: weights, weighted sum, ReLU at the layer's resolution, bilinear upsampling to the input
   size, raw maxima, normalisation. Everything stays on the model's device. A class whose
   score has exactly zero gradient at every hooked layer (a constant or saturated score) would
   get blank maps: the call warns instead of returning them silently.

A token layer (``[B, N, C]`` tokens or a channels-last grid) is explained on its grid
``[B, C, h, w]``: the capture hook keeps the grid and hands downstream a tensor rebuilt from it
(:mod:`segcam_lightning.cam.tokens`; ``reshape=`` where the layout cannot be inferred).

Images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]`` go through the same steps: the engine
reads which from ``images.ndim``, expects the hooked layers (their grids) and the logits to
have as many dimensions as the input (``[B, C, d, h, w]``, ``[B, K, D, H, W]`` for volumes),
averages weights over all ``d·h·w`` positions, upsamples trilinearly (``align_corners=False``) and
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

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.adapters import get_output_adapter
from segcam_lightning.cam.capture import _Capture, _GuidedReLU, _Heads
from segcam_lightning.cam.functional import (
    NORMALIZE_MODES,
    OUTPUT_KINDS,
    NormalizeMode,
)
from segcam_lightning.cam.gradients import (
    GradientCall,
    _at_least_float32,
    _NotReached,
    layer_maps,
    may_take_head_path,
)
from segcam_lightning.cam.gradients import auto_batches as auto_batches  # grad_mode="auto"
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
from segcam_lightning.cam.methods import _CAM, get_method
from segcam_lightning.cam.readout import Readout
from segcam_lightning.cam.targets import Target, get_target
from segcam_lightning.cam.tokens import TokenLayout, as_layout

__all__ = ["GRAD_MODES", "OUTPUT_KINDS", "CAMEngine", "CAMResult", "default_output_adapter"]

GradMode = Literal["auto", "loop", "batched"]
GRAD_MODES: tuple[str, ...] = ("auto", "loop", "batched")


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
            upsampling to the input size, as the blog post did, so every map peaks at exactly 1.
        readout: how the logits' channels are read (a
            :class:`~segcam_lightning.cam.readout.Readout`): ``kind`` ``"multiclass"`` (softmax
            over K >= 2 channels), ``"binary"`` (one sigmoid channel; ``classes`` is ``(0,)``
            and its map explains the foreground, label 1), ``"multilabel"`` (K independent
            sigmoids) or ``"auto"`` (the default: one channel is binary, more are multiclass),
            resolved at call time from the logits; ``threshold``, the probability above which
            a sigmoid pixel is predicted (``logit_region`` uses ``logit > log(t / (1 - t))``).
        guided: also return guided backpropagation (``result.guided_backprop``) and guided CAMs
            (``result.guided_cams``); implied by ``method="guided_gradcam"``. Needs a gradient
            method and one extra backward pass to the input per class.
        output_adapter: ``f(model_output) -> logits``, or a name in
            :data:`~segcam_lightning.cam.adapters.ADAPTERS` (``"mask2former"``,
            ``"maskformer"``, ``"oneformer"``: semantic log-scores of a mask-classification
            model; ``"sam"``: one mask of a promptable model); default
            :func:`default_output_adapter`.
        reshape: layer name -> how its output becomes ``[B, C, h, w]`` where the engine cannot
            infer it (a token sequence ``[B, N, C]`` or a channels-last grid): a
            :class:`~segcam_lightning.cam.tokens.TokenGrid`, ``"channels_last"``,
            ``"channels_first"`` or a callable ``f(output) -> [B, C, h, w]`` that only
            re-indexes (see :mod:`segcam_lightning.cam.tokens`). Layers not named are inferred
            at each call's forward, and refused there when they cannot be.
        grad_mode: how per-class gradients are taken: ``"loop"`` (one ``autograd.grad`` per
            class, ``retain_graph`` between them), ``"batched"`` (one call with
            ``is_grads_batched=True``) or ``"auto"`` (batched for small inputs on a CUDA device,
            else the loop; see :func:`~segcam_lightning.cam.gradients.use_batched`). With
            ``"auto"``, Grad-CAM at a layer that reaches the logits only through a 1×1
            convolution (or is the logits) takes no per-class gradient at all: the head path,
            see :class:`~segcam_lightning.cam.capture._Heads`.

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
        readout: Readout | None = None,
        guided: bool = False,
        output_adapter: str | Callable[[Any], Tensor] | None = None,
        grad_mode: GradMode = "auto",
        reshape: Mapping[str, Any] | None = None,
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
        if readout is not None and not isinstance(readout, Readout):
            raise TypeError(
                "Expected `readout` to be a segcam_lightning.cam.Readout (e.g. "
                f"Readout('binary', threshold=0.5)) or None, but got {type(readout).__name__}."
            )
        self.readout = readout if readout is not None else Readout()
        if not isinstance(guided, bool):
            raise TypeError(f"Expected `guided` to be a bool, but got {type(guided).__name__}.")
        self.guided = guided or self.method.guided
        if self.guided and not self.method.needs_gradients:
            raise ValueError(
                f"Guided backpropagation needs a gradient method (e.g. 'gradcam'), but `method` "
                f"is {self.method!r}, which is gradient-free; drop `guided=True`."
            )
        self.output_adapter = get_output_adapter(output_adapter)
        self.reshape = _resolve_reshape(model, reshape)
        if grad_mode not in GRAD_MODES:
            raise ValueError(
                f"Expected `grad_mode` to be one of {GRAD_MODES}, but got {grad_mode!r}."
            )
        self.grad_mode: GradMode = grad_mode

    def __repr__(self) -> str:
        return (
            f"CAMEngine(layers={self.layer_names}, method={self.method!r}, "
            f"target={self.target!r}, normalize={self.normalize!r}, "
            f"readout={self.readout!r}, guided={self.guided})"
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
        """capture → score → gradients → maps (docs/architecture.md, "A call of the engine")."""
        # Score-CAM's masked forwards run inside the float32 block below: they get the caller's
        # autocast back, so they see the precision the main forward saw.
        device_type = x.device.type
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        capture, heads, guide, logits = self._capture(x)
        forward = partial(self._forward_logits, autocast=autocast)
        call = self._score(x, logits, wanted, masks, heads=heads, guide=guide, forward=forward)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            found = layer_maps(call, capture)
            cams, raw_max, present = self._maps(found.maps, call)
        return CAMResult(
            cams=cams.float(),
            raw_max=raw_max.float(),
            logits=logits.detach(),
            scores=call.scores.detach().float(),
            present=present,
            layers=tuple(self.layer_names),
            classes=tuple(call.classes.tolist()),
            guided_backprop=found.guided_backprop,
            output_kind=call.read.kind,
        )

    def _capture(self, x: Tensor) -> tuple[_Capture, _Heads | None, _GuidedReLU | None, Tensor]:
        """One forward with the hooks on; the capture (its activations), the heads found, the
        guided-backprop hooks and the logits."""
        capture = _Capture(
            self.layer_names, self._modules, self.method.needs_gradients, x.shape, self.reshape
        )
        guide = _GuidedReLU(unwrap_compiled(self.model)) if self.guided else None
        may_skip = may_take_head_path(self.method, self.grad_mode, self.guided)
        heads = _Heads(unwrap_compiled(self.model), capture, x.ndim) if may_skip else None
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
        return capture, heads, guide, self._adapt(output, x)

    def _score(
        self,
        x: Tensor,
        logits: Tensor,
        wanted: list[int] | None,
        masks: Tensor | None,
        *,
        heads: _Heads | None,
        guide: _GuidedReLU | None,
        forward: Callable[[Tensor], Tensor],
    ) -> GradientCall:
        """The target's scores ``[B, K_all]`` of the logits, with a graph for gradient methods,
        and what the gradient strategies read."""
        read = self.readout.resolved(logits.shape[1])
        classes = _select_classes(wanted, logits.shape[1], x.device)
        if self.target.needs_masks:
            _check_masks(masks, tuple(x.shape[2:]), logits.shape)
        with torch.set_grad_enabled(self.method.needs_gradients):
            float_logits = _at_least_float32(logits)
            scores, present = self.target(float_logits, masks, read)
            # One scalar per class: summing over the batch gives each image its own gradient.
            class_scores = scores[:, classes].sum(dim=0).unbind()
        return GradientCall(
            method=self.method,
            target=self.target,
            grad_mode=self.grad_mode,
            x=x,
            logits=logits,
            float_logits=float_logits,
            scores=scores,
            present=present,
            class_scores=class_scores,
            classes=classes,
            masks=masks,
            read=read,
            guide=guide,
            heads=heads,
            forward=forward,
        )

    def _maps(self, maps: list[Tensor], call: GradientCall) -> tuple[Tensor, Tensor, Tensor]:
        """Upsampled to the input, zero where a class is absent, raw maxima, normalised:
        ``cams [B, L, K, *size]``, ``raw_max [B, L, K]`` and ``present [B, K]``."""
        size = tuple(call.x.shape[2:])  # the input's H, W (D, H, W)
        cams = torch.stack([FC.upsample(m, size) for m in maps], dim=1)  # [B, L, K, *size]
        present = call.present[:, call.classes]
        cams = cams * present.view(*present.shape[:1], 1, -1, *[1] * len(size))
        raw_max = cams.flatten(3).amax(dim=-1)
        cams = FC.normalize_cams(cams, self.normalize, spatial_dims=len(size))
        return cams, raw_max, present

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


def _resolve_reshape(model: nn.Module, reshape: Mapping[str, Any] | None) -> dict[str, TokenLayout]:
    """``reshape=`` with each layer's name resolved (a typo fails here) and each value a
    :class:`~segcam_lightning.cam.tokens.TokenLayout`."""
    if reshape is None:
        return {}
    if not isinstance(reshape, Mapping):
        raise TypeError(
            "Expected `reshape` to be a dict {layer name: TokenGrid(...) | 'channels_last' | "
            f"callable}}, but got {type(reshape).__name__}."
        )
    by_identity = {id(m): n for n, m in unwrap_compiled(model).named_modules()}
    return {
        by_identity[id(find_layer(model, name))]: as_layout(value, name)
        for name, value in reshape.items()
    }


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


def _model_device(model: nn.Module, images: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return images.device
