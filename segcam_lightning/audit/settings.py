"""Settings, constants and errors shared by the audit modules."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2

from segcam_lightning.cam import Readout
from segcam_lightning.data.datamodule import SYNTHETIC, SYNTHETIC3D
from segcam_lightning.data.synthetic import SPLIT_OFFSETS
from segcam_lightning.models.unet import BLOG_LAYERS
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
    "mistakes",
    "mistakes.csv",
    "modalities.csv",
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
TIP_NAMES = dict(zip(BLOG_LAYERS, ("e1", "e4", "b", "d4"), strict=True))
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95]  # cv2's default, which the blog U-Net's script used


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
class DataSource:
    """Where the audited images come from, and how they are batched.

    Attributes:
        data: ``--data``: a folder of images (with ``masks/`` for ground truth), a folder of
            ``.npy`` volumes, ``"synthetic"`` or ``"synthetic3d"``; ``None`` with a pipeline.
        run_config: ``--config`` files that are LightningCLI run configs: their ``model`` and
            ``data`` sections are instantiated (:mod:`~segcam_lightning.audit.pipeline`).
        datamodule: ``--datamodule``: the user's LightningDataModule class (``"pkg.mod:Class"``).
        datamodule_kwargs: ``--datamodule-kwargs``: arguments for the data module.
        split: ``--split``: which of the data module's dataloaders is audited.
        cli: ``--cli``: the LightningCLI subclass that links the run's arguments.
        limit: ``--limit``: audit only the first N images; ``None`` for all.
        batch_size: ``--batch-size``: images per engine call.
        num_workers: ``--num-workers``: DataLoader worker processes.
    """

    data: str | None = None
    run_config: tuple[Path, ...] = ()
    datamodule: str | None = None
    datamodule_kwargs: dict[str, Any] | None = None
    split: str = "val"
    cli: str | None = None
    limit: int | None = None
    batch_size: int = 8
    num_workers: int = 2

    @property
    def pipeline(self) -> bool:
        """Whether the images come from the user's own data module (``--config`` with a run's
        config, or ``--datamodule``) rather than from ``--data``."""
        return bool(self.run_config) or self.datamodule is not None


@dataclass(frozen=True)
class NetworkCode:
    """The user's code that rebuilds the network, and what the checkpoints need said.

    Attributes:
        module: ``--module``: the user's LightningModule class (``"pkg.mod:Name"``); ``None``
            for the package's U-Net.
        model: ``--model``: a function (or ``nn.Module`` class) that builds the network.
        model_kwargs: ``--model-kwargs``: its keyword arguments.
        trust_checkpoint: ``--trust-checkpoint``: allow arbitrary unpickling.
        in_channels: ``--in-channels``: the user's network's input channels (1 or 3).
        num_classes: ``--num-classes``: the class count the checkpoints must predict.
    """

    module: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    trust_checkpoint: bool = False
    in_channels: int | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class Preprocessing:
    """How the audit's own reader makes the network's inputs (not used with a pipeline).

    Attributes:
        size: ``--size``: the side of the square images or cubic volumes the network is fed;
            ``None``: the checkpoint's training size.
        intensity_range: ``--intensity-range``: the ``(lo, hi)`` a folder's ``.npy`` volumes
            are scaled from; ``None``: each volume's own minimum and maximum, per channel.
        channel_order: ``--channel-order``: ``"auto"``, ``"rgb"`` or ``"bgr"``.
        image_mean: ``--image-mean``: the training normalisation's mean per channel.
        image_std: ``--image-std``: its standard deviation per channel.
        zscore: ``--zscore``: volumes from ``.npy`` files z-scored per channel.
    """

    size: int | None = None
    intensity_range: tuple[float, float] | None = None
    channel_order: str = "auto"
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    zscore: bool = False


@dataclass(frozen=True)
class Explanation:
    """What is explained, and how.

    Attributes:
        layers: ``--layers``: the layers explained; ``None`` is the network's default layer
            (the blog U-Net's ``d4.conv.conv.5`` for the U-Net).
        method: ``--method``: the CAM method.
        target: ``--target``: the class score explained.
        normalize: ``--normalize``: how maps are scaled.
        classes: ``--classes``: the output channels explained; ``None`` for all.
        output_adapter: ``--output-adapter``: a name in
            :data:`~segcam_lightning.cam.adapters.ADAPTERS` that reads the logits from the
            model's output (``"mask2former"``); ``None`` is the default adapter.
        reshape: ``--reshape``: ``"LAYER=SPEC"`` items, how a token layer's output becomes a
            grid (``SPEC`` as :func:`~segcam_lightning.cam.tokens.parse_layout` reads it:
            ``"14x14+1"``, ``"channels_last"``); ``None`` infers every layout.
    """

    layers: tuple[str, ...] | None = None
    method: str = "gradcam"
    target: str = "softmax_mean"
    normalize: str = "minmax"
    classes: tuple[int, ...] | None = None
    output_adapter: str | None = None
    reshape: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Windows:
    """Sliding windows (:mod:`~segcam_lightning.audit.windows`): each input explained window by
    window instead of whole; off without ``--roi-size``.

    Attributes:
        roi_size: ``--roi-size``: the window's side, one or one per spatial dimension.
        overlap: ``--overlap``: fraction of a window shared with the next.
        blend: ``--blend``: ``"constant"`` or ``"gaussian"``.
        sw_batch_size: ``--sw-batch-size``: windows per engine call.
        window_weights: ``--window-weights``: ``"patch"`` or ``"whole"``.
    """

    roi_size: tuple[int, ...] | None = None
    overlap: float = 0.25
    blend: str = "constant"
    sw_batch_size: int = 1
    window_weights: str = "patch"


@dataclass(frozen=True)
class Labels:
    """How classes are named and coloured when the checkpoints do not say.

    Attributes:
        class_names: ``--class-names``: one name per class (binary: the background's and the
            foreground's, or the foreground's).
        colormap: ``--colormap``: the masks' BGR colours, one per mask label.
    """

    class_names: tuple[str, ...] | None = None
    colormap: tuple[tuple[int, int, int], ...] | None = None


@dataclass(frozen=True)
class RunOptions:
    """How the run goes: devices, the output folder's handling, rendering and the report.

    Attributes:
        device: ``--device``: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        devices: ``--devices``: devices per node (a distributed run when not 1).
        num_nodes: ``--num-nodes``: nodes.
        strategy: ``--strategy``: Lightning's strategy (``"auto"`` or ``"ddp"``).
        overwrite: ``--overwrite``: write into a non-empty ``--out``.
        resume: ``--resume``: finish an interrupted audit in ``--out``.
        keep_going: ``--keep-going``: a checkpoint whose logits are not finite is marked
            broken and the others are audited (else the run stops with exit status 2).
        progress: a progress bar (``--quiet`` turns it off).
        render_threads: ``--render-threads``; ``None``: half the CPU cores, 2 to 8.
        report_images: ``--report-images``: images shown in ``report.html``.
    """

    device: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    overwrite: bool = False
    resume: bool = False
    keep_going: bool = False
    progress: bool = True
    render_threads: int | None = None
    report_images: int = 50

    @property
    def distributed(self) -> bool:
        """Whether the run goes through Lightning's ``Trainer.predict``."""
        return self.devices != 1 or self.num_nodes != 1 or self.strategy != "auto"


@dataclass(frozen=True)
class CheckSettings:
    """The quality checks run after the main pass (:mod:`~segcam_lightning.audit.checks`).

    Attributes:
        sanity_check: ``--sanity-check``: the randomisation test.
        sanity_images: ``--sanity-images``: the first N audited images it uses.
        sanity_seeds: ``--sanity-seeds``: re-initialisations per randomisation.
        sanity_methods: ``--sanity-methods``: methods tested; ``None`` is the audited
            ``method``, ``("all",)`` every method.
        faithfulness: ``--faithfulness``: deletion and insertion curves.
        faithfulness_fill: ``--faithfulness-fill``: what a deleted pixel becomes.
        faithfulness_images: ``--faithfulness-images``: the first N audited images used.
        faithfulness_steps: ``--faithfulness-steps``: points per curve minus one.
        objects_alone: ``--objects-alone``: the objects-alone test.
        objects_alone_images: ``--objects-alone-images``: the first N audited images used.
        explain_errors: ``--explain-errors``: the mistakes section
            (:mod:`~segcam_lightning.audit.mistakes`).
        explain_errors_images: ``--explain-errors-images``: images per class it explains.
        modalities: ``--modalities``: the channel groups whose share of each class's evidence
            is measured (:mod:`~segcam_lightning.audit.modalities`), or ``"channels"``;
            ``None``: not measured.
        modalities_images: ``--modalities-images``: the first N audited images used.
    """

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
    explain_errors: bool = False
    explain_errors_images: int = 4
    modalities: dict[str, list[int]] | str | None = None
    modalities_images: int = 64


#: Each option's settings field, by the option's name (``--batch-size`` is ``batch_size``),
#: in the order ``summary.json`` lists them: ``(group, field)``, the group ``None`` for a field
#: of :class:`AuditSettings` itself. ``output_kind`` and ``threshold`` are the readout's
#: ``kind`` and ``threshold``.
OPTION_FIELDS: dict[str, tuple[str | None, str]] = {
    "checkpoints": (None, "checkpoints"),
    "data": ("source", "data"),
    "out": (None, "out"),
    "layers": ("explain", "layers"),
    "method": ("explain", "method"),
    "target": ("explain", "target"),
    "normalize": ("explain", "normalize"),
    "output_kind": ("readout", "kind"),
    "threshold": ("readout", "threshold"),
    "classes": ("explain", "classes"),
    "output_adapter": ("explain", "output_adapter"),
    "reshape": ("explain", "reshape"),
    "limit": ("source", "limit"),
    "batch_size": ("source", "batch_size"),
    "num_workers": ("source", "num_workers"),
    "device": ("run", "device"),
    "num_classes": ("network", "num_classes"),
    "colormap": ("labels", "colormap"),
    "class_names": ("labels", "class_names"),
    "size": ("inputs", "size"),
    "intensity_range": ("inputs", "intensity_range"),
    "channel_order": ("inputs", "channel_order"),
    "image_mean": ("inputs", "image_mean"),
    "image_std": ("inputs", "image_std"),
    "in_channels": ("network", "in_channels"),
    "module": ("network", "module"),
    "model": ("network", "model"),
    "model_kwargs": ("network", "model_kwargs"),
    "trust_checkpoint": ("network", "trust_checkpoint"),
    "devices": ("run", "devices"),
    "num_nodes": ("run", "num_nodes"),
    "strategy": ("run", "strategy"),
    "report_images": ("run", "report_images"),
    "render_threads": ("run", "render_threads"),
    "overwrite": ("run", "overwrite"),
    "resume": ("run", "resume"),
    "keep_going": ("run", "keep_going"),
    "progress": ("run", "progress"),
    **{f.name: ("checks", f.name) for f in fields(CheckSettings)},
    "run_config": ("source", "run_config"),
    "datamodule": ("source", "datamodule"),
    "datamodule_kwargs": ("source", "datamodule_kwargs"),
    "split": ("source", "split"),
    "cli": ("source", "cli"),
    "zscore": ("inputs", "zscore"),
    "roi_size": ("windows", "roi_size"),
    "overlap": ("windows", "overlap"),
    "blend": ("windows", "blend"),
    "sw_batch_size": ("windows", "sw_batch_size"),
    "window_weights": ("windows", "window_weights"),
}


@dataclass(frozen=True)
class AuditSettings:
    """Everything an audit run needs, in groups; :func:`~segcam_lightning.audit.cli.main`
    makes it from the command line (:meth:`from_options`), whose ``--help`` documents each
    option.

    ``None`` in a group means "take it from the checkpoint" (or the default given in
    ``--help``).

    Attributes:
        checkpoints: ``--checkpoint``: the files audited, in order.
        out: ``--out``: the output folder.
        source: where the images come from (:class:`DataSource`).
        network: the user's code and what the checkpoints need said (:class:`NetworkCode`).
        inputs: how the audit's own reader makes the inputs (:class:`Preprocessing`).
        explain: what is explained, and how (:class:`Explanation`).
        readout: how the output channels are read (``--output-kind`` is its ``kind``,
            ``--threshold`` its ``threshold``); ``"auto"`` until the plan resolves it.
        labels: class names and colours (:class:`Labels`).
        run: devices, the output folder's handling, rendering (:class:`RunOptions`).
        checks: the quality checks (:class:`CheckSettings`).
        windows: sliding windows (:class:`Windows`).
    """

    checkpoints: tuple[Path, ...]
    out: Path = Path("results")
    source: DataSource = field(default_factory=DataSource)
    network: NetworkCode = field(default_factory=NetworkCode)
    inputs: Preprocessing = field(default_factory=Preprocessing)
    explain: Explanation = field(default_factory=Explanation)
    readout: Readout = field(default_factory=Readout)
    labels: Labels = field(default_factory=Labels)
    run: RunOptions = field(default_factory=RunOptions)
    checks: CheckSettings = field(default_factory=CheckSettings)
    windows: Windows = field(default_factory=Windows)

    @classmethod
    def from_options(cls, **options: Any) -> AuditSettings:
        """Settings from values named as the options (:data:`OPTION_FIELDS`: ``data``,
        ``batch_size``, ``output_kind``, ...); those not given keep their defaults.

        Raises:
            TypeError: for a name that is no option.
        """
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise TypeError(f"AuditSettings.from_options() got unknown options {unknown}.")
        groups: dict[str, dict[str, Any]] = defaultdict(dict)
        top: dict[str, Any] = {}
        for name, value in options.items():
            group, attribute = OPTION_FIELDS[name]
            if group is None:
                top[attribute] = value
            else:
                groups[group][attribute] = value
        made = {name: _GROUPS[name](**values) for name, values in groups.items()}
        return cls(**top, **made)

    def options(self) -> dict[str, Any]:
        """The settings by option name, in :data:`OPTION_FIELDS`' order (the flat ``settings``
        of ``summary.json``)."""
        values = {}
        for name, (group, attribute) in OPTION_FIELDS.items():
            holder = self if group is None else getattr(self, group)
            values[name] = getattr(holder, attribute)
        return values


_GROUPS: dict[str, Callable[..., Any]] = {
    "source": DataSource,
    "network": NetworkCode,
    "inputs": Preprocessing,
    "explain": Explanation,
    "readout": Readout,
    "labels": Labels,
    "run": RunOptions,
    "checks": CheckSettings,
    "windows": Windows,
}


def list_layers_command(network: NetworkCode, path: Path) -> str:
    """The ``--list-layers`` command for ``path`` with the run's ``--module``/``--model``."""
    code = ""
    if network.module:
        code = f" --module {network.module}"
    elif network.model:
        code = f" --model {network.model}"
        if network.model_kwargs:
            code += f" --model-kwargs '{json.dumps(network.model_kwargs)}'"
    return f"{PROG}{code} --checkpoint {path} --list-layers"
