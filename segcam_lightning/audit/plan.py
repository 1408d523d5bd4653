"""An audit's plan: every choice resolved before anything runs or is written.

:func:`prepare` loads the checkpoints (as data, :mod:`segcam_lightning.loading`), builds the
engines, the dataset and the output layout, and resolves classes, names, colours, sizes and
normalisation; :class:`AuditPlan` holds the result for the modules that check, run and report
it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcam_lightning.audit.batches import AuditModel
from segcam_lightning.audit.data import AuditDataset, DataSpec, build_dataset
from segcam_lightning.audit.paths import OutputLayout, unique_components
from segcam_lightning.audit.pipeline import (
    Pipeline,
    PipelineDataset,
    build_pipeline,
    data_display,
    run_config_beside,
)
from segcam_lightning.audit.settings import (
    DEFAULT_LAYER,
    RESERVED_NAMES,
    AuditSettings,
    Explanation,
    Labels,
    NetworkCode,
    Preprocessing,
    list_layers_command,
)
from segcam_lightning.audit.volumes import check_intensity_range
from segcam_lightning.audit.windows import sliding_window, window_note
from segcam_lightning.audit.writer import default_render_threads
from segcam_lightning.cam import CAMEngine, Readout, get_target
from segcam_lightning.cam import find_layer as _find_layer
from segcam_lightning.cam.layers import default_layer_name
from segcam_lightning.cam.tokens import TokenLayout, parse_layout
from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.data.datamodule import SYNTHETIC, SYNTHETIC3D
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES
from segcam_lightning.data.synthetic3d import SYNTHETIC3D_CLASS_NAMES
from segcam_lightning.errors import UsageError
from segcam_lightning.loading import (
    CallerOptions,
    CheckpointError,
    LoadedCheckpoint,
    UserCode,
    default_size,
    load_checkpoint,
    load_lightning_module,
    load_module_weights,
    load_network_weights,
    resolve_code,
)
from segcam_lightning.models import UNet
from segcam_lightning.networks import NETWORK_ATTRIBUTES
from segcam_lightning.render import class_palette
from segcam_lightning.text import one_line


@dataclass
class AuditPlan:
    """A run with every choice resolved: models, data, classes, colours, layout.

    The plan holds what it resolved, not the settings it was made from; a module that needs a
    settings group (the run's options, the checks) is handed that group.

    Attributes:
        models: one per checkpoint, each with its engine.
        dataset: the images (or volumes) audited.
        classes: output channels explained (``[0]`` for a binary model).
        class_names: the name of every output channel.
        colormap: BGR colours by mask label.
        size: ``(H, W)``, or ``(D, H, W)`` for volumes.
        device: where the engines run.
        layout: where every output goes.
        readout: how the output channels are read, resolved (``kind`` never ``"auto"``).
        explanation: what is explained: method, target, normalisation, and the layers and
            classes as resolved (the default layer when none was given).
        data: ``--data`` as given; ``None`` when the user's pipeline gives the images.
        intensity_range: the window a folder's ``.npy`` volumes are scaled from (``None``:
            each volume's own).
        report_images: images with a dataset index below this are shown in the report.
        render_threads: threads rendering and writing images.
        distributed: the run goes through Lightning's ``Trainer.predict``.
        load_seconds: time spent loading, checks included.
        label_names: the mask labels' names (a binary model's masks have two labels:
            background and foreground).
        code: the user's ``--module``/``--model`` (or a run config's module), else ``None``.
        notes: one line per setting the run chose or assumed by itself (the default layer, an
            assumed normalisation), which explain.py prints first and the report's header lists.
    """

    models: list[AuditModel]
    dataset: AuditDataset
    classes: list[int]
    class_names: list[str]
    colormap: list[tuple[int, int, int]]
    size: tuple[int, ...]
    device: torch.device
    layout: OutputLayout
    readout: Readout
    explanation: Explanation
    data: str | None = None
    intensity_range: tuple[float, float] | None = None
    report_images: int = 50
    render_threads: int = field(default_factory=default_render_threads)
    distributed: bool = False
    load_seconds: float = 0.0
    label_names: list[str] | None = None
    code: UserCode | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def volumes(self) -> bool:
        """Whether the run audits volumes."""
        return len(self.size) == 3

    @property
    def piped(self) -> bool:
        """Whether the user's own pipeline gives the images (and the network's inputs)."""
        return isinstance(self.dataset, PipelineDataset)

    @property
    def model_device(self) -> torch.device:
        """Where the networks are: :attr:`device`, or the CPU in a distributed run (each rank
        moves its copy to its own device)."""
        return torch.device("cpu") if self.distributed else self.device


#: A binary model's masks when nothing says otherwise (BGR): background black, foreground white.
BINARY_COLORMAP = ((0, 0, 0), (255, 255, 255))


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available, else cpu.

    Raises:
        UsageError: for ``cuda`` on a machine without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was requested, but PyTorch sees no CUDA device (CPU-only build, or no "
            "GPU visible). Use --device cpu, or --device auto to take a GPU when there is one."
        )
    return torch.device(name)


def load_models(
    settings: AuditSettings,
    pipeline: Pipeline | None = None,
    size: tuple[int, ...] | None = None,
) -> list[LoadedCheckpoint]:
    """Load every ``--checkpoint`` safely; all must take the same kind of input (images or
    volumes) and predict the same number of classes.

    Without ``--module``/``--model`` each is the package's U-Net (:func:`load_checkpoint`);
    with ``--module`` the named LightningModule rebuilds each (:func:`load_lightning_module`);
    with ``--model`` the named factory builds a network for each file's weights
    (:func:`load_network_weights`).

    Raises:
        UsageError: for bad ``--module``/``--model`` code, and missing, unsafe, unreadable or
            mismatched checkpoints.
    """
    code = _user_code(settings.network)
    if code is None and settings.network.in_channels is not None:
        raise UsageError(
            "--in-channels is for the networks of --module/--model; the U-Net's input channels "
            "are read from its weights. Drop --in-channels."
        )
    loaded = []
    for path in settings.checkpoints:
        try:
            if pipeline is not None and pipeline.module is not None:
                loaded.append(_load_into(path, settings, pipeline, size))
            else:
                loaded.append(_load(path, settings, code, size))
        except (FileNotFoundError, CheckpointError) as error:
            raise UsageError(str(error)) from None
    _check_same(
        loaded,
        lambda c: "volumes" if c.dims == 3 else "images",
        "take different inputs",
        "an audit feeds every checkpoint the same data. Audit networks of images and of "
        "volumes in separate runs",
    )
    _check_same(
        loaded,
        lambda c: c.num_classes,
        "predict different numbers of classes",
        "comparing CAMs needs the same classes. Audit them in separate runs",
    )
    return loaded


def _check_same(
    loaded: Sequence[LoadedCheckpoint],
    value: Callable[[LoadedCheckpoint], object],
    differ: str,
    advice: str,
) -> None:
    """Refuse checkpoints whose ``value`` differs: an audit compares them on the same data.

    Raises:
        UsageError: ``"The checkpoints <differ> (<path> <value>, ...); <advice>."``
    """
    if len({value(c) for c in loaded}) > 1:
        found = ", ".join(f"{c.path} {value(c)}" for c in loaded)
        raise UsageError(f"The checkpoints {differ} ({found}); {advice}.")


def _load(
    path: Path, settings: AuditSettings, code: UserCode | None, size: tuple[int, ...] | None
) -> LoadedCheckpoint:
    network = settings.network
    if code is None:
        return load_checkpoint(path, network.num_classes, network.trust_checkpoint)
    options: CallerOptions = {
        "code": code.spec,
        "trust": network.trust_checkpoint,
        "num_classes": network.num_classes,
        "in_channels": network.in_channels,
        "size": size or settings.inputs.size,
        "output_adapter": settings.explain.output_adapter,
    }
    if code.option == "--module":
        return load_lightning_module(path, code.target, **options)
    return load_network_weights(path, code.build(), **options)


def _load_into(
    path: Path, settings: AuditSettings, pipeline: Pipeline, size: tuple[int, ...] | None
) -> LoadedCheckpoint:
    """A checkpoint's weights in a copy of the module the run config instantiated."""
    options: CallerOptions = {
        "code": pipeline.module_code,
        "trust": settings.network.trust_checkpoint,
        "num_classes": settings.network.num_classes,
        "size": size,
        "output_adapter": settings.explain.output_adapter,
    }
    return load_module_weights(path, copy.deepcopy(pipeline.module), **options)


