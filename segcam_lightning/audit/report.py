"""The end of a run: ``metrics.csv``, ``summary.json`` (with the shortcut suspects and the
quality checks' results), ``sanity.csv`` and ``faithfulness.csv``, and ``report.html`` by
:mod:`~segcam_lightning.audit.html`."""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcam_lightning.audit import tallies as tally
from segcam_lightning.audit.checks import (
    FAITHFULNESS_COLUMNS,
    SANITY_COLUMNS,
    QualityChecks,
    checks_summary,
    faithfulness_csv_rows,
    requested,
    sanity_csv_rows,
)
from segcam_lightning.audit.checks import describe as describe_checks
from segcam_lightning.audit.html import render_report
from segcam_lightning.audit.mistakes import MISTAKE_COLUMNS, mistake_csv_rows
from segcam_lightning.audit.modalities import MODALITY_COLUMNS
from segcam_lightning.audit.paths import write_atomic
from segcam_lightning.audit.resume import Elapsed, save_state
from segcam_lightning.audit.settings import (
    BROKEN,
    CSV_COLUMNS,
    STATE_FILE,
    AuditSettings,
    CheckSettings,
    Stop,
    jsonable,
)
from segcam_lightning.audit.writer import LocalResult, nifti_bytes
from segcam_lightning.quality.functional import shortcut_suspects

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan


