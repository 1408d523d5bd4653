"""Argument checks shared by the callbacks: messages say what was expected."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from segcam_lightning.cam.adapters import ADAPTERS, get_output_adapter
from segcam_lightning.cam.tokens import LayoutError, layout_spec, token_grids
from segcam_lightning.errors import ConfigurationError


def check_choice(argument: str, value: Any, choices: Iterable[str]) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ConfigurationError(
            f"Expected `{argument}` to be one of {sorted(choices)}, but got {value!r}."
        )


def is_index(value: Any) -> bool:
    """Whether ``value`` is a non-negative int (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_share(argument: str, value: float) -> None:
    """Refuse a share outside ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected `{argument}` in [0, 1], but got {value!r}.")


def check_positive(argument: str, value: int) -> None:
    """Refuse anything but an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{argument}` to be an int of at least 1, but got {value!r}.")


def check_callable(argument: str, value: Any) -> None:
    """Refuse a value that is neither ``None`` nor callable."""
    if value is not None and not callable(value):
        raise TypeError(
            f"Expected `{argument}` to be a callable or None, but got {type(value).__name__}."
        )


def resolve_adapter(owner: str, value: Any) -> Callable[[Any], Tensor] | None:
    """``output_adapter=`` as the callable the callbacks store: a name in
    :data:`~segcam_lightning.cam.adapters.ADAPTERS` (``"mask2former"``) resolved once, a
    callable as is, ``None`` as ``None`` (the default adapter, or another callback's).

    Raises:
        ConfigurationError: for an unknown name, listing the known ones.
        TypeError: for anything else.
    """
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        try:
            return get_output_adapter(value)
        except TypeError:
            raise ConfigurationError(
                f"{owner}: unknown `output_adapter` name {value!r}; the names are "
                f"{sorted(ADAPTERS)} (case and '-'/'_' ignored), or pass a callable "
                "f(model_output) -> logits [B, K, H, W]."
            ) from None
    raise TypeError(
        f"Expected `output_adapter` to be a callable, one of the adapter names "
        f"{sorted(ADAPTERS)} or None, but got {type(value).__name__}."
    )


def layout_advice(error: LayoutError, label: str) -> str:
    """The engine's refusal of a token layer's layout, with what to pass in the callback's own
    terms: the layout next to the layer's name in ``layers`` (``label``, as the user named it).
    """
    grids = token_grids(error.shape, error.size) if len(error.shape) == 3 else []
    if grids:
        options = " or ".join(f"`layers={{{label!r}: {layout_spec(g)!r}}}`" for g in grids)
        return f"{error.reason} Pass {options} to GradCAMCallback."
    product = "D·H·W" if len(error.size) == 3 else "H·W"
    sides = "DxHxW+E" if len(error.size) == 3 else "HxW+E"
    n = error.shape[1] if len(error.shape) == 3 else "N"
    return (
        f"{error.reason} Pass the layout with the layer: `layers={{{label!r}: '{sides}'}}` with "
        f"E + {product} = {n} ({product} patch tokens after E extra tokens; in a LightningCLI "
        f"config `layers: {{{label}: {sides}}}`), 'channels_last', a TokenGrid or a callable "
        "f(output) -> [B, C, h, w] that only reshapes, permutes and slices."
    )