def prepare(settings: AuditSettings) -> AuditPlan:
    """Resolve a run: load checkpoints, build engines and the dataset, plan the outputs.

    Nothing is written and nothing runs but the loading; the checks that run the engines come
    next (:func:`~segcam_lightning.audit.preflight.check_before_writing`).

    Raises:
        UsageError: for any mistake in the settings or inputs, with what to do about it.
    """
    start = time.perf_counter()
    check_intensity_range(settings.inputs.intensity_range)
    device = resolve_device(settings.run.device)
    pipeline, fed, notes = _read_pipeline(settings)
    loaded = load_models(settings, pipeline, fed.size if fed is not None else None)
    first = loaded[0]
    num_outputs = first.num_classes
    readout = _resolve_readout(settings.readout, num_outputs)
    kind = readout.kind
    classes = _resolve_classes(settings.explain.classes, num_outputs, kind)
    size = fed.size if fed is not None else resolve_size(settings.inputs.size, loaded)
    window = sliding_window(settings, len(size))
    labels = unique_components(
        [c.path.stem for c in loaded], fallback="checkpoint", reserved=RESERVED_NAMES
    )
    if pipeline is None:
        notes += _reader_notes(settings, loaded)
    layers = settings.explain.layers
    if not layers:
        layers = default_layers(first, size, settings.network, settings.explain.output_adapter)
        notes.append(
            f"layer {layers[0]}: the default, the last block before the output head on the path "
            "to the logits (--layers to choose others; --list-layers lists them)"
        )
    direct = f"{pipeline.origin}, split {pipeline.split}" if pipeline is not None else None
    model_device = torch.device("cpu") if settings.run.distributed else device
    models = [
        _audit_model(label, c, settings, model_device, readout, layers, direct)
        for label, c in zip(labels, loaded, strict=True)
    ]
    if window is not None:  # every engine through --roi-size's windows
        models = [replace(m, window=window) for m in models]
        notes.append(window_note(window, settings, fed is not None))
    num_labels = 2 if kind == "binary" else num_outputs
    default_colormap = BINARY_COLORMAP if kind == "binary" else BLOG_COLORMAP
    data_colormap = settings.labels.colormap or first.colormap or default_colormap
    if fed is not None:
        dataset: AuditDataset | PipelineDataset = fed
    else:
        dataset = _read_data(settings, first, size, data_colormap, num_labels, kind)
    if get_target(settings.explain.target).needs_masks and not dataset.has_masks:
        raise UsageError(
            f"--target {settings.explain.target} reads each class's ground truth, but "
            f"{settings.source.data} has no masks/. Use --target softmax_mean or logit_region."
        )
    class_names, label_names = _resolve_names(
        settings.labels, first, num_outputs, kind, data=settings.source.data
    )
    layout = OutputLayout(settings.out, tuple(labels), models[0].layers, volumes=len(size) == 3)
    return AuditPlan(
        models,
        dataset,
        classes,
        class_names,
        class_palette(data_colormap, num_labels),
        size,
        device,
        layout,
        readout,
        replace(settings.explain, layers=tuple(models[0].layers), classes=tuple(classes)),
        data=settings.source.data,
        intensity_range=settings.inputs.intensity_range,
        report_images=settings.run.report_images,
        render_threads=settings.run.render_threads or default_render_threads(),
        distributed=settings.run.distributed,
        load_seconds=time.perf_counter() - start,
        label_names=label_names,
        code=_user_code(settings.network) or _pipeline_code(pipeline),
        notes=notes,
    )


