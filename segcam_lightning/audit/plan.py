"""The resolved plan of an audit run, shared by the modules that run and report it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segcam_lightning.audit.batches import AuditModel
from segcam_lightning.audit.data import AuditDataset
from segcam_lightning.audit.paths import OutputLayout
from segcam_lightning.audit.settings import AuditSettings
from segcam_lightning.audit.user_code import UserCode
from segcam_lightning.audit.writer import default_render_threads


@dataclass
class AuditPlan:
    """A run with every choice resolved: models, data, classes, colours, layout.

    ``classes`` are output channels (``[0]`` for a binary model) and ``class_names`` name them;
    ``label_names`` and ``colormap`` go by mask label (a binary model's masks have two labels:
    background and foreground). ``code`` is the user's ``--module``/``--model``, else ``None``.
    """

    settings: AuditSettings
    models: list[AuditModel]
    dataset: AuditDataset
    classes: list[int]
    class_names: list[str]
    colormap: list[tuple[int, int, int]]
    size: tuple[int, int]
    device: torch.device
    layout: OutputLayout
    load_seconds: float
    output_kind: str = "multiclass"
    label_names: list[str] | None = None
    code: UserCode | None = None

    @property
    def render_threads(self) -> int:
        """``--render-threads``, or :func:`default_render_threads` when not given."""
        return self.settings.render_threads or default_render_threads()
