"""Output paths: safe names, nothing escapes ``--out``, and where each file goes."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segcam_lightning.audit.settings import UnsafePathError

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 120


def safe_component(text: str, fallback: str = "item") -> str:
    """``text`` as one harmless path component: ``[A-Za-z0-9._=+-]``, not starting with ``.``,
    ``_`` or ``-``, not empty.

    Example:
        >>> safe_component("../a b/c"), safe_component(".."), safe_component("best-epoch=03")
        ('a_b_c', 'item', 'best-epoch=03')
    """
    name = _UNSAFE_CHARS.sub("_", text).lstrip("._-")[:_MAX_NAME].rstrip(".")
    return name or fallback


def unique_components(texts: Sequence[str], fallback: str = "item") -> list[str]:
    """:func:`safe_component` of each text, with ``-2``, ``-3``, ... appended to repeats."""
    seen: set[str] = set()
    out = []
    for text in texts:
        base = safe_component(text, fallback)
        name, n = base, 1
        while name.lower() in seen:  # case-insensitive file systems
            n += 1
            name = f"{base}-{n}"
        seen.add(name.lower())
        out.append(name)
    return out


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts...``, refusing anything that could land outside ``root``.

    Raises:
        UnsafePathError: for an empty, ``.``/``..``, absolute or separator-holding part, or a
            joined path outside ``root``.
    """
    for part in parts:
        if (
            not part
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
    base = os.path.normpath(os.path.abspath(root))
    if os.path.commonpath([base, os.path.normpath(os.path.abspath(path))]) != base:
        raise UnsafePathError(f"Refusing to write {path}: it is outside the output folder {root}.")
    return path


@dataclass(frozen=True)
class OutputLayout:
    """Where every output file goes (all paths pass :func:`safe_join`).

    Args:
        root: ``--out``.
        models: the checkpoints' folder labels (unique, safe).
        layers: the layer names, in ``--layers`` order.
    """

    root: Path
    models: tuple[str, ...]
    layers: tuple[str, ...]

    def panel(self, model: int, layer: int, class_idx: int, name: str) -> Path:
        """The seed's panel: ``[<checkpoint>/]gradcam/[<layer>/]<class_idx>/<name>.jpg``."""
        parts = [self.models[model]] if len(self.models) > 1 else []
        parts.append("gradcam")
        if len(self.layers) > 1:
            parts.append(safe_component(self.layers[layer]))
        return safe_join(self.root, *parts, str(class_idx), f"{name}.jpg")

    def panel_dirs(self, classes: Sequence[int]) -> list[Path]:
        """Every folder :meth:`panel` writes into."""
        return sorted(
            {
                self.panel(m, layer, k, "x").parent
                for m in range(len(self.models))
                for layer in range(len(self.layers))
                for k in classes
            }
        )

    def tile(self, name: str, *parts: str) -> Path:
        """A report image: ``report_files/<name>/<parts>``."""
        return safe_join(self.root, "report_files", name, *parts)

    def input_tile(self, name: str) -> Path:
        return self.tile(name, "input.jpg")

    def truth_tile(self, name: str) -> Path:
        return self.tile(name, "truth.png")

    def prediction_tile(self, name: str, model: int) -> Path:
        return self.tile(name, self.models[model], "prediction.png")

    def overlay_tile(self, name: str, model: int, layer: int, class_idx: int) -> Path:
        layer_dir = safe_component(self.layers[layer])
        return self.tile(name, self.models[model], layer_dir, f"{class_idx}.jpg")

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, as a URL path for the report."""
        return urllib.parse.quote(path.relative_to(self.root).as_posix())
