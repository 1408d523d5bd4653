"""Small pieces of the package's messages: lists cut short, and what is wrong with a path.

Imports nothing of the package, so any module may use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["listing", "one_line", "path_problem", "require_int"]


def listing(items: Sequence[object], most: int = 5) -> str:
    """The first ``most`` items, comma-separated, and how many were left out.

    Example:
        >>> listing(["a", "b", "c"], most=2)
        'a, b, ... (1 more)'
    """
    shown = ", ".join(str(item) for item in items[:most])
    return shown + (f", ... ({len(items) - most} more)" if len(items) > most else "")


def path_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` is not the ``kind`` (``"file"`` or ``"folder"``) expected, as the end of a
    sentence (``"does not exist"``, ``"is a folder, not a file"``); ``None`` when it is."""
    if kind not in ("file", "folder"):
        raise ValueError(f"Expected `kind` 'file' or 'folder', but got {kind!r}.")
    if path.is_file() if kind == "file" else path.is_dir():
        return None
    if not path.exists():
        return "does not exist"
    other = "folder" if kind == "file" else "file"
    return f"is a {other}, not a {kind}"


def require_int(name: str, value: object, minimum: int = 0) -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum``.

    Raises:
        ValueError: naming the argument and what was expected ("a positive integer", "a
            non-negative integer" or "an integer ≥ N").
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer ≥ {minimum}"
        )
        raise ValueError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return value


def one_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, at most 300 characters."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300].rstrip(": ")
