"""Running an audit: one process (a DataLoader, the engines, the render threads) or
Lightning's ``Trainer.predict`` over several devices; then the final files."""

from __future__ import annotations

import errno
import json
import os
import sys
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
from segcam_lightning.audit.checks import QualityChecks, run_checks
from segcam_lightning.audit.data import make_loader
from segcam_lightning.audit.lock import OutputLock, check_free
from segcam_lightning.audit.plan import AuditPlan, prepare
from segcam_lightning.audit.preflight import check_before_writing
from segcam_lightning.audit.report import AuditOutcome, finish
from segcam_lightning.audit.resume import (
    Elapsed,
    StopSignals,
    load_state,
    nothing_to_resume,
    save_state,
)
from segcam_lightning.audit.settings import (
    LOCK_FILE,
    PROG,
    STATE_FILE,
    AuditError,
    AuditSettings,
    DataSource,
    RunOptions,
    Stop,
)
from segcam_lightning.audit.writer import LocalResult, OutputWriter
from segcam_lightning.errors import UsageError
from segcam_lightning.render import opencv_threads
from segcam_lightning.text import one_line


def run_audit(settings: AuditSettings) -> AuditOutcome | None:
    """Run a whole audit and write every output.

    Everything knowable before the first batch is checked before ``--out`` is touched. Then the
    run takes ``--out``'s lock (:class:`~segcam_lightning.audit.lock.OutputLock`: a second run
    into the same folder stops) and writes :data:`STATE_FILE` before its first batch, so that
    a run stopped in any way (a full disk, a kill) can be resumed. Once every image is done,
    the quality checks asked for run (``--sanity-check``, ``--faithfulness``:
    :mod:`~segcam_lightning.audit.checks`). On SIGINT or SIGTERM (:class:`StopSignals`), or a
    failure mid-run (checks included), the images done are written and marked partial; the
    outcome's ``stopped`` says why. With ``settings.run.resume``, the images an interrupted run in
    ``--out`` finished are kept and only the rest are audited; timings cover the whole audit.

    Returns:
        The outcome on global rank 0; ``None`` on the other ranks of a distributed run.

    Raises:
        UsageError: for mistakes in the settings or inputs (nothing has been written then).
        AuditError: when the results could not be written (the message says what is kept).
    """
    start = time.perf_counter()
    _check_out(settings)
    plan = prepare(settings)
    check_before_writing(plan, settings)
    if _launched_rank() == 0:
        for note in plan.notes:  # what the run chose or assumed, before anything is written
            print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    plan.load_seconds = time.perf_counter() - start
    lock = OutputLock(settings.out)
    if _launched_rank() == 0:
        lock.acquire()
    try:
        if lock.took_over is not None:
            print(
                f"{PROG}: note: took over the stale lock of {lock.took_over.describe()} in "
                f"{settings.out} (no such process is running).",
                file=sys.stderr,
            )
        return _run_owned(plan, settings, start)
    finally:
        lock.release()


def _run_owned(plan: AuditPlan, settings: AuditSettings, start: float) -> AuditOutcome | None:
    """:func:`run_audit` once the run holds ``--out``'s lock."""
    if settings.run.distributed:
        results = _run_distributed(plan, settings)
        if results is None:
            return None
        process_seconds = time.perf_counter() - start - plan.load_seconds
        checks = _run_checks(plan, settings, results)
        seconds = time.perf_counter() - start
        return finish(plan, settings, results, process_seconds, seconds, checks)
    loaded = load_state(plan) if settings.run.resume else None
    previous, before = loaded if loaded is not None else (None, Elapsed())
    # The state exists before the first file is written: a run that cannot update it later
    # (a full disk, a kill) leaves a folder that --resume still finishes.
    save_state(plan, [previous] if previous is not None else [], before)
    with StopSignals() as signals:
        result = audit_local(plan, settings.source, settings.run, previous, signals)
        process_seconds = time.perf_counter() - start - plan.load_seconds + before.process_s
        if previous is not None:
            result = previous.merged(result)
        checks = _checks_or_stop(plan, settings, result, signals)
        total_seconds = time.perf_counter() - start + before.total_s
        return _finish_or_keep(
            plan, settings, result, process_seconds, total_seconds, checks, before.parts + 1
        )