def _read_pipeline(
    settings: AuditSettings,
) -> tuple[Pipeline | None, PipelineDataset | None, list[str]]:
    """The user's pipeline (``--config`` run config, ``--datamodule``), the dataset its
    dataloader gives, and its notes; ``(None, None, [])`` for the audit's own reader."""
    pipeline = build_pipeline(settings)
    if pipeline is None:
        return None, None, []
    _check_no_folder_options(settings)
    display = data_display(pipeline.datamodule, pipeline.module)
    fed = PipelineDataset(pipeline.loader, pipeline.split, display, settings.source.limit)
    return pipeline, fed, list(pipeline.notes)


def _reader_notes(settings: AuditSettings, loaded: Sequence[LoadedCheckpoint]) -> list[str]:
    """What the audit's own reader assumes, and a run config found beside the checkpoint."""
    notes = assumed_settings(settings.inputs, loaded)
    beside = run_config_beside(settings.checkpoints[0])
    if beside is not None:
        notes.append(
            f"{beside} sits beside the checkpoint; to audit through that run's own data "
            f"pipeline pass --config {beside} (a config is never read unasked)"
        )
    return notes


def _read_data(
    settings: AuditSettings,
    first: LoadedCheckpoint,
    size: tuple[int, ...],
    colormap: Sequence[Sequence[int]],
    num_labels: int,
    kind: str,
) -> AuditDataset:
    """The audit's own reader of ``--data``."""
    spec = DataSpec(
        size,
        colormap,
        num_labels,
        limit=settings.source.limit,
        kind=kind,
        channels=first.in_channels,
        intensity_range=settings.inputs.intensity_range,
        zscore=settings.inputs.zscore,
        own_size=settings.windows.roi_size is not None and settings.inputs.size is None,
    )
    return build_dataset(settings.source.data or SYNTHETIC, spec)


