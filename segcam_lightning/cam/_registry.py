"""Resolving a method or target given by name, instance, class or plain function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def resolve(
    value: Any,
    argument: str,
    base: type[T],
    registry: Mapping[str, type[T]],
    normalize: Callable[[str], str],
    wrap: Callable[[Callable[..., Any]], T],
    alternatives: str,
) -> T:
    """``value`` as an instance of ``base``.

    Args:
        value: an instance of ``base`` (returned as is), a name in ``registry`` (compared after
            ``normalize``), a subclass of ``base`` (instantiated) or another callable (passed to
            ``wrap``).
        argument: the argument's name in messages.
        base: the class every result is an instance of.
        registry: names to classes.
        normalize: how names are compared (e.g. ``str.lower``).
        wrap: turns a plain callable into an instance.
        alternatives: what else ``value`` may be, for messages (e.g. "a Target or a callable").

    Raises:
        ValueError: for an unknown name, listing the known ones.
        TypeError: for anything else.
    """
    if isinstance(value, base):
        return value
    names = sorted(registry)
    if isinstance(value, str):
        lookup = {normalize(name): cls for name, cls in registry.items()}
        if normalize(value) not in lookup:
            raise ValueError(
                f"Expected `{argument}` to be one of {names} or {alternatives}, but got {value!r}."
            )
        return lookup[normalize(value)]()
    if isinstance(value, type) and issubclass(value, base):
        return value()
    if callable(value):
        return wrap(value)
    raise TypeError(
        f"Expected `{argument}` to be one of {names} or {alternatives}, but got "
        f"{type(value).__name__}."
    )
