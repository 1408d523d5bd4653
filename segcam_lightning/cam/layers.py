"""Finding layers by name, listing the ones a CAM can hook, and running a model without a trace.

Example:
    >>> from segcam_lightning.models import UNet
    >>> net = UNet(num_classes=3, base_width=4)
    >>> type(find_layer(net, "d4.conv.conv.5")).__name__
    'ReLU'
    >>> [info.name for info in candidate_layers(net, torch.zeros(1, 3, 32, 32))][:2]
    ['e1.conv.conv.0', 'e1.conv.conv.1']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segcam_lightning.cam.adapters import (
    default_output_adapter,
    get_output_adapter,
    query_semantic_logits,
)
from segcam_lightning.cam.tokens import ChannelsFirst, TokenLayout, infer_layout

__all__ = [
    "LayerInfo",
    "candidate_layers",
    "default_layer_name",
    "default_output_adapter",
    "eval_mode",
    "find_layer",
    "force_eager",
    "preserve_rng",
    "unwrap_compiled",
]

_LIST_HINT = (
    "List the layers a CAM can use with "
    "`segcam_lightning.cam.candidate_layers(model, example_input)` "
    "(or all names with `[name for name, _ in model.named_modules()]`)."
)


class LayerInfo(NamedTuple):
    """A layer a CAM can hook: its name, module type and output shape ``[B, C, h, w]``
    (``[B, C, d, h, w]`` in a 3-D model), or a token layer's output shape (``[B, N, C]``,
    ``[B, h, w, C]``) with ``layout``, how the engine reads it as a grid (a
    :class:`~segcam_lightning.cam.tokens.TokenGrid` or ``ChannelsLast``; ``None`` for a
    channels-first output). :attr:`grid_shape` is the ``[B, C, *grid]`` a CAM is computed on.

    ``reaches_logits``: the logits depend on the layer's output (a layer on an auxiliary head's
    branch does not reach the logits the output adapter picks). ``sole_path``: every path from
    the input to the logits runs through the layer's output, so its CAM accounts for all the
    evidence (a module inside a residual unit, whose output is added to a skip, is not).
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    reaches_logits: bool = True
    sole_path: bool = True
    layout: TokenLayout | None = None

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The shape ``[B, C, *grid]`` the layer's CAM is computed on."""
        if self.layout is None:
            return self.output_shape
        return tuple(self.layout.to_grid(torch.empty(self.output_shape, device="meta")).shape)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, or ``model`` itself when it is not compiled.

    Layer names are resolved on the original module, so ``"d4.conv.conv.5"`` works for a
    compiled model as well (its own names carry a ``_orig_mod.`` prefix).
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name`` (as in ``model.named_modules()``).

    Args:
        model: the network (a ``torch.compile`` wrapper is looked through).
        name: dotted module name, e.g. ``"d4.conv.conv.5"``.

    Returns:
        The module.

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: when no module has that name; the message lists close matches and says how
            to list the layers.
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected a layer name as a str, but got {type(name).__name__}.")
    modules = dict(unwrap_compiled(model).named_modules())
    key = name.removeprefix("_orig_mod.")
    if key in modules and key:
        return modules[key]
    close = difflib.get_close_matches(key, [n for n in modules if n], n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"No layer named {name!r} in {type(model).__name__}.{hint} {_LIST_HINT}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in eval mode; restore each module's own flag on exit.

    Restores per module (not ``model.train(flag)``), so a partly frozen model keeps its mix of
    train/eval flags, also when the body raises.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        if any(flag for _, flag in flags):  # `eval()` honours modules that override `train()`
            model.eval()
        yield
    finally:
        for module, flag in flags:
            if module.training != flag:
                module.training = flag


def candidate_layers(
    model: nn.Module,
    example_input: Tensor,
    output_adapter: str | Callable[[Any], Tensor] | None = None,
) -> list[LayerInfo]:
    """Layers whose output is a ``[B, C, h, w]`` tensor, in the order the forward runs them,
    each with whether it reaches the logits and whether it lies on every path to them.

    Token layers are listed too where the engine infers their grid
    (:func:`~segcam_lightning.cam.tokens.infer_layout`): a token sequence ``[B, N, C]`` or a
    channels-last ``[B, h, w, C]`` whose grid matches the input's, with
    :attr:`LayerInfo.layout` saying how it is read. Token layers whose grid cannot be proven
    are not listed (``CAMEngine(reshape=)`` still takes them).

    For a 3-D model, given a volume ``[B, C_in, D, H, W]``, the layers whose output is a
    ``[B, C, d, h, w]`` tensor: a CAM layer's output has as many dimensions as the input.

    Runs one forward in eval mode (with a graph, to see which outputs the logits depend on; no
    backward pass); training flags, RNG states, hooks and parameters' gradients are left as
    they were.

    Args:
        model: the network.
        example_input: a batch ``[B, C_in, H, W]`` (or ``[B, C_in, D, H, W]``) on the model's
            device.
        output_adapter: picks the logits from the model's output (default: a tensor, a dict's
            ``"out"`` or only value, a tuple's first item), or a name in
            :data:`~segcam_lightning.cam.adapters.ADAPTERS` (e.g. ``"mask2former"``).

    Returns:
        One :class:`LayerInfo` per layer that ran, with its first output's shape.

    Raises:
        TypeError: when ``example_input`` is not a tensor.
    """
    return [layer.info for layer in _trace(model, example_input, output_adapter).layers]


def default_layer_name(
    model: nn.Module,
    example_input: Tensor,
    output_adapter: str | Callable[[Any], Tensor] | None = None,
) -> str:
    """The layer a CAM explains when none is named: the output of the last block before the
    output head, on the path to the logits the adapter picks.

    Among the layers every path from the input to the logits runs through (so not a branch
    that never reaches them, such as an auxiliary head, nor a module inside a residual unit
    whose output is added to a skip afterwards), the last one whose channel count differs
    from the logits'. Where several names give one tensor (a block and its last module), the
    innermost is named, as the original U-Net's ``d4.conv.conv.5``.

    With a query adapter (``"mask2former"``, ``"maskformer"``, ``"oneformer"``), whose logits
    read every scale through the queries, the per-pixel embedding each query's mask is read
    from: the last layer reaching the logits on the mask logits' grid (Mask2Former's
    ``model.pixel_level_module.decoder.mask_projection``; docs/engine.md).

    Raises:
        TypeError: when ``example_input`` is not a tensor.
        ValueError: when no layer qualifies, with how to list the layers.
    """
    names = layers_to_logits(model, example_input, output_adapter)
    if names:
        return names[-1]
    raise ValueError(
        f"Could not choose a default layer in {type(model).__name__}: no layer before the "
        f"output head reaches the logits. Name the layers. {_LIST_HINT}"
    )


def layers_to_logits(
    model: nn.Module,
    example_input: Tensor,
    output_adapter: str | Callable[[Any], Tensor] | None = None,
) -> list[str]:
    """Layers before the output head that the logits depend on, in forward order, one name per
    output tensor (the innermost): those every path to the logits runs through, or where none
    does, every layer that reaches them. :func:`default_layer_name` takes the last."""
    trace = _trace(model, example_input, output_adapter)
    if get_output_adapter(output_adapter) is query_semantic_logits:
        per_pixel = _per_pixel_embedding(trace)
        if per_pixel:
            return per_pixel
    for rule in (lambda info: info.sole_path, lambda info: info.reaches_logits):
        chosen: dict[int, str] = {}
        for layer in trace.layers:
            if rule(layer.info) and layer.info.grid_shape[1] != trace.num_outputs:
                chosen.setdefault(id(layer.node), layer.info.name)
        if chosen:
            return list(chosen.values())
    return []


def _per_pixel_embedding(trace: _Trace) -> list[str]:
    """A mask-classification model's (MaskFormer, Mask2Former, OneFormer) layers that reach
    the logits on the mask logits' grid, in forward order, one name per tensor: the last is the
    per-pixel embedding each query's mask is read from (Mask2Former's
    ``pixel_level_module.decoder.mask_projection``). Only the patch embedding lies on every
    path to their logits, which read several scales through the queries (docs/engine.md)."""
    chosen: dict[int, str] = {}
    for layer in trace.layers:
        info = layer.info
        grid = info.grid_shape
        if info.reaches_logits and grid[2:] == trace.grid and grid[1] != trace.num_outputs:
            chosen.setdefault(id(layer.node), info.name)
    return list(chosen.values())


class _Traced(NamedTuple):
    info: LayerInfo
    node: object  # the autograd node that made the output (identity tells tensors apart)


class _Trace(NamedTuple):
    layers: list[_Traced]
    num_outputs: int
    grid: tuple[int, ...] = ()  # the logits' spatial size


def _trace(
    model: nn.Module, example_input: Tensor, output_adapter: str | Callable[[Any], Tensor] | None
) -> _Trace:
    """One forward with a hook on every named module, and the autograd graph of the logits
    read (never run backward) to tell which layers reach them and which every path crosses."""
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"Expected `example_input` to be a tensor [B, C, H, W], but got "
            f"{type(example_input).__name__}."
        )
    found: dict[str, tuple[LayerInfo, object]] = {}

    def record(name: str, module: nn.Module, output: object) -> None:
        if name in found or not isinstance(output, Tensor) or output.ndim < 3:
            return
        if output.shape[0] != example_input.shape[0]:
            return
        layout = infer_layout(output.shape, example_input.shape[2:])
        if layout is not None:
            plain = isinstance(layout, ChannelsFirst)
            info = LayerInfo(name, type(module).__name__, tuple(output.shape))
            found[name] = (info._replace(layout=None if plain else layout), output.grad_fn)

    root = unwrap_compiled(model)
    handles = []
    try:
        for name, module in root.named_modules():
            if name:
                handles.append(
                    module.register_forward_hook(lambda m, _i, o, name=name: record(name, m, o))
                )
        with (
            eval_mode(root),
            preserve_rng(example_input.device),
            force_eager(),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            x = example_input.detach().clone().requires_grad_(True)
            output = root(x)
    finally:
        for handle in handles:
            handle.remove()
    logits = get_output_adapter(output_adapter)(output)
    num_outputs = logits.shape[1] if isinstance(logits, Tensor) and logits.ndim > 1 else 0
    grid = tuple(logits.shape[2:]) if isinstance(logits, Tensor) else ()
    root_node = logits.grad_fn if isinstance(logits, Tensor) else None
    reached = _reachable(root_node, x)
    layers = []
    for info, node in found.values():
        reaches = node is not None and id(node) in reached.nodes
        sole = reaches and reached.input and not _reachable(root_node, x, blocked=node).input
        layers.append(_Traced(info._replace(reaches_logits=reaches, sole_path=sole), node))
    return _Trace(layers, num_outputs, grid)


class _Reach(NamedTuple):
    nodes: dict[int, object]  # id -> node, kept alive so that ids stay unique
    input: bool  # whether the input's own node was reached


def _reachable(root: object, x: Tensor, blocked: object = None) -> _Reach:
    """The autograd nodes reachable from ``root`` without passing through ``blocked``, and
    whether one of them is the input ``x``'s."""
    nodes: dict[int, object] = {}
    reached_input = False
    stack = [root] if root is not None and root is not blocked else []
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        if getattr(node, "variable", None) is x:
            reached_input = True
        for child, _ in getattr(node, "next_functions", ()):
            if child is not None and child is not blocked and id(child) not in nodes:
                stack.append(child)
    return _Reach(nodes, reached_input)


@contextmanager
def preserve_rng(device: torch.device) -> Iterator[None]:
    """Restore the CPU RNG state (and ``device``'s, if CUDA) on exit."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def force_eager() -> Iterator[None]:
    """Run compiled code eagerly (docs/architecture.md, fact 8: ``autograd.grad`` with respect
    to a captured activation fails in compiled code); a no-op on torch without ``set_stance``."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