def _user_code(network: NetworkCode) -> UserCode | None:
    """The code ``--module``/``--model`` name, else ``None``."""
    return resolve_code(network.module, network.model, network.model_kwargs)


def _pipeline_code(pipeline: Pipeline | None) -> UserCode | None:
    """The module class a run config named, as the code the report shows."""
    if pipeline is None or pipeline.module is None:
        return None
    return UserCode("--config", pipeline.module_code, type(pipeline.module), None)


#: Options of the audit's own data reader, which a user's pipeline replaces.
_FOLDER_OPTIONS = ("size", "intensity_range", "image_mean", "image_std")


def _check_no_folder_options(settings: AuditSettings) -> None:
    """Refuse the folder reader's options when the user's data module reads the images.

    Raises:
        UsageError: naming the options and where the data module takes them.
    """
    inputs = settings.inputs
    given = [n for n in _FOLDER_OPTIONS if getattr(inputs, n) is not None]
    given += ["in_channels"] if settings.network.in_channels is not None else []
    given += ["channel_order"] if inputs.channel_order != "auto" else []
    given += ["zscore"] if inputs.zscore else []
    if given:
        flags = " ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(
            f"{flags}: the data module reads, resizes and normalises the images here, as in "
            "training; set its own arguments instead (in the config's data section, or with "
            "--datamodule-kwargs), or drop the data module to audit a folder."
        )


