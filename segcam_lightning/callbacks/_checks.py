"""Argument checks shared by the callbacks: messages say what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
