"""Which network of a LightningModule a CAM explains, and its layers by name.

The rule the callback and ``explain.py --module`` share: the module itself when it defines
``forward``, else its ``net``, ``model`` or ``network`` attribute. Layer names may be given as
the network calls them (``d4.conv.conv.5``) or as the module does (``net.d4.conv.conv.5``).
Imports neither Lightning nor OpenCV: a class's own ``forward`` is told apart from the ones it
inherits from ``torch`` or Lightning by where it is defined.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segcam_lightning.cam import find_layer
from segcam_lightning.cam.adapters import get_output_adapter
from segcam_lightning.cam.layers import default_layer_name, eval_mode, preserve_rng

__all__ = [
    "NETWORK_ATTRIBUTES",
    "ClassNames",
    "class_names_of",
    "default_layer",
    "defines_forward",
    "example_logits",
    "inner_network",
    "network_of",
    "resolve_layer",
]

#: Attributes of a LightningModule that hold its network when it defines no ``forward``.
NETWORK_ATTRIBUTES = ("net", "model", "network")
_FRAMEWORKS = ("torch.", "lightning.", "pytorch_lightning.")


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base of the user's) defines ``forward``, rather than
    inheriting the placeholder of ``nn.Module`` or ``LightningModule``."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return not cls.__module__.startswith(_FRAMEWORKS)
    return False


def _attribute_network(module: nn.Module) -> tuple[str, nn.Module] | None:
    for name in NETWORK_ATTRIBUTES:
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.Module):
            return name, candidate
    return None


def network_of(module: nn.Module) -> nn.Module:
    """The module a CAM forward runs: ``module`` when it defines ``forward``, else its network
    attribute (``net``, ``model`` or ``network``).

    Raises:
        ValueError: for a module with neither, saying what to add.
    """
    if defines_forward(module):
        return module
    found = _attribute_network(module)
    if found is not None:
        return found[1]
    raise ValueError(
        f"{type(module).__name__} has no network to run on images: define "
        f"`forward(images) -> logits` on it, or keep the network in one of the attributes "
        f"{list(NETWORK_ATTRIBUTES)}."
    )


def inner_network(module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, network)`` where layer names start: the network attribute with its prefix
    (``"net."``) when ``module`` has one, else ``("", module)``."""
    found = _attribute_network(module)
    return (f"{found[0]}.", found[1]) if found is not None else ("", module)


class ClassNames(NamedTuple):
    """What :func:`class_names_of` gives.

    Attributes:
        channels: one name per output channel (a binary model's one: its foreground).
        labels: one name per mask label, for colour keys (binary: background, foreground).
    """

    channels: list[str]
    labels: list[str]


#: Names that name nothing: Hugging Face configs fill ``id2label`` with ``LABEL_<k>`` when
#: nobody named the classes, and this package's modules default to ``class_<k>``.
_PLACEHOLDER = re.compile(r"(?:LABEL|class)_(\d+)")


def class_names_of(
    module: nn.Module,
    datamodule: Any = None,
    given: Sequence[str] | None = None,
    *,
    num_outputs: int,
    binary: bool = False,
    saved: Sequence[str] | None = None,
) -> ClassNames:
    """The classes' names, from the first source that has them.

    In this order: ``given`` (e.g. the callback's ``class_names=``), ``module.class_names``,
    ``datamodule.class_names``, ``saved`` (names a checkpoint carries), the network's Hugging
    Face ``config.id2label``, else ``class_<k>``. A source other than ``given`` counts when it
    has one name per output channel (binary: one or two names) that are not placeholders
    (``LABEL_<k>``, ``class_<k>``). A binary model's one channel is its foreground, named by
    the second of two names (the first names the background) or by a single name.

    Args:
        module: the LightningModule or network; its modules are searched, outermost first,
            for a ``config`` with an ``id2label`` mapping.
        datamodule: anything with a ``class_names`` attribute, or ``None``.
        given: names chosen by the caller; used as they are.
        num_outputs: ``K``, the network's output channels.
        binary: whether the one output channel is a sigmoid foreground.
        saved: names read from a checkpoint, after the module's and the datamodule's.

    Returns:
        ``ClassNames`` with ``K`` channel names and one name per mask label (``K``; binary 2).

    Raises:
        ValueError: when ``given`` does not fit the outputs.
    """
    if given is not None and not _fits(given, num_outputs, binary):
        wanted = (
            "the foreground's name, or the background's and the foreground's (e.g. "
            "['soil', 'plant'])"
            if binary
            else f"{num_outputs} names, one per output channel"
        )
        model = "binary (one sigmoid channel)" if binary else f"{num_outputs} output channels"
        raise ValueError(
            f"Got {len(given)} class names {list(given)} for a model with {model}: pass "
            f"{wanted}, or leave them unset to use the module's, the datamodule's or the "
            "network's."
        )
    sources = (
        getattr(module, "class_names", None),
        getattr(datamodule, "class_names", None),
        saved,
        _id2label(module),
    )
    names = given
    if names is None:
        names = next((n for n in sources if _named(n) and _fits(n, num_outputs, binary)), None)
    if binary:
        foreground = str(names[-1]) if names else "foreground"
        background = str(names[0]) if names is not None and len(names) == 2 else "background"
        return ClassNames([foreground], [background, foreground])
    channels = [str(n) for n in names] if names else [f"class_{k}" for k in range(num_outputs)]
    return ClassNames(channels, list(channels))


