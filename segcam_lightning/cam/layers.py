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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "LayerInfo",
    "candidate_layers",
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
    (``[B, C, d, h, w]`` in a 3-D model)."""

    name: str
    type: str
    output_shape: tuple[int, ...]


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


@torch.no_grad()
def candidate_layers(model: nn.Module, example_input: Tensor) -> list[LayerInfo]:
    """Layers whose output is a ``[B, C, h, w]`` tensor, in the order the forward runs them.

    For a 3-D model, given a volume ``[B, C_in, D, H, W]``, the layers whose output is a
    ``[B, C, d, h, w]`` tensor: a CAM layer's output has as many dimensions as the input.

    Runs one forward in eval mode without gradients; training flags, RNG states and hooks are
    left as they were.

    Args:
        model: the network.
        example_input: a batch ``[B, C_in, H, W]`` (or ``[B, C_in, D, H, W]``) on the model's
            device.

    Returns:
        One :class:`LayerInfo` per layer that ran, with its first output's shape.

    Raises:
        TypeError: when ``example_input`` is not a tensor.
    """
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"Expected `example_input` to be a tensor [B, C, H, W], but got "
            f"{type(example_input).__name__}."
        )
    found: dict[str, LayerInfo] = {}

    def record(name: str, module: nn.Module, _inputs: object, output: object) -> None:
        if name not in found and isinstance(output, Tensor) and output.ndim == example_input.ndim:
            found[name] = LayerInfo(name, type(module).__name__, tuple(output.shape))

    root = unwrap_compiled(model)
    handles = []
    try:
        for name, module in root.named_modules():
            if name:
                handles.append(
                    module.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o))
                )
        with eval_mode(root), preserve_rng(example_input.device), force_eager():
            root(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return list(found.values())


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