@dataclass
class AuditOutcome:
    """What a run reports (global rank 0 only).

    Attributes:
        seconds: the run's time without the quality checks (their lines in ``notes`` say
            theirs).
        stopped: why the run ended before its last image; ``None`` for a complete run.
        images: the data set's size.
        skip_reasons: ``"<source>: <reason>"`` of the first skipped images.
        unit: what an item is: ``"image"`` or ``"volume"``.
        notes: lines about the quality checks and shortcut suspects, printed after the first.
    """

    out: Path
    processed: int
    skipped: int
    rows: int
    seconds: float
    images: int = 0
    stopped: Stop | None = None
    skip_reasons: tuple[str, ...] = ()
    unit: str = "image"
    notes: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """``"complete"``, or ``"partial"`` for a run that stopped early."""
        return "partial" if self.stopped else "complete"

    def describe(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        partial = " (partial: marked so in every file)" if self.stopped else ""
        return (
            f"Audited {self.processed} {self.unit}(s) ({self.skipped} skipped) in "
            f"{self.seconds:.1f} s ({rate:.1f} {self.unit}s/s); {self.rows} metric rows{partial}. "
            "Open "
            f"{self.out / 'report.html'}."
        ) + "".join(f"\n{note}" for note in self.notes)


def finish(
    plan: AuditPlan,
    settings: AuditSettings,
    results: Sequence[LocalResult],
    process_seconds: float,
    total_seconds: float,
    checks: QualityChecks | None = None,
    parts: int = 1,
) -> AuditOutcome:
    """Merge the processes' results and write ``metrics.csv``, ``report.html`` and
    ``summary.json``, each atomically, and the quality checks' ``sanity.csv`` and
    ``faithfulness.csv`` when ``checks`` holds them.

    ``settings`` are the run's (``summary.json`` lists them; their ``checks`` say which checks
    were asked for). ``process_seconds`` and ``total_seconds`` are the whole audit's, over its
    ``parts`` runs (a resumed audit's earlier runs included). Rows of a checkpoint whose logits
    were not finite (``run_status`` ``broken``) stay in ``metrics.csv`` and are left out of the
    means, the pooled IoU and the shortcut rule; ``summary.json`` lists the checkpoint under
    ``broken_checkpoints`` and the report says so first.

    A result that ``stopped`` early makes the run partial: :data:`STATE_FILE` is written first
    (for ``--resume``) and every file says ``partial``; the checks asked for are listed as
    ``pending_checks``. ``summary.json`` comes last, so a summary that says ``complete`` means
    every file is in place; a complete run removes the state file.
    """
    start = time.perf_counter()
    stopped = next((r.stopped for r in results if r.stopped is not None), None)
    rows = _sorted_rows(plan, results)
    skipped = sorted((s for r in results for s in r.skipped), key=lambda s: s["index"])
    processed = sum(r.processed for r in results)
    missing = [] if stopped else _check_complete(plan, rows, skipped)
    report_images = sorted({tuple(item) for r in results for item in r.report_images})
    tallies = [t for r in results for t in r.tallies]
    sound = [row for row in rows if row.get("run_status") != BROKEN]
    means = class_means(sound, plan, tallies)
    layout = plan.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    if stopped:
        save_state(plan, results, Elapsed(process_seconds, total_seconds, parts))
    write_metrics_csv(layout.file("metrics.csv"), rows, "partial" if stopped else "complete")
    checks_seconds = sum(checks.seconds.values()) if checks is not None else 0.0
    timings = _timings(plan, processed, process_seconds, total_seconds, checks_seconds, start)
    timings["parts"] = parts
    summary = build_summary(plan, settings, results, rows, skipped, means, timings)
    if missing:
        summary["missing"] = missing
    broken = broken_checkpoints(rows)
    if broken:
        summary["broken_checkpoints"] = broken
    if plan.dataset.has_masks:
        summary["shortcut_suspects"] = {**SHORTCUT_RULE, "suspects": shortcut_flags(tallies, plan)}
    _write_checks(plan, settings.checks, checks, summary)
    html_text = render_report(plan, rows, skipped, means, report_images, summary)
    write_atomic(layout.file("report.html"), html_text)
    write_atomic(layout.file("summary.json"), json.dumps(jsonable(summary), indent=2) + "\n")
    if not stopped:
        layout.file(STATE_FILE).unlink(missing_ok=True)
    return AuditOutcome(
        layout.root,
        processed,
        len(skipped),
        len(rows),
        total_seconds - checks_seconds,
        images=len(plan.dataset),
        stopped=stopped,
        skip_reasons=tuple(f"{s['source']}: {s['reason']}" for s in skipped[:3]),
        unit="volume" if plan.volumes else "image",
        notes=(
            tuple(_broken_notes(broken))
            + tuple(describe_checks(summary))
            + tuple(_shortcut_notes(summary))
        ),
    )


def _timings(
    plan: AuditPlan,
    processed: int,
    process_seconds: float,
    total_seconds: float,
    checks_seconds: float,
    start: float,
) -> dict[str, Any]:
    """``summary.json``'s ``timings``; the report's time counts from ``start``."""
    report_seconds = time.perf_counter() - start
    return {
        "load_s": plan.load_seconds,
        "process_s": process_seconds,
        "checks_s": checks_seconds,
        "report_s": report_seconds,
        "total_s": total_seconds + report_seconds,
        "images_per_s": processed / process_seconds if process_seconds > 0 else None,
    }


def _sorted_rows(plan: AuditPlan, results: Sequence[LocalResult]) -> list[dict[str, Any]]:
    """Every process's rows by image, checkpoint, layer and class."""
    return sorted(
        (row for r in results for row in r.rows),
        key=lambda row: (
            row["index"],
            plan.layout.models.index(row["checkpoint"]),
            plan.layout.layers.index(row["layer"]),
            plan.classes.index(row["class"]),
        ),
    )


def _write_checks(
    plan: AuditPlan,
    asked: CheckSettings,
    checks: QualityChecks | None,
    summary: dict[str, Any],
) -> None:
    """The quality checks' entries in ``summary`` and their CSV files; the checks ``asked``
    for are ``pending_checks`` when they did not run (a partial run)."""
    if checks is None:
        if requested(asked):
            summary["pending_checks"] = requested(asked)
        return
    summary.update(checks_summary(plan, asked, checks))
    if asked.sanity_check:
        write_csv(plan.layout.file("sanity.csv"), SANITY_COLUMNS, sanity_csv_rows(checks))
        summary["outputs"]["sanity"] = "sanity.csv"
    if asked.faithfulness:
        rows = faithfulness_csv_rows(checks)
        write_csv(plan.layout.file("faithfulness.csv"), FAITHFULNESS_COLUMNS, rows)
        summary["outputs"]["faithfulness"] = "faithfulness.csv"
    if checks.modalities is not None:
        path = plan.layout.file("modalities.csv")
        write_csv(path, MODALITY_COLUMNS, checks.modalities.csv_rows())
        summary["outputs"]["modalities"] = "modalities.csv"
    if asked.explain_errors and checks.mistakes is not None:
        rows = mistake_csv_rows(checks.mistakes)
        write_csv(plan.layout.file("mistakes.csv"), MISTAKE_COLUMNS, rows)
        summary["outputs"]["mistakes"] = "mistakes.csv"
        summary["outputs"]["mistake_panels"] = "mistakes/"


def broken_checkpoints(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checkpoints whose logits were not finite on some image (their rows' ``run_status``
    is ``broken``): label, how many images, the first few of them, and why."""
    images: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        if row.get("run_status") == BROKEN and row["image"] not in images[row["checkpoint"]]:
            images[row["checkpoint"]].append(row["image"])
    return [
        {
            "checkpoint": label,
            "images": len(names),
            "first_images": names[:5],
            "reason": "non-finite logits (NaN or inf): weights that overflow float32",
        }
        for label, names in images.items()
    ]


def _broken_notes(broken: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"Broken checkpoint {b['checkpoint']!r}: its logits are not finite (NaN or inf) on "
        f"{b['images']} image(s); their rows are marked broken in metrics.csv and left out of "
        "the means."
        for b in broken
    ]


def _check_complete(
    plan: AuditPlan, rows: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]]
) -> list[int]:
    """Dataset indices no process audited or skipped (none, unless a sampler misbehaved)."""
    seen = {row["index"] for row in rows} | {s["index"] for s in skipped}
    missing = sorted(set(range(len(plan.dataset))) - seen)
    if missing:
        warnings.warn(
            f"{len(missing)} image(s) were neither audited nor skipped (indices {missing[:10]}): "
            "the distributed sampler did not assign them as expected. They are listed as "
            "'missing' in summary.json; please report this.",
            RuntimeWarning,
            stacklevel=2,
        )
    return missing


def write_metrics_csv(path: Path, rows: Sequence[dict[str, Any]], status: str = "complete") -> None:
    """One row per image × class × layer × checkpoint, written atomically; undefined values are
    empty cells, ``run_status`` is ``status`` on every row but the broken ones (see
    :func:`write_csv`)."""
    write_csv(
        path,
        CSV_COLUMNS,
        [{**row, "run_status": row.get("run_status", status)} for row in rows],
    )


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """A CSV file of ``columns``, written atomically; NaN values are empty cells.

    Text cells that a spreadsheet would run as a formula (starting with ``= + - @``, a tab or a
    carriage return) get a leading ``'``, as OWASP advises; numbers are written as numbers.
    """
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(key, value) for key, value in row.items()})
    write_atomic(path, buffer.getvalue())


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_STARTS) else value
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return ""
    if key in ("gt_present", "pointing_game"):
        return int(value)
    return format(value, ".7g")


_MEAN_NAMES = (
    "energy_inside",
    "pointing_game",
    "iou",
    "raw_max",
    "pred_area",
    "gt_area",
    "similarity_to_first",
)


def class_means(
    rows: Sequence[dict[str, Any]], plan: AuditPlan, tallies: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Means over images per checkpoint × layer × class (NaN cells left out; NaN if none).

    ``pointing_game``'s mean is the pointing-game score (the share of the images holding the
    class where the CAM's peak lies on it); ``images_with_class`` counts those images.
    ``chance`` is the class's mean area share over those images, the energy inside a map with
    no information has; ``below_chance`` marks a mean energy inside below it. ``dataset_iou``
    is the IoU pooled over the images (intersections over unions summed over the data set, as
    torchmetrics' ``JaccardIndex`` computes it in a validation) from the run's pixel counts
    (``tallies``, :mod:`~segcam_lightning.audit.tallies`; NaN without them), where ``iou``
    averages each image's IoU.
    """
    pooled = {
        label: tally.pooled_iou(tally.sound(tallies, label), len(plan.classes)).tolist()
        for label in plan.layout.models
    }
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["checkpoint"], row["layer"], row["class"])].append(row)
    means = []
    for label in plan.layout.models:
        for layer in plan.layout.layers:
            for position, k in enumerate(plan.classes):
                group = groups.get((label, layer, k), [])
                entry: dict[str, Any] = {
                    "checkpoint": label,
                    "layer": layer,
                    "class": k,
                    "class_name": plan.class_names[k],
                    "images": len(group),
                    "images_with_class": sum(r["gt_present"] == 1.0 for r in group),
                }
                for name in _MEAN_NAMES:
                    values = [r[name] for r in group if not math.isnan(r[name])]
                    entry[name] = sum(values) / len(values) if values else float("nan")
                areas = [r["gt_area"] for r in group if r["gt_present"] == 1.0]
                entry["chance"] = sum(areas) / len(areas) if areas else float("nan")
                entry["below_chance"] = bool(entry["energy_inside"] < entry["chance"])
                entry["dataset_iou"] = pooled[label][position]
                means.append(entry)
    return means


