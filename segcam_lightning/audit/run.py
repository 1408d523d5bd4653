"""Preparing and running an audit: checkpoints, engines, data; one process or Trainer.predict."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm
from typing_extensions import override

from segcam_lightning.audit.batches import AuditModel, BatchResult, explain_batch
from segcam_lightning.audit.data import build_dataset, make_loader
from segcam_lightning.audit.paths import OutputLayout, unique_components
from segcam_lightning.audit.plan import AuditPlan
from segcam_lightning.audit.preflight import check_before_writing
from segcam_lightning.audit.report import AuditOutcome, finish
from segcam_lightning.audit.resume import StopSignals, load_state, nothing_to_resume
from segcam_lightning.audit.settings import (
    DEFAULT_LAYER,
    RESERVED_NAMES,
    STATE_FILE,
    SYNTHETIC,
    AuditError,
    AuditSettings,
    Stop,
    UsageError,
    list_layers_command,
    one_line,
)
from segcam_lightning.audit.user_code import UserCode, resolve_code
from segcam_lightning.audit.writer import LocalResult, OutputWriter
from segcam_lightning.cam import CAMEngine, resolve_output_kind
from segcam_lightning.cam import find_layer as _find_layer
from segcam_lightning.checkpoints import (
    DEFAULT_SIZE,
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    load_lightning_module,
    load_network_weights,
)
from segcam_lightning.data.colormap import SEED_COLORMAP
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES
from segcam_lightning.models import UNet
from segcam_lightning.networks import NETWORK_ATTRIBUTES, default_layer
from segcam_lightning.render import class_palette, opencv_threads

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


def load_models(settings: AuditSettings) -> list[LoadedCheckpoint]:
    """Load every ``--checkpoint`` safely; all must predict the same number of classes.

    Without ``--module``/``--model`` each is the package's U-Net (:func:`load_checkpoint`);
    with ``--module`` the named LightningModule rebuilds each (:func:`load_lightning_module`);
    with ``--model`` the named factory builds a network for each file's weights
    (:func:`load_network_weights`).

    Raises:
        UsageError: for bad ``--module``/``--model`` code, and missing, unsafe, unreadable or
            mismatched checkpoints.
    """
    code = resolve_code(settings)
    if code is None and settings.in_channels is not None:
        raise UsageError(
            "--in-channels is for the networks of --module/--model; the U-Net's input channels "
            "are read from its weights. Drop --in-channels."
        )
    loaded = []
    for path in settings.checkpoints:
        try:
            loaded.append(_load(path, settings, code))
        except (FileNotFoundError, CheckpointError) as error:
            raise UsageError(str(error)) from None
    counts = {c.num_classes for c in loaded}
    if len(counts) > 1:
        found = ", ".join(f"{c.path} {c.num_classes}" for c in loaded)
        raise UsageError(
            f"The checkpoints predict different numbers of classes ({found}); comparing CAMs "
            "needs the same classes. Audit them in separate runs."
        )
    return loaded


def _load(path: Path, settings: AuditSettings, code: UserCode | None) -> LoadedCheckpoint:
    if code is None:
        return load_checkpoint(path, settings.num_classes, settings.trust_checkpoint)
    side = (settings.size, settings.size) if settings.size else None
    options: dict[str, Any] = {
        "code": code.spec,
        "trust": settings.trust_checkpoint,
        "num_classes": settings.num_classes,
        "in_channels": settings.in_channels,
        "size": side,
    }
    if code.option == "--module":
        return load_lightning_module(path, code.target, **options)
    return load_network_weights(path, code.build(), **options)


def prepare(settings: AuditSettings) -> AuditPlan:
    """Resolve a run: load checkpoints, build engines and the dataset, plan the outputs, and
    check everything knowable before the first batch (:func:`check_before_writing`).

    Nothing is written here.

    Raises:
        UsageError: for any mistake in the settings or inputs, with what to do about it.
    """
    start = time.perf_counter()
    device = resolve_device(settings.device)
    loaded = load_models(settings)
    first = loaded[0]
    num_outputs = first.num_classes
    kind = _resolve_kind(settings.output_kind, num_outputs)
    classes = _resolve_classes(settings.classes, num_outputs, kind)
    size = resolve_size(settings.size, loaded)
    labels = unique_components(
        [c.path.stem for c in loaded], fallback="checkpoint", reserved=RESERVED_NAMES
    )
    # Distributed: Lightning moves each rank's copy to its own device.
    model_device = torch.device("cpu") if settings.distributed else device
    layers = settings.layers or default_layers(first, size, settings)
    models = [
        _audit_model(label, c, settings, model_device, kind, layers)
        for label, c in zip(labels, loaded, strict=True)
    ]
    num_labels = 2 if kind == "binary" else num_outputs
    default_colormap = BINARY_COLORMAP if kind == "binary" else SEED_COLORMAP
    data_colormap = settings.colormap or first.colormap or default_colormap
    dataset = build_dataset(
        settings.data or SYNTHETIC, size, data_colormap, num_labels, settings.limit, kind
    )
    if settings.target == "gt_region" and not dataset.has_masks:
        raise UsageError(
            f"--target gt_region explains each class inside its ground-truth region, but "
            f"{settings.data} has no masks/. Use --target softmax_mean or logit_region."
        )
    class_names, label_names = _resolve_names(settings, first, num_outputs, kind)
    layout = OutputLayout(settings.out, tuple(labels), models[0].layers)
    plan = AuditPlan(
        settings=settings,
        models=models,
        dataset=dataset,
        classes=classes,
        class_names=class_names,
        colormap=class_palette(data_colormap, num_labels),
        size=size,
        device=device,
        layout=layout,
        load_seconds=0.0,
        output_kind=kind,
        label_names=label_names,
        code=resolve_code(settings),
    )
    check_before_writing(plan, model_device)
    plan.load_seconds = time.perf_counter() - start
    return plan


def _resolve_kind(kind: str, num_outputs: int) -> str:
    try:
        return resolve_output_kind(kind, num_outputs)
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


def resolve_size(size: int | None, loaded: Sequence[LoadedCheckpoint]) -> tuple[int, int]:
    """``--size``, else the first training image size a checkpoint knows, else 256×256.

    A U-Net's sides must be multiples of 16; any other network's sizes are its own, checked by
    the dry run before writing.

    Raises:
        UsageError: for a U-Net and a side that is not a multiple of 16.
    """
    if size is not None:
        resolved = (size, size)
    else:
        resolved = next((c.image_size for c in loaded if c.image_size), DEFAULT_SIZE)
    unet = any(isinstance(m, UNet) for c in loaded for m in c.net.modules())
    if unet and (resolved[0] % 16 or resolved[1] % 16):
        raise UsageError(
            f"The U-Net needs image sides divisible by 16 (four 2x2 poolings), but the input "
            f"size is {resolved[0]}x{resolved[1]}. Pass e.g. "
            f"--size {max(16, resolved[0] // 16 * 16)}."
        )
    return resolved


def _resolve_names(
    settings: AuditSettings, first: LoadedCheckpoint, num_outputs: int, kind: str
) -> tuple[list[str], list[str]]:
    """The class names (one per output channel) and the mask labels' names.

    A binary model's one class is its foreground, named by the second of two names (the first
    names the background) or by a single name; ``"foreground"`` without names.
    """
    given = settings.class_names
    names = given or first.class_names
    if kind == "binary":
        if given is not None and len(given) not in (1, 2):
            raise UsageError(
                f"--class-names gives {len(given)} names {list(given)}, but the model is binary "
                "(one sigmoid channel): pass the foreground's name, or the background's and the "
                "foreground's (e.g. --class-names soil plant)."
            )
        if names is not None and len(names) in (1, 2):
            background = str(names[0]) if len(names) == 2 else "background"
            return [str(names[-1])], [background, str(names[-1])]
        return ["foreground"], ["background", "foreground"]
    if names is None and settings.data == SYNTHETIC and num_outputs == len(SYNTHETIC_CLASS_NAMES):
        names = SYNTHETIC_CLASS_NAMES
    if given is not None and len(given) != num_outputs:
        raise UsageError(
            f"--class-names gives {len(given)} names {list(given)}, but the checkpoint predicts "
            f"{num_outputs} classes; pass one name per class."
        )
    if names is None or len(names) != num_outputs:  # a data module's names of other classes
        names = [f"class_{k}" for k in range(num_outputs)]
    names = [str(n) for n in names]
    return names, names


def default_layers(
    loaded: LoadedCheckpoint, size: tuple[int, int], settings: AuditSettings
) -> tuple[str, ...]:
    """The layer explained without ``--layers``: the seed's ``d4.conv.conv.5`` in a U-Net,
    else the last layer before the output head (the callback's default: the last leaf module
    whose ``[B, C, h, w]`` output has other than the logits' channel count).

    Raises:
        UsageError: when no layer qualifies.
    """
    inner = _inner_network(loaded)
    if isinstance(inner, UNet):
        return (DEFAULT_LAYER,)
    example = torch.zeros(1, loaded.in_channels, *size, device=next(_devices(inner)))
    try:
        return (default_layer(inner, example, loaded.num_classes),)
    except (ValueError, RuntimeError) as error:
        raise UsageError(
            f"Could not choose a default layer in the {type(inner).__name__} of {loaded.path} "
            f"({one_line(error)}). Pass --layers; `{list_layers_command(settings, loaded.path)}` "
            "lists them."
        ) from None


def _inner_network(loaded: LoadedCheckpoint) -> nn.Module:
    """The network whose names layers go by (without :attr:`LoadedCheckpoint.layer_prefix`)."""
    prefix = loaded.layer_prefix.rstrip(".")
    return loaded.net.get_submodule(prefix) if prefix else loaded.net


def _devices(net: nn.Module) -> Any:
    yield from (p.device for p in net.parameters())
    yield torch.device("cpu")


def _audit_model(
    label: str,
    loaded: LoadedCheckpoint,
    settings: AuditSettings,
    device: torch.device,
    kind: str,
    layer_names: Sequence[str],
) -> AuditModel:
    net = loaded.net.to(device)
    resolved = [_layer_name(loaded, name, settings) for name in layer_names]
    try:
        engine = CAMEngine(
            net,
            [hooked for hooked, _ in resolved],
            settings.method,
            settings.target,
            settings.normalize,
            output_kind=kind,
            threshold=settings.threshold,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if loaded.in_channels not in (1, 3):
        raise UsageError(
            f"{loaded.path} takes {loaded.in_channels}-channel images, but the audit reads images "
            "as 3-channel colour (and feeds 1-channel networks their grey conversion). Audit a "
            "network trained on colour or grey images."
        )
    order = settings.channel_order
    if order == "auto":
        order = loaded.channel_order or "rgb"
    mean, std = _normalisation(settings, loaded)
    return AuditModel(
        label=label,
        loaded=loaded,
        engine=engine,
        bgr=order == "bgr",
        gray=loaded.in_channels == 1,
        kind=kind,
        layers=tuple(shown for _, shown in resolved),
        mean=mean,
        std=std,
    )


def _normalisation(
    settings: AuditSettings, loaded: LoadedCheckpoint
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


def _layer_name(loaded: LoadedCheckpoint, name: str, settings: AuditSettings) -> tuple[str, str]:
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
            f"`{list_layers_command(settings, loaded.path)}` to see every layer a CAM can use, "
            "with its output shape."
        ) from None
    return name, name


# --------------------------------------------------------------------------- running


def run_audit(settings: AuditSettings) -> AuditOutcome | None:
    """Run a whole audit and write every output.

    Everything knowable before the first batch is checked before ``--out`` is touched. On
    SIGINT or SIGTERM (:class:`StopSignals`), or a failure mid-run, the images done are written
    and marked partial; the outcome's ``stopped`` says why. With ``settings.resume``, the images
    an interrupted run in ``--out`` finished are kept and only the rest are audited.

    Returns:
        The outcome on global rank 0; ``None`` on the other ranks of a distributed run.

    Raises:
        UsageError: for mistakes in the settings or inputs (nothing has been written then).
        AuditError: when the results could not be written (the message says what is kept).
    """
    start = time.perf_counter()
    _check_out(settings)
    plan = prepare(settings)
    previous = load_state(plan) if settings.resume else None
    if settings.distributed:
        results = _run_distributed(plan)
        if results is None:
            return None
        process_seconds = time.perf_counter() - start - plan.load_seconds
        return finish(plan, results, process_seconds, time.perf_counter() - start)
    with StopSignals() as signals:
        result = audit_local(plan, previous[0] if previous else None, signals)
        process_seconds = time.perf_counter() - start - plan.load_seconds
        if previous:
            result = previous[0].merged(result)
            process_seconds += previous[1]
        return _finish_or_keep(plan, result, process_seconds, time.perf_counter() - start)


def _finish_or_keep(
    plan: AuditPlan, result: LocalResult, process_seconds: float, total_seconds: float
) -> AuditOutcome:
    """:func:`finish`; if the final files cannot be written (a full disk), the run becomes
    partial and what can be written of it is, the resume state first."""
    try:
        return finish(plan, [result], process_seconds, total_seconds)
    except OSError as error:
        failure = f"could not write the results in {plan.layout.root}: {one_line(error)}"
    result.stopped = Stop(failure, 1)
    try:
        finish(plan, [result], process_seconds, total_seconds)
        kept = "the files written are marked partial"
    except OSError:  # the same cause, most likely; the state file is written first
        state = plan.layout.file(STATE_FILE)
        kept = f"{state.name} keeps the finished images" if state.is_file() else "nothing is kept"
    done = result.processed + len(result.skipped)
    raise AuditError(
        f"{failure} ({done} of {len(plan.dataset)} image(s) finished; {kept}). Fix the cause, "
        "then finish with the same command and --resume."
    )


def _check_out(settings: AuditSettings) -> None:
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the results.")
    if settings.resume and settings.distributed:
        raise UsageError(
            "--resume continues single-process audits; drop --devices/--num-nodes/--strategy to "
            "finish the run in one process, or start a distributed run afresh with --overwrite."
        )
    if _launched_rank() != 0 or settings.overwrite:
        return
    if not (out.is_dir() and any(out.iterdir())):
        return
    if (out / STATE_FILE).is_file():
        if settings.resume:
            return
        raise UsageError(
            f"--out {out} holds an interrupted audit ({STATE_FILE}). Finish it with the same "
            "command and --resume, or start afresh with --overwrite (or another --out)."
        )
    if settings.resume:
        raise UsageError(nothing_to_resume(out))
    raise UsageError(
        f"--out {out} already holds files; old panels would mix with this run's. Choose a "
        "new or empty folder, or pass --overwrite (files with the same names are replaced)."
    )


def _launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside distributed runs)."""
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "0")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def audit_local(
    plan: AuditPlan, previous: LocalResult | None = None, signals: StopSignals | None = None
) -> LocalResult:
    """Audit ``plan``'s dataset in this process: batches through the engines, files written.

    Returns once every file is on disk; :func:`finish` then writes the CSV, summary and report.

    Args:
        plan: the run.
        previous: what an interrupted run finished (``--resume``): those images are not redone,
            and are not in the returned result.
        signals: the run's :class:`StopSignals`. With them, a signal ends the run after the
            batch in hand, and a signal or a failure is recorded in the result's ``stopped``
            instead of raised; without them errors propagate.
    """
    writer = make_writer(plan)
    dataset: Dataset = plan.dataset
    if previous is not None:
        done = previous.finished()
        dataset = Subset(plan.dataset, [i for i in range(len(plan.dataset)) if i not in done])
    loader = make_loader(dataset, plan.settings, pin=plan.device.type == "cuda")
    stopped = None
    with opencv_threads(1):
        writer.open()
        try:
            with tqdm(
                total=len(dataset),
                unit="img",
                desc="audit",
                disable=not plan.settings.progress,
            ) as bar:
                for batch in loader:
                    writer.submit(explain_batch(plan.models, batch, plan.classes, plan.device))
                    bar.update(len(batch["index"]))
                    if signals is not None and signals.received is not None:
                        break
        except (Exception, KeyboardInterrupt) as error:
            if signals is None:
                raise
            stopped = signals.stop(error)
        finally:
            result = writer.close()
    if signals is None:
        if writer.failure is not None:
            raise writer.failure
        return result
    result.stopped = stopped or signals.stop(writer.failure)
    return result


