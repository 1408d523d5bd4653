"""Preparing and running an audit: checkpoints, engines, data; one process or Trainer.predict."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
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
from segcam_lightning.audit.resume import StopSignals, load_state, nothing_to_resume, one_line
from segcam_lightning.audit.settings import (
    PROG,
    RESERVED_NAMES,
    STATE_FILE,
    SYNTHETIC,
    AuditError,
    AuditSettings,
    Stop,
    UsageError,
)
from segcam_lightning.audit.writer import LocalResult, OutputWriter
from segcam_lightning.cam import (
    CAMEngine,
)
from segcam_lightning.cam import find_layer as _find_layer
from segcam_lightning.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from segcam_lightning.data.colormap import SEED_COLORMAP
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES
from segcam_lightning.render import (
    opencv_threads,
)


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

    Raises:
        UsageError: for missing, unsafe, unreadable or mismatched checkpoints.
    """
    loaded = []
    for path in settings.checkpoints:
        try:
            loaded.append(load_checkpoint(path, settings.num_classes, settings.trust_checkpoint))
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
    num_classes = first.num_classes
    classes = _resolve_classes(settings.classes, num_classes)
    size = resolve_size(settings.size, loaded)
    labels = unique_components(
        [c.path.stem for c in loaded], fallback="checkpoint", reserved=RESERVED_NAMES
    )
    # Distributed: Lightning moves each rank's copy to its own device.
    model_device = torch.device("cpu") if settings.distributed else device
    models = [
        _audit_model(label, c, settings, model_device)
        for label, c in zip(labels, loaded, strict=True)
    ]
    data_colormap = settings.colormap or first.colormap or SEED_COLORMAP
    dataset = build_dataset(
        settings.data or SYNTHETIC, size, data_colormap, num_classes, settings.limit
    )
    if settings.target == "gt_region" and not dataset.has_masks:
        raise UsageError(
            f"--target gt_region explains each class inside its ground-truth region, but "
            f"{settings.data} has no masks/. Use --target softmax_mean or logit_region."
        )
    layout = OutputLayout(settings.out, tuple(labels), tuple(models[0].engine.layer_names))
    plan = AuditPlan(
        settings=settings,
        models=models,
        dataset=dataset,
        classes=classes,
        class_names=_resolve_class_names(settings, first, num_classes),
        colormap=_display_colormap(data_colormap, num_classes),
        size=size,
        device=device,
        layout=layout,
        load_seconds=0.0,
    )
    check_before_writing(plan, model_device)
    plan.load_seconds = time.perf_counter() - start
    return plan


def _resolve_classes(wanted: Sequence[int] | None, num_classes: int) -> list[int]:
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
    if size is not None:
        resolved = (size, size)
    else:
        resolved = next((c.image_size for c in loaded if c.image_size), (256, 256))
    if resolved[0] % 16 or resolved[1] % 16:
        raise UsageError(
            f"The U-Net needs image sides divisible by 16 (four 2x2 poolings), but the input "
            f"size is {resolved[0]}x{resolved[1]}. Pass e.g. "
            f"--size {max(16, resolved[0] // 16 * 16)}."
        )
    return resolved


def _resolve_class_names(
    settings: AuditSettings, first: LoadedCheckpoint, num_classes: int
) -> list[str]:
    names = settings.class_names or first.class_names
    if names is None and settings.data == SYNTHETIC and num_classes == len(SYNTHETIC_CLASS_NAMES):
        names = SYNTHETIC_CLASS_NAMES
    if names is None:
        return [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise UsageError(
            f"--class-names gives {len(names)} names {list(names)}, but the checkpoint predicts "
            f"{num_classes} classes; pass one name per class."
        )
    return [str(n) for n in names]


def _display_colormap(
    colormap: Sequence[Sequence[int]], num_classes: int
) -> list[tuple[int, int, int]]:
    if len(colormap) >= num_classes:
        return [tuple(int(v) for v in c) for c in colormap]  # type: ignore[misc]
    hues = np.linspace(0, 179, num_classes, endpoint=False).astype(np.uint8)
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)], -1)[None]
    palette = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]
    return [(0, 0, 0)] + [tuple(int(v) for v in c) for c in palette[1:]]  # type: ignore[misc]


def _audit_model(
    label: str, loaded: LoadedCheckpoint, settings: AuditSettings, device: torch.device
) -> AuditModel:
    net = loaded.net.to(device)
    layers = [_layer_name(net, name, loaded.path) for name in settings.layers]
    try:
        engine = CAMEngine(net, layers, settings.method, settings.target, settings.normalize)
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
    return AuditModel(
        label=label, loaded=loaded, engine=engine, bgr=order == "bgr", gray=loaded.in_channels == 1
    )


def _layer_name(net: nn.Module, name: str, path: Path) -> str:
    """``name`` as the network calls it (a LightningModule-style ``net.`` prefix is dropped)."""
    names = {n for n, _ in net.named_modules() if n}
    if name not in names and name.removeprefix("net.") in names:
        return name.removeprefix("net.")
    try:
        _find_layer(net, name)
    except ValueError as error:
        message = str(error).split(" List the layers")[0]
        raise UsageError(
            f"--layers: {message} (in {path}). Run `{PROG} --checkpoint {path} --list-layers` "
            "to see every layer a CAM can use, with its output shape."
        ) from None
    return name


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
        plan.models[0].engine.layer_names,
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
        # The engine leaves predict's inference mode itself (DESIGN.md, fact 3).
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
