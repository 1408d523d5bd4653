"""The engine's first step: forward hooks that keep the hooked layers' outputs, find pointwise
heads and guide backpropagation (docs/architecture.md, "A call of the engine", step 2).

Every hook lives only inside its ``hooks()`` context: none outlives an engine call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from segcam_lightning.cam.tokens import ChannelsFirst, TokenLayout, resolve_layout

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

    A token layer's output (``[B, N, C]``, channels-last ``[B, h, w, C]``; see
    :mod:`segcam_lightning.cam.tokens`) is kept as its grid ``[B, C, h, w]``, the tensor whose
    gradient is taken, and downstream gets a tensor rebuilt from that grid in the output's own
    layout (extra tokens from the output), so the gradients flow through the grid. Token layers
    never take the head path: they hand nothing a pointwise convolution could be proven on.

    Args:
        names, modules: the hooked layers.
        track_grad: keep a graph from the earliest layer on (gradient methods).
        input_shape: the input's shape ``[B, C, H, W]`` (``[B, C, D, H, W]``), against which
            each output's layout is inferred.
        reshape: layer name -> its layout, where the engine was told (``CAMEngine(reshape=)``).
    """

    def __init__(
        self,
        names: list[str],
        modules: list[nn.Module],
        track_grad: bool,
        input_shape: Sequence[int],
        reshape: Mapping[str, TokenLayout] | None = None,
    ) -> None:
        self.names = names
        self.modules = modules
        self.track_grad = track_grad
        self.input_shape = tuple(input_shape)
        self.reshape = dict(reshape or {})
        self.activations: list[Tensor] = []
        self._slots: list[Tensor | None] = [None] * len(names)
        # What each layer handed downstream (weakly: downstream may free it), and its version
        # counter then.
        self._handed: list[tuple[weakref.ref[Tensor], int] | None] = [None] * len(names)

    def hooks(self) -> AbstractContextManager[None]:
        return _forward_hooks(
            (module, partial(self._hook, index)) for index, module in enumerate(self.modules)
        )

    def _layout(self, index: int, module: nn.Module, output: Any) -> TokenLayout:
        name = self.names[index]
        given = self.reshape.get(name)
        return resolve_layout(name, type(module).__name__, output, self.input_shape, given)

    def _hook(self, index: int, module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
        name = self.names[index]
        layout = self._layout(index, module, output)
        if self._slots[index] is not None:
            raise RuntimeError(
                f"Layer {name!r} ran more than once in one forward (a module used in several "
                "places), so its activation is ambiguous. Pick a layer that runs once."
            )
        plain = isinstance(layout, ChannelsFirst)
        if not self.track_grad:
            self._slots[index] = layout.to_grid(output.detach()).clone()
            return None
        if output.requires_grad:
            grid = output if plain else layout.to_grid(output)
        else:
            # The earliest hooked layer: the forward ran without a graph so far, and nothing
            # before this point is needed for gradients w.r.t. it. Record from here on.
            torch.set_grad_enabled(True)
            grid = layout.to_grid(output.detach())
            grid = (grid if plain else grid.clone()).requires_grad_(True)
        self._slots[index] = grid
        if not plain:
            # Rebuilt from the grid in the output's layout (never a view of the grid), so
            # in-place ops downstream cannot change the kept activation either.
            return layout.from_grid(grid, output)
        # Downstream gets a copy, so in-place ops after the layer cannot change the kept
        # activation (nor touch a leaf that requires grad).
        handed = grid.clone()
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
