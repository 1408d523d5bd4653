"""Settings, constants and errors shared by the audit modules."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from segcam_lightning.data.datamodule import SYNTHETIC, SYNTHETIC3D
from segcam_lightning.data.synthetic import SPLIT_OFFSETS
from segcam_lightning.models.unet import SEED_LAYERS
from segcam_lightning.render import VIEWS

#: The command's name in messages: ``segcam-explain`` when run as the console script.
PROG = "segcam-explain" if Path(sys.argv[0]).name == "segcam-explain" else "explain.py"
DEFAULT_LAYER = "d4.conv.conv.5"
#: ``--data`` values that name the embedded synthetic data (images, volumes).
SYNTHETIC_DATA = (SYNTHETIC, SYNTHETIC3D)
#: The synthetic data's test split, as SegmentationDataModule draws it with its default seed 0.
SYNTHETIC_TEST_SEED = SPLIT_OFFSETS["test"]
SYNTHETIC_DEFAULT_COUNT = 32
#: Per-image values computed by :func:`~segcam_lightning.audit.batches.alignment_values`, each
#: ``[B, L, K]``; over voxels for volumes.
VALUE_NAMES = (
    "gt_present",
    "energy_inside",
    "pointing_game",
    "raw_max",
    "pred_area",
    "gt_area",
    "iou",
    "similarity_to_first",
)
#: Columns of ``metrics.csv``; empty cells mean "not defined" (no ground truth, class absent).
#: ``source`` is the image's path relative to ``--data`` (``synthetic:<i>`` for the synthetic
#: data); ``run_status`` is ``complete``, or ``partial`` on every row of an interrupted run,
#: or ``broken`` on the rows of a checkpoint whose logits are not finite on that image
#: (``--keep-going``; left out of the means).
#: ``pointing_game`` is 1 where the CAM's peak lies on the class: its mean over the images
#: holding the class is the pointing-game score the callback logs.
CSV_COLUMNS = (
    "checkpoint",
    "layer",
    "index",
    "image",
    "source",
    "class",
    "class_name",
    *VALUE_NAMES,
    "run_status",
)
#: ``run_status`` of the rows of a checkpoint whose logits are not finite on the image.
BROKEN = "broken"
#: Where an interrupted run keeps what it finished, for ``--resume``; removed once complete.
STATE_FILE = "audit-state.json"
#: The lock a run holds on ``--out`` while it writes there (:mod:`~segcam_lightning.audit.lock`).
LOCK_FILE = "audit.lock"
#: Names the run writes directly under ``--out``; no checkpoint folder may take one of them,
#: nor the names a report image's folder holds beside the checkpoint folders (a volume's tiles
#: come one per view).
RESERVED_NAMES = (
    "gradcam",
    "cams",
    "report_files",
    "metrics.csv",
    "sanity.csv",
    "faithfulness.csv",
    "summary.json",
    "report.html",
    STATE_FILE,
    LOCK_FILE,
    "input.jpg",
    "truth.png",
    *(f"input_{view}.jpg" for view in VIEWS),
    *(f"truth_{view}.png" for view in VIEWS),
)
TIP_NAMES = dict(zip(SEED_LAYERS, ("e1", "e4", "b", "d4"), strict=True))
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95]  # cv2's default, which the seed used


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``, tuples as lists and paths as text, so that
    ``json.dumps`` writes standard JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class AuditError(Exception):
    """A run that failed after it started writing: :func:`main` prints the one-line message,
    which says what was kept, and exits with 1."""


@dataclass(frozen=True)
class Stop:
    """Why a run ended before its last image.

    Attributes:
        reason: one line, e.g. ``"interrupted by SIGINT"`` or the failure's type and message.
        exit_status: 130 for SIGINT, 143 for SIGTERM, 1 for a failure.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``; ``None`` for a failure.
    """

    reason: str
    exit_status: int
    signal_name: str | None = None


@dataclass(frozen=True)
class AuditSettings:
    """Everything an audit run needs; :func:`build_parser` documents each field.

    ``None`` means "take it from the checkpoint" (or the default given in ``--help``); ``layers``
    ``None`` is the network's default layer (the seed's ``d4.conv.conv.5`` for the U-Net).
    ``module``/``model`` name the user's code (``"pkg.mod:Name"``), ``None`` for the U-Net.
    ``size`` is the side of the square images or cubic volumes the network is fed;
    ``intensity_range`` the ``(lo, hi)`` a folder's ``.npy`` volumes are scaled from (``None``:
    each volume's own minimum and maximum, per channel). ``sanity_check``, ``faithfulness`` and
    ``objects_alone`` run the quality checks after the main pass
    (:mod:`~segcam_lightning.audit.checks`);
    ``sanity_methods`` ``None`` is the audited ``method``, ``("all",)`` every method.
    ``keep_going``: a checkpoint whose logits are not finite is marked broken and the others
    are audited (else the run stops with exit status 2).
    ``run_config``: LightningCLI run configs (``--config``) whose ``model`` and ``data`` the
    audit instantiates; ``datamodule``/``datamodule_kwargs``: the user's data module class and
    its arguments (``--datamodule``); ``split``: the data module's dataloader audited;
    ``cli``: the LightningCLI subclass that links the run's arguments; ``zscore``: volumes
    from ``.npy`` files z-scored per channel.
    """

    checkpoints: tuple[Path, ...]
    data: str | None = None
    out: Path = Path("results")
    layers: tuple[str, ...] | None = None
    method: str = "gradcam"
    target: str = "softmax_mean"
    normalize: str = "minmax"
    output_kind: str = "auto"
    threshold: float = 0.5
    classes: tuple[int, ...] | None = None
    limit: int | None = None
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    num_classes: int | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None
    class_names: tuple[str, ...] | None = None
    size: int | None = None
    intensity_range: tuple[float, float] | None = None
    channel_order: str = "auto"
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    in_channels: int | None = None
    module: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    trust_checkpoint: bool = False
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    report_images: int = 50
    render_threads: int | None = None
    overwrite: bool = False
    resume: bool = False
    keep_going: bool = False
    progress: bool = True
    sanity_check: bool = False
    sanity_images: int = 16
    sanity_seeds: int = 3
    sanity_methods: tuple[str, ...] | None = None
    faithfulness: bool = False
    faithfulness_fill: str = "mean"
    faithfulness_images: int = 16
    faithfulness_steps: int = 16
    objects_alone: bool = False
    objects_alone_images: int = 64
    run_config: tuple[Path, ...] = ()
    datamodule: str | None = None
    datamodule_kwargs: dict[str, Any] | None = None
    split: str = "val"
    cli: str | None = None
    zscore: bool = False

    @property
    def pipeline(self) -> bool:
        """Whether the images come from the user's own data module (``--config`` with a run's
        config, or ``--datamodule``) rather than from ``--data``."""
        return bool(self.run_config) or self.datamodule is not None

    @property
    def distributed(self) -> bool:
        """Whether the run goes through Lightning's ``Trainer.predict``."""
        return self.devices != 1 or self.num_nodes != 1 or self.strategy != "auto"


def list_layers_command(settings: AuditSettings, path: Path) -> str:
    """The ``--list-layers`` command for ``path`` with the run's ``--module``/``--model``."""
    code = ""
    if settings.module:
        code = f" --module {settings.module}"
    elif settings.model:
        code = f" --model {settings.model}"
        if settings.model_kwargs:
            code += f" --model-kwargs '{json.dumps(settings.model_kwargs)}'"
    return f"{PROG}{code} --checkpoint {path} --list-layers"