def make_writer(plan: AuditPlan) -> OutputWriter:
    """The run's :class:`OutputWriter`: it renders in a pool and overlaps only on a GPU."""
    return OutputWriter(
        plan.layout,
        plan.layout.layers,
        plan.classes,
        plan.class_names,
        plan.colormap,
        plan.settings.report_images,
        plan.render_threads,
        overlap=plan.device.type != "cpu",
    )


def _run_distributed(plan: AuditPlan) -> list[LocalResult] | None:
    settings = plan.settings
    module = _AuditModule(plan.models, plan.classes)
    callback = _AuditPredictionWriter(make_writer(plan))
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[settings.device]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress,
        callbacks=[callback],
        default_root_dir=settings.out,
    )
    pin = accelerator != "cpu" and torch.cuda.is_available()
    loader = make_loader(plan.dataset, settings, pin=pin)
    with opencv_threads(1):  # see make_loader
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    return callback.gathered if trainer.is_global_zero else None


class _AuditModule(L.LightningModule):
    """``predict_step`` = :func:`explain_batch` over every checkpoint's network."""

    def __init__(self, models: list[AuditModel], classes: list[int]) -> None:
        super().__init__()
        self.nets = nn.ModuleList([m.net for m in models])
        self.audit_models = models
        self.classes = classes

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> BatchResult:
        # The engine leaves predict's inference mode itself (docs/architecture.md).
        return explain_batch(self.audit_models, batch, self.classes, self.device)


class _AuditPredictionWriter(BasePredictionWriter):
    """Writes each rank's images; global rank 0 gathers every rank's :class:`LocalResult`."""

    def __init__(self, writer: OutputWriter) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer
        self.gathered: list[LocalResult] | None = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.open(rank=trainer.global_rank)

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: BatchResult,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Lightning's predict sampler gives rank r the indices i with i % world == r; a padding
        # DistributedSampler would repeat a few of them on other ranks: those are dropped.
        world, rank = trainer.world_size, trainer.global_rank
        self.writer.submit(prediction, owns=lambda i: i % world == rank)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = self.writer.close()
        if self.writer.failure is not None:
            raise self.writer.failure
        if trainer.world_size == 1:
            self.gathered = [local]
            return
        gathered: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
        torch.distributed.gather_object(local, gathered, dst=0)
        self.gathered = gathered