#: The shortcut rule's thresholds: the defaults of
#: :func:`~segcam_lightning.quality.functional.shortcut_suspects` (the callback's too).
SHORTCUT_RULE = {
    name: parameter.default
    for name, parameter in inspect.signature(shortcut_suspects).parameters.items()
    if name in ("energy_threshold", "iou_threshold", "reference_threshold", "min_images")
}


def shortcut_flags(tallies: Sequence[dict[str, Any]], plan: AuditPlan) -> list[dict[str, Any]]:
    """Classes the model segments well whose maps lie mostly outside them, per checkpoint and
    layer: :func:`~segcam_lightning.quality.functional.shortcut_suspects` on the run's pixel
    counts and energies (``tallies``, :mod:`~segcam_lightning.audit.tallies`;
    :data:`SHORTCUT_RULE`).

    Only images where the class is both in the ground truth and predicted count; the IoU is
    pooled over the images (intersections over unions, as the callback computes it on its
    probe). Images where a checkpoint's logits were not finite are left out.
    """
    flags = []
    for label in plan.layout.models:
        entries = tally.sound(tallies, label)
        if not entries:
            continue
        for position, layer in enumerate(plan.layout.layers):
            energy, counted, iou, area = tally.shortcut_inputs(entries, position)
            for s in shortcut_suspects(energy, counted, iou, area, **SHORTCUT_RULE):
                k, ref = plan.classes[s.class_index], plan.classes[s.reference_index]
                flags.append(
                    {
                        "checkpoint": label,
                        "layer": layer,
                        "class": k,
                        "class_name": plan.class_names[k],
                        "energy_inside": s.energy_inside,
                        "iou": s.iou,
                        "num_images": s.num_images,
                        "reference_class": ref,
                        "reference_class_name": plan.class_names[ref],
                        "reference_energy": s.reference_energy,
                    }
                )
    return flags


