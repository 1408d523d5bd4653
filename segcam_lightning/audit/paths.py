"""Output paths: safe names, nothing escapes ``--out``, and where each file goes."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segcam_lightning.audit.settings import RESERVED_NAMES
from segcam_lightning.paths import (
    UnsafePathError,
    safe_component,
    safe_join,
    unique_components,
    write_atomic,
)

__all__ = [
    "OutputLayout",
    "UnsafePathError",
    "safe_component",
    "safe_join",
    "unique_components",
    "write_atomic",
]


@dataclass(frozen=True)
class OutputLayout:
    """Where every output file goes (all paths pass :func:`safe_join`).

    Args:
        root: ``--out``.
        models: the checkpoints' folder labels (unique, safe).
        layers: the layer names, in ``--layers`` order.
        volumes: the run audits volumes: each gets a ``cams/<name>.npy`` and report tiles per
            view (:data:`~segcam_lightning.render.VIEWS`).
    """

    root: Path
    models: tuple[str, ...]
    layers: tuple[str, ...]
    volumes: bool = False

    def panel(self, model: int, layer: int, class_idx: int, name: str) -> Path:
        """The original script's panel: "
        "``[<checkpoint>/]gradcam/[<layer>/]<class_idx>/<name>.jpg``."""
        parts = [*self._model_parts(model), "gradcam"]
        if len(self.layers) > 1:
            parts.append(safe_component(self.layers[layer]))
        return safe_join(self.root, *parts, str(class_idx), f"{name}.jpg")

    def panel_pattern(self) -> str:
        """Where the panels go, as a pattern for people (``gradcam/<class_idx>/<name>.jpg``)."""
        parts = ["<checkpoint>"] if len(self.models) > 1 else []
        parts.append("gradcam")
        if len(self.layers) > 1:
            parts.append("<layer>")
        return "/".join([*parts, "<class_idx>", "<name>.jpg"])

    def cams(self, model: int, name: str) -> Path:
        """A volume's maps: ``[<checkpoint>/]cams/<name>.npy``."""
        return safe_join(self.root, *self._model_parts(model), "cams", f"{name}.npy")

    def _model_parts(self, model: int) -> list[str]:
        return [self.models[model]] if len(self.models) > 1 else []

    def panel_dirs(self, classes: Sequence[int]) -> list[Path]:
        """Every folder :meth:`panel` (and, for volumes, :meth:`cams`) writes into."""
        folders = {
            self.panel(m, layer, k, "x").parent
            for m in range(len(self.models))
            for layer in range(len(self.layers))
            for k in classes
        }
        if self.volumes:
            folders |= {self.cams(m, "x").parent for m in range(len(self.models))}
        return sorted(folders)

    def file(self, name: str) -> Path:
        """A file directly under the root: ``metrics.csv``, ``summary.json``, ..."""
        return safe_join(self.root, name)

    def check(self, classes: Sequence[int], report_names: Sequence[str]) -> None:
        """Check, before anything is written, that every name the run writes under the root
        resolves inside it (no symbolic link leads elsewhere).

        Raises:
            UnsafePathError: naming the first path that would land outside the root.
        """
        for name in (*RESERVED_NAMES, *self.models):
            safe_join(self.root, name)
        self.panel_dirs(classes)
        for name in report_names:
            for m in range(len(self.models)):
                self.prediction_tile(name, m)

    def tile(self, name: str, *parts: str) -> Path:
        """A report image: ``report_files/<name>/<parts>``."""
        return safe_join(self.root, "report_files", name, *parts)

    def input_tile(self, name: str, view: str | None = None) -> Path:
        """``input.jpg``; a volume's ``input_<view>.jpg`` (``view``: axial, coronal, sagittal)."""
        return self.tile(name, _viewed("input", view, ".jpg"))

    def truth_tile(self, name: str, view: str | None = None) -> Path:
        return self.tile(name, _viewed("truth", view, ".png"))

    def prediction_tile(self, name: str, model: int, view: str | None = None) -> Path:
        return self.tile(name, self.models[model], _viewed("prediction", view, ".png"))

    def overlay_tile(
        self, name: str, model: int, layer: int, class_idx: int, view: str | None = None
    ) -> Path:
        layer_dir = safe_component(self.layers[layer])
        return self.tile(name, self.models[model], layer_dir, _viewed(str(class_idx), view, ".jpg"))

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, as a URL path for the report."""
        return urllib.parse.quote(path.relative_to(self.root).as_posix())


def _viewed(stem: str, view: str | None, suffix: str) -> str:
    return f"{stem}_{view}{suffix}" if view else f"{stem}{suffix}"