def _fits(names: Any, num_outputs: int, binary: bool) -> bool:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        return False
    return len(names) in (1, 2) if binary else len(names) == num_outputs


def _named(names: Any) -> bool:
    """Whether ``names`` are names rather than a placeholder for each position."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        return False
    return not all(
        (m := _PLACEHOLDER.fullmatch(str(n))) is not None and int(m.group(1)) == k
        for k, n in enumerate(names)
    )


def _id2label(module: nn.Module) -> list[str] | None:
    """The names in the ``config.id2label`` of the outermost module that has one (a Hugging
    Face model's: ``{0: "wall", 1: "floor"}``), in label order; ``None`` when there is none or
    its keys are not the labels ``0..K-1``."""
    for sub in module.modules():
        mapping = getattr(getattr(sub, "config", None), "id2label", None)
        if not isinstance(mapping, Mapping):
            continue
        try:  # configs read from JSON may key by strings
            labels = {int(key): str(name) for key, name in mapping.items()}
        except (TypeError, ValueError):
            return None
        if sorted(labels) != list(range(len(labels))):
            return None
        return [labels[k] for k in range(len(labels))]
    return None


def resolve_layer(module: nn.Module, name: str) -> nn.Module:
    """The layer called ``name`` in ``module``'s network (``d4.conv.conv.5``) or in ``module``
    itself (``net.d4.conv.conv.5``).

    Raises:
        ValueError: for an unknown name, with ``module``'s close matches and how to list layers.
    """
    _, inner = inner_network(module)
    if name and name in dict(inner.named_modules()):
        return find_layer(inner, name)
    return find_layer(module, name)


def example_logits(
    network: nn.Module, example: Tensor, adapter: str | Callable[[Any], Tensor] | None = None
) -> Tensor:
    """The network's logits for an example batch: eval mode, no graph, flags and RNG kept.

    Raises:
        ValueError: when the (adapted) output is not a tensor with the input's dimensions.
    """
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        eval_mode(network),
        preserve_rng(example.device),
    ):
        output = network(example.clone())
    logits = get_output_adapter(adapter)(output)
    if not isinstance(logits, Tensor) or logits.ndim != example.ndim:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected the network's logits as a tensor [B, K, H, W] (with the input's "
            f"{example.ndim} dimensions), but got {got}. Pass an output adapter that picks "
            "them from the model's output."
        )
    return logits


def default_layer(
    module: nn.Module, example: Tensor, adapter: str | Callable[[Any], Tensor] | None = None
) -> str:
    """The layer a CAM explains when none is named, as :func:`resolve_layer` takes it.

    The output of the last block before the output head on the path to the logits ``adapter``
    picks from the forward of :func:`network_of` (``module``): never an auxiliary head's
    branch, nor a module inside a residual unit (see
    :func:`segcam_lightning.cam.layers.default_layer_name`); e.g. the blog U-Net's
    ``d4.conv.conv.5``.
    Named as the network calls it (without the module's ``net.`` prefix) where it lies inside
    the network.

    Raises:
        ValueError: when no layer qualifies.
    """
    network = network_of(module)
    name = default_layer_name(network, example, adapter)
    prefix, _ = inner_network(module)
    if network is module and prefix:
        name = name.removeprefix(prefix)
    return name