def _shortcut_notes(summary: dict[str, Any]) -> list[str]:
    suspects = summary.get("shortcut_suspects", {}).get("suspects", [])
    return [
        f"Possible shortcut: {s['class_name']!r} at {s['layer']} ({s['checkpoint']}): "
        f"{s['energy_inside']:.2f} of its maps inside its ground truth at IoU {s['iou']:.2f}; "
        "see report.html."
        for s in suspects
    ]


def build_summary(
    plan: AuditPlan,
    settings: AuditSettings,
    results: Sequence[LocalResult],
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    means: Sequence[dict[str, Any]],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``summary.json``; its ``settings`` are the run's by option name
    (:meth:`AuditSettings.options`) and what the plan resolved."""
    shown = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in settings.options().items()
    }
    shown["checkpoints"] = [str(p) for p in settings.checkpoints]
    shown.update(
        image_size=list(plan.size),
        volumes=plan.volumes,
        output_kind=plan.readout.kind,
        classes=plan.classes,
        class_names=plan.class_names,
        layers=list(plan.layout.layers),
        device=str(plan.device),
        render_threads=plan.render_threads,
        has_ground_truth=plan.dataset.has_masks,
    )
    stopped = next((r.stopped for r in results if r.stopped is not None), None)
    processed = sum(r.processed for r in results)
    status: dict[str, Any] = {"status": "partial" if stopped else "complete"}
    if stopped:
        status["partial_reason"] = stopped.reason
        status["remaining"] = len(plan.dataset) - processed - len(skipped)
        status["resume"] = f"rerun the same command with --resume to finish it ({STATE_FILE})"
    return {
        **status,
        "counts": {
            "images": len(plan.dataset),
            "processed": processed,
            "skipped": len(skipped),
            "checkpoints": len(plan.models),
            "layers": len(plan.layout.layers),
            "classes": len(plan.classes),
            "rows": len(rows),
            "files_written": sum(r.files for r in results),
        },
        "checkpoints": [
            {
                "label": m.label,
                "path": str(m.loaded.path),
                "kind": m.loaded.layout,
                "description": m.loaded.describe(),
                "num_classes": m.loaded.num_classes,
                "base_width": m.loaded.base_width,
                "code": m.loaded.code,
                "channel_order": "bgr" if m.bgr else "rgb",
                "input": m.input_description,
                "image_mean": list(m.mean) if m.mean is not None else None,
                "image_std": list(m.std) if m.std is not None else None,
                "epoch": m.loaded.epoch,
                "trusted": m.loaded.trusted,
            }
            for m in plan.models
        ],
        "means": list(means),
        "skipped": list(skipped),
        "ranks": [
            {"rank": r.rank, "processed": r.processed, "files": r.files, "seconds": r.seconds}
            for r in results
        ],
        "settings": shown,
        "notes": list(plan.notes),
        "timings": timings,
        "outputs": _outputs(plan),
    }


def _outputs(plan: AuditPlan) -> dict[str, str]:
    outputs = {
        "panels": plan.layout.panel_pattern(),
        "report": "report.html",
        "metrics": "metrics.csv",
    }
    if plan.volumes:
        several = len(plan.layout.models) > 1
        outputs["cams"] = ("<checkpoint>/" if several else "") + "cams/<name>.npy"
        if nifti_bytes(np.zeros((1, 1, 1, 1, 1), np.float32)) is not None:
            outputs["cams_nifti"] = ("<checkpoint>/" if several else "") + "cams/<name>.nii.gz"
    return outputs