def assumed_settings(settings: Preprocessing, loaded: Sequence[LoadedCheckpoint]) -> list[str]:
    """One line per setting the audit's own reader assumes because neither the command line
    nor the checkpoint says it, with the option that fixes it."""
    first = loaded[0]
    if first.data_saved and first.image_size is not None:
        return []  # the checkpoint's data module said how its images were made
    notes = []
    volumes = first.dims == 3
    if settings.size is None and first.image_size is None:
        side = default_size(first.dims)[0]
        notes.append(
            f"assumed size {side} (the checkpoint does not say its training size): pass --size"
        )
    normalisation = (settings.image_mean, settings.image_std, first.image_mean, first.image_std)
    if not volumes and all(value is None for value in normalisation):
        notes.append(
            "assumed no normalisation (inputs in [0, 1]; the checkpoint does not say how its "
            "images were normalised): pass --image-mean and --image-std"
        )
    if not volumes and settings.channel_order == "auto" and not first.data_saved:
        order = first.channel_order or "rgb"
        notes.append(
            f"assumed {order.upper()} channel order (the checkpoint does not say): pass "
            "--channel-order"
        )
    if volumes and settings.intensity_range is None and not settings.zscore:
        notes.append(
            "assumed each volume's own minimum and maximum as its intensity window: pass "
            "--intensity-range LO HI (e.g. a CT window) or --zscore"
        )
    if notes:
        notes.append(
            "the run's own pipeline needs no assumptions: --config "
            "lightning_logs/version_N/config.yaml (or --module with --datamodule)"
        )
    return notes


def _resolve_readout(readout: Readout, num_outputs: int) -> Readout:
    """``--output-kind`` decided (``auto``) and checked against the network's channels.

    Raises:
        UsageError: for a kind the network's channels do not fit.
    """
    kind = readout.kind
    try:
        return readout.resolved(num_outputs)
    except ValueError:
        if kind == "multiclass":
            raise UsageError(
                "--output-kind multiclass needs two or more output channels, but the network has "
                "one: its softmax is the constant 1, so every CAM would be blank. Pass "
                "--output-kind binary (or auto) for a one-channel sigmoid model."
            ) from None
        raise UsageError(
            f"--output-kind {kind} expects one output channel (the foreground's logit), but the "
            f"network has {num_outputs}. Pass --output-kind multiclass (a softmax over the "
            "channels) or multilabel (independent sigmoids)."
        ) from None


def _resolve_classes(wanted: Sequence[int] | None, num_classes: int, kind: str) -> list[int]:
    if kind == "binary":
        if wanted is None or list(wanted) == [0]:
            return [0]
        raise UsageError(
            f"--classes {list(wanted)}: a binary model has one output channel, class 0, whose "
            "maps explain the foreground (mask label 1). Drop --classes, or pass --classes 0."
        )
    if wanted is None:
        return list(range(num_classes))
    bad = [k for k in wanted if k >= num_classes]
    if bad or len(set(wanted)) != len(wanted):
        raise UsageError(
            f"--classes {list(wanted)}: expected distinct class indices in 0..{num_classes - 1} "
            f"(the checkpoint predicts {num_classes} classes), but got "
            f"{bad if bad else 'repeats'}."
        )
    return list(wanted)


def resolve_size(size: int | None, loaded: Sequence[LoadedCheckpoint]) -> tuple[int, ...]:
    """The input size: ``(H, W)`` for networks of images, ``(D, H, W)`` for ones of volumes.

    ``--size`` (a square or a cube), else the first training size a checkpoint knows, else
    :func:`~segcam_lightning.loading.default_size` (256×256; 32³ for volumes). A U-Net's
    sides must be multiples of 16; any other network's sizes are its own, checked by the dry
    run before writing.

    Raises:
        UsageError: for a U-Net and a side that is not a multiple of 16.
    """
    dims = loaded[0].dims
    if size is not None:
        resolved = (size,) * dims
    else:
        known = (c.image_size for c in loaded if c.image_size and len(c.image_size) == dims)
        resolved = next(known, default_size(dims))
    unet = any(isinstance(m, UNet) for c in loaded for m in c.net.modules())
    if unet and any(side % 16 for side in resolved):
        what = "volume" if dims == 3 else "image"
        poolings = "2x2x2" if dims == 3 else "2x2"
        raise UsageError(
            f"The U-Net needs {what} sides divisible by 16 (four {poolings} poolings), but the "
            f"input size is {'x'.join(map(str, resolved))}. Pass e.g. "
            f"--size {max(16, min(resolved) // 16 * 16)}."
        )
    return tuple(resolved)