def _run_checks(
    plan: AuditPlan,
    settings: AuditSettings,
    results: Sequence[LocalResult],
    signals: StopSignals | None = None,
) -> QualityChecks | None:
    """:func:`run_checks` with the run's checks, batch size and progress setting."""
    batch_size, progress = settings.source.batch_size, settings.run.progress
    return run_checks(plan, results, settings.checks, batch_size, signals, progress)


def _checks_or_stop(
    plan: AuditPlan, settings: AuditSettings, result: LocalResult, signals: StopSignals
) -> QualityChecks | None:
    """The quality checks of a run whose images are all done; a signal or a failure during
    them makes the run partial (``result.stopped``), and ``--resume`` runs them again."""
    if result.stopped is not None:
        return None
    try:
        return _run_checks(plan, settings, [result], signals)
    except (Exception, KeyboardInterrupt) as error:
        stop = signals.stop(error) or Stop(one_line(error), 1)
        if stop.signal_name is None:
            reason = f"the quality checks failed: {stop.reason}"
        else:
            reason = f"{stop.reason} during the quality checks"
        result.stopped = Stop(reason, stop.exit_status, stop.signal_name)
        return None


def _finish_or_keep(
    plan: AuditPlan,
    settings: AuditSettings,
    result: LocalResult,
    process_seconds: float,
    total_seconds: float,
    checks: QualityChecks | None = None,
    parts: int = 1,
) -> AuditOutcome:
    """:func:`finish`; if the final files cannot be written (a full disk), the run becomes
    partial and what can be written of it is, the resume state first."""
    try:
        return finish(plan, settings, [result], process_seconds, total_seconds, checks, parts)
    except OSError as error:
        failure = f"could not write the results in {plan.layout.root}: {one_line(error)}"
    result.stopped = Stop(failure, 1)
    finished = result.processed + len(result.skipped)
    done = f"{finished} of {len(plan.dataset)} image(s) finished"
    try:
        finish(plan, settings, [result], process_seconds, total_seconds, parts=parts)
        kept = f"{done}; the files written are marked partial"
    except OSError:  # the same cause, most likely; the state file is written first
        kept = f"{done}; {_kept(plan, finished)}"
    raise AuditError(
        f"{failure} ({kept}). Free space or fix the cause, then finish with the same command "
        "and --resume."
    )


