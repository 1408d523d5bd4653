"""Safe output names and paths: nothing a data set, checkpoint or class name holds can make a
file land outside the folder it is written to; files appear complete or not at all.

Used wherever a name from outside becomes a path: the audit's panels and report files, the
callback's PNG files for loggers other than TensorBoard.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["UnsafePathError", "safe_component", "safe_join", "unique_components", "write_atomic"]

# Letters and digits of any script (``\\w`` is Unicode-aware) and a few harmless marks; the rest
# (separators, spaces, quotes, control characters, ``:``, ``*``, ...) becomes ``_``.
_UNSAFE_CHARS = re.compile(r"[^\w.=+-]+")
_MAX_NAME = 120


class UnsafePathError(ValueError):
    """An output path that would land outside the output folder."""


def safe_component(text: str, fallback: str = "item") -> str:
    """``text`` as one harmless path component: letters and digits of any script and
    ``._=+-``, not starting with ``.``, ``_`` or ``-``, at most 120 characters, not empty.

    Names keep their identity whatever their script (``写真`` stays ``写真``); Unicode is put in
    NFC form so the same name typed on two systems gives the same file.

    Example:
        >>> safe_component("../a b/c"), safe_component(".."), safe_component("best-epoch=03")
        ('a_b_c', 'item', 'best-epoch=03')
    """
    text = unicodedata.normalize("NFC", str(text))
    name = _UNSAFE_CHARS.sub("_", text).lstrip("._-")[:_MAX_NAME].rstrip(".")
    return name or fallback


def unique_components(
    texts: Sequence[str], fallback: str = "item", reserved: Iterable[str] = ()
) -> list[str]:
    """:func:`safe_component` of each text, with ``-2``, ``-3``, ... appended to repeats and to
    ``reserved`` names (compared case-insensitively, for case-insensitive file systems).

    Example:
        >>> unique_components(["a b", "A_B", "metrics.csv"], reserved=["metrics.csv"])
        ['a_b', 'A_B-2', 'metrics.csv-2']
    """
    seen = {name.casefold() for name in reserved}
    out = []
    for text in texts:
        base = safe_component(text, fallback)
        name, n = base, 1
        while name.casefold() in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name.casefold())
        out.append(name)
    return out


def safe_join(root: Path | str, *parts: str) -> Path:
    """``root / parts...``, refusing anything that could land outside ``root``.

    Containment is checked on real paths (symbolic links resolved), so a link inside ``root``
    that points elsewhere is refused too.

    Raises:
        UnsafePathError: for an empty, ``.``/``..``, absolute or separator-holding part, or a
            joined path whose real location is outside ``root``'s.
    """
    root = Path(root)
    for part in parts:
        if (
            not isinstance(part, str)
            or not part
            or part in (".", "..")
            or "/" in part
            or "\\" in part
            or "\0" in part
            or os.path.isabs(part)
        ):
            raise UnsafePathError(
                f"Refusing to write {part!r} under {root}: output names must be single path "
                "components, not '', '.', '..', absolute paths or paths with separators."
            )
    path = root.joinpath(*parts)
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise UnsafePathError(
            f"Refusing to write {path}: it resolves to {real}, outside the output folder "
            f"{base} (a symbolic link inside it points elsewhere?)."
        )
    return path


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` so that the file appears complete or not at
    all: it goes to a temporary file in the same folder, which then replaces ``path``.

    The temporary name starts with ``.`` and holds random letters, so threads writing into one
    folder never share it, and :func:`safe_component` names (never starting with ``.``) never
    meet it. A failed write (a full disk, an interrupt) removes it and leaves any old ``path``
    untouched.

    Raises:
        OSError: when the folder cannot be written; ``path`` is then unchanged.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name[:100]}.{secrets.token_hex(4)}.tmp")
    # 0o666 and the process's umask, as open() gives; tempfile's 0o600 would hide the results
    # from other users of a shared folder.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