def _resolve_names(
    settings: Labels,
    first: LoadedCheckpoint,
    num_outputs: int,
    kind: str,
    data: str | None = None,
) -> tuple[list[str], list[str]]:
    """The class names (one per output channel) and the mask labels' names.

    ``--class-names``, else the checkpoint's (its module's or data module's), else the
    synthetic data's, else the network's Hugging Face ``config.id2label``, else ``class_<k>``
    (the rule of :func:`~segcam_lightning.networks.class_names_of`, the callback's too). A
    binary model's one class is its foreground, named by the second of two names (the first
    names the background) or by a single name; ``"foreground"`` without names.
    """
    from segcam_lightning.networks import class_names_of

    given = settings.class_names
    if kind == "binary" and given is not None and len(given) not in (1, 2):
        raise UsageError(
            f"--class-names gives {len(given)} names {list(given)}, but the model is binary "
            "(one sigmoid channel): pass the foreground's name, or the background's and the "
            "foreground's (e.g. --class-names soil plant)."
        )
    if kind != "binary" and given is not None and len(given) != num_outputs:
        raise UsageError(
            f"--class-names gives {len(given)} names {list(given)}, but the checkpoint predicts "
            f"{num_outputs} classes; pass one name per class."
        )
    synthetic = {SYNTHETIC: SYNTHETIC_CLASS_NAMES, SYNTHETIC3D: SYNTHETIC3D_CLASS_NAMES}
    saved = first.class_names or synthetic.get(data or "")
    names = class_names_of(
        first.net, given=given, num_outputs=num_outputs, binary=kind == "binary", saved=saved
    )
    return names.channels, names.labels


def default_layers(
    loaded: LoadedCheckpoint,
    size: tuple[int, ...],
    network: NetworkCode,
    adapter: str | None = None,
) -> tuple[str, ...]:
    """The layer explained without ``--layers``: the output of the last block before the
    output head on the path to the logits ``adapter`` (``--output-adapter``) reads
    (:func:`~segcam_lightning.cam.layers.default_layer_name`, the callback's rule), e.g.
    ``d4.conv.conv.5`` in the blog U-Net; named without :attr:`LoadedCheckpoint.layer_prefix`.

    Raises:
        UsageError: when no layer qualifies.
    """
    net = loaded.net
    if isinstance(net, UNet):
        return (DEFAULT_LAYER,)  # what the rule gives for the blog U-Net, without a forward
    example = torch.zeros(1, loaded.in_channels, *size, device=next(_devices(net)))
    try:
        name = default_layer_name(net, example, adapter)
    except (ValueError, RuntimeError, TypeError, AttributeError, KeyError) as error:
        raise UsageError(
            f"Could not choose a default layer in the {type(net).__name__} of {loaded.path} "
            f"({one_line(error)}). Pass --layers; `{list_layers_command(network, loaded.path)}` "
            "lists them."
        ) from None
    return (name.removeprefix(loaded.layer_prefix),)


def _devices(net: nn.Module) -> Any:
    yield from (p.device for p in net.parameters())
    yield torch.device("cpu")