def _kept(plan: AuditPlan, finished: int) -> str:
    """What the state file on disk keeps of the ``finished`` images, after the final files
    could not be written."""
    path = plan.layout.file(STATE_FILE)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        kept = int(state["processed"]) + len(state["skipped"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no {path.name} could be written, so start afresh with --overwrite instead"
    if kept == finished:
        return f"{path.name} keeps them (their files are all on disk)"
    return (
        f"but {path.name} could not be updated: it keeps the {kept} image(s) it held before, "
        "whose files are all on disk, and --resume redoes the rest"
    )


def _check_out(settings: AuditSettings) -> None:
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the results.")
    if settings.run.resume and settings.run.distributed:
        raise UsageError(
            "--resume continues single-process audits; drop --devices/--num-nodes/--strategy to "
            "finish the run in one process, or start a distributed run afresh with --overwrite."
        )
    if _launched_rank() != 0:
        return
    if out.is_dir():
        check_free(out)  # a live run's folder: say so before anything else
    # A stale lock alone (a run killed before it wrote anything) leaves the folder empty.
    if settings.run.overwrite or not (out.is_dir() and any(_entries(out))):
        return
    if (out / STATE_FILE).is_file():
        if settings.run.resume:
            return
        raise UsageError(
            f"--out {out} holds an interrupted audit ({STATE_FILE}). Finish it with the same "
            "command and --resume, or start afresh with --overwrite (or another --out)."
        )
    if settings.run.resume:
        raise UsageError(nothing_to_resume(out))
    raise UsageError(
        f"--out {out} already holds files; old panels would mix with this run's. Choose a "
        "new or empty folder, or pass --overwrite (files with the same names are replaced)."
    )


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds besides a lock."""
    return [path for path in out.iterdir() if path.name != LOCK_FILE]


def _launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside distributed runs)."""
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "0")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def audit_local(
    plan: AuditPlan,
    source: DataSource,
    run: RunOptions,
    previous: LocalResult | None = None,
    signals: StopSignals | None = None,
    overlap: bool | None = None,
) -> LocalResult:
    """Audit ``plan``'s dataset in this process: batches through the engines, files written.

    Returns once every file is on disk; :func:`finish` then writes the CSV, summary and report.

    Args:
        plan: the run.
        source: how the images are batched (``--batch-size``, ``--num-workers``).
        run: the run's options (``--quiet``, ``--keep-going``).
        previous: what an interrupted run finished (``--resume``): those images are not redone,
            and are not in the returned result.
        signals: the run's :class:`StopSignals`. With them, a signal ends the run after the
            batch in hand, and a signal or a failure is recorded in the result's ``stopped``
            instead of raised; without them errors propagate.
        overlap: :func:`make_writer`'s.
    """
    writer = make_writer(plan, overlap)
    dataset: Dataset = plan.dataset
    if previous is not None:
        done = previous.finished()
        dataset = Subset(plan.dataset, [i for i in range(len(plan.dataset)) if i not in done])
    loader = make_loader(dataset, source, pin=plan.device.type == "cuda")
    stopped = None
    with opencv_threads(1):
        writer.open()
        try:
            with tqdm(
                total=len(dataset),
                unit="img",
                desc="audit",
                disable=not run.progress,
            ) as bar:
                for batch in loader:
                    explained = explain_batch(plan.models, batch, plan.classes, plan.device)
                    if not run.keep_going:
                        _check_finite(plan, explained)
                    writer.submit(explained)
                    bar.update(len(batch["index"]))
                    if signals is not None and signals.received is not None:
                        break
        except (Exception, KeyboardInterrupt) as error:
            if signals is None:
                raise
            stopped = signals.stop(error)
            if isinstance(error, NonFiniteLogits) and signals.received is None:
                stopped = Stop(str(error), 2)
        finally:
            result = writer.close()
    if signals is None:
        if writer.failure is not None:
            raise writer.failure
        return result
    result.stopped = stopped or signals.stop(writer.failure)
    failure = writer.failure
    if signals.received is None and isinstance(failure, OSError) and failure.errno in _DISK_FULL:
        reason = result.stopped.reason if result.stopped else one_line(failure)
        result.stopped = Stop(
            f"{reason}; the files of the image(s) being written were removed, and "
            f"{STATE_FILE} keeps the finished ones",
            1,
        )
    return result


# A write that fails for want of space: the folder stays resumable once space is freed.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NonFiniteLogits(Exception):
    """A checkpoint's logits are not finite on an image (without ``--keep-going``)."""


def _check_finite(plan: AuditPlan, batch: BatchResult) -> None:
    """Stop before writing a batch on which a checkpoint's logits are not finite.

    Raises:
        NonFiniteLogits: naming the checkpoint and the first such image.
    """
    if not batch.indices:  # every image skipped: no engine ran
        return
    for model, result in zip(plan.models, batch.models, strict=True):
        if result.finite is None or result.finite.all():
            continue
        name = batch.names[int(result.finite.argmin())]
        raise NonFiniteLogits(
            f"checkpoint {model.label} gives non-finite logits (NaN or inf) on image {name}, so "
            "its maps and metrics there are meaningless (weights that overflow?); the batch "
            "was not written. Pass --keep-going to mark its rows broken and audit on"
        )


def make_writer(plan: AuditPlan, overlap: bool | None = None) -> OutputWriter:
    """The run's :class:`OutputWriter`: it renders in a pool of ``plan.render_threads``.

    Args:
        plan: the run.
        overlap: render a batch while the next is explained; ``None``: only on a GPU (on the
            CPU the render threads would slow PyTorch's own).
    """
    return OutputWriter(
        plan.layout,
        plan.layout.layers,
        plan.classes,
        plan.class_names,
        plan.colormap,
        plan.report_images,
        plan.render_threads,
        overlap=plan.device.type != "cpu" if overlap is None else overlap,
    )


def _run_distributed(plan: AuditPlan, settings: AuditSettings) -> list[LocalResult] | None:
    run = settings.run
    module = _AuditModule(plan.models, plan.classes)
    callback = _AuditPredictionWriter(make_writer(plan))
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[run.device]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=run.devices,
        num_nodes=run.num_nodes,
        strategy=run.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=run.progress,
        callbacks=[callback],
        default_root_dir=settings.out,
    )
    pin = accelerator != "cpu" and torch.cuda.is_available()
    loader = make_loader(plan.dataset, settings.source, pin=pin)
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