def _audit_model(
    label: str,
    loaded: LoadedCheckpoint,
    settings: AuditSettings,
    device: torch.device,
    readout: Readout,
    layer_names: Sequence[str],
    direct: str | None = None,
) -> AuditModel:
    net = loaded.net.to(device)
    resolved = [_layer_name(loaded, name, settings.network) for name in layer_names]
    explain = settings.explain
    reshape = _reshape(loaded, explain.reshape, resolved, settings.network)
    try:
        engine = CAMEngine(
            net,
            [hooked for hooked, _ in resolved],
            explain.method,
            explain.target,
            explain.normalize,
            readout=readout,
            output_adapter=explain.output_adapter,
            reshape=reshape,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if direct is not None:  # the user's pipeline makes the inputs: nothing to convert
        return AuditModel(
            label=label,
            loaded=loaded,
            engine=engine,
            bgr=False,
            readout=readout,
            layers=tuple(shown for _, shown in resolved),
            direct=direct,
        )
    if loaded.dims == 2 and loaded.in_channels not in (1, 3):
        raise UsageError(
            f"{loaded.path} takes {loaded.in_channels}-channel images, but the audit reads images "
            "as 3-channel colour (and feeds 1-channel networks their grey conversion). Audit a "
            "network trained on colour or grey images."
        )
    order = settings.inputs.channel_order
    if order == "auto":
        order = loaded.channel_order or "rgb"
    mean, std = _normalisation(settings.inputs, loaded)
    return AuditModel(
        label=label,
        loaded=loaded,
        engine=engine,
        bgr=order == "bgr",
        gray=loaded.in_channels == 1,
        readout=readout,
        layers=tuple(shown for _, shown in resolved),
        mean=mean,
        std=std,
    )


def _reshape(
    loaded: LoadedCheckpoint,
    items: Sequence[str] | None,
    resolved: Sequence[tuple[str, str]],
    network: NetworkCode,
) -> dict[str, TokenLayout]:
    """``--reshape LAYER=SPEC`` items as the engine's ``reshape=`` (layers named as the network
    calls them).

    Raises:
        UsageError: for a layer that is not explained, or named twice.
    """
    layouts: dict[str, TokenLayout] = {}
    explained = {hooked: shown for hooked, shown in resolved}
    for item in items or ():
        name, _, spec = item.partition("=")
        hooked, _ = _layer_name(loaded, name, network)
        if hooked not in explained:
            raise UsageError(
                f"--reshape {item}: {name} is not explained (the layers are "
                f"{' '.join(explained.values())}); add it to --layers, or drop its --reshape."
            )
        if hooked in layouts:
            raise UsageError(f"--reshape names {name} twice; give one layout per layer.")
        layouts[hooked] = parse_layout(spec)
    return layouts


def _normalisation(
    settings: Preprocessing, loaded: LoadedCheckpoint
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``--image-mean``/``--image-std``, else the checkpoint's, checked against the channels
    the network is fed."""
    mean = settings.image_mean or loaded.image_mean
    std = settings.image_std or loaded.image_std
    channels = loaded.in_channels
    for option, values, given in (
        ("--image-mean", mean, settings.image_mean),
        ("--image-std", std, settings.image_std),
    ):
        if values is None or len(values) in (1, channels):
            continue
        where = "" if given else f" (saved with {loaded.path}'s data module)"
        raise UsageError(
            f"{option} has {len(values)} values {list(values)}{where}, but the network takes "
            f"{channels} channel(s): pass one value per channel, in the order the network is "
            "fed, or one for all."
        )
    if std is not None and not all(v > 0 for v in std):
        raise UsageError(f"--image-std {list(std)}: expected positive values.")
    return mean, std


def _layer_name(loaded: LoadedCheckpoint, name: str, network: NetworkCode) -> tuple[str, str]:
    """``(name as the network calls it, name as the outputs show it)``.

    A LightningModule-style prefix (``net.``, ``model.``, ``network.``) may be given or left
    out: ``d4.conv.conv.5`` and ``net.d4.conv.conv.5`` are the same layer, shown as the first.
    """
    net, prefix = loaded.net, loaded.layer_prefix
    names = {n for n, _ in net.named_modules() if n}
    candidates = [name, prefix + name] + [
        name.removeprefix(f"{a}.") for a in NETWORK_ATTRIBUTES if name.startswith(f"{a}.")
    ]
    for candidate in candidates:
        if candidate in names:
            return candidate, candidate.removeprefix(prefix)
    try:
        _find_layer(net, name)
    except ValueError as error:
        message = str(error).split(" List the layers")[0]
        raise UsageError(
            f"--layers: {message} (in {loaded.path}). Run "
            f"`{list_layers_command(network, loaded.path)}` to see every layer a CAM can use, "
            "with its output shape."
        ) from None
    return name, name
