"""The end of a run: ``metrics.csv`` and ``summary.json``, and ``report.html`` by
:mod:`~segcam_lightning.audit.html`."""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segcam_lightning.audit.html import render_report
from segcam_lightning.audit.paths import write_atomic
from segcam_lightning.audit.resume import save_state
from segcam_lightning.audit.settings import CSV_COLUMNS, STATE_FILE, Stop, jsonable
from segcam_lightning.audit.writer import LocalResult

if TYPE_CHECKING:
    from segcam_lightning.audit.plan import AuditPlan


@dataclass
class AuditOutcome:
    """What a run reports (global rank 0 only).

    Attributes:
        stopped: why the run ended before its last image; ``None`` for a complete run.
        images: the data set's size.
        skip_reasons: ``"<source>: <reason>"`` of the first skipped images.
        unit: what an item is: ``"image"`` or ``"volume"``.
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
        )


def finish(
    plan: AuditPlan, results: Sequence[LocalResult], process_seconds: float, total_seconds: float
) -> AuditOutcome:
    """Merge the processes' results and write ``metrics.csv``, ``report.html`` and
    ``summary.json``, each atomically.

    A result that ``stopped`` early makes the run partial: :data:`STATE_FILE` is written first
    (for ``--resume``) and every file says ``partial``. ``summary.json`` comes last, so a summary
    that says ``complete`` means every file is in place; a complete run removes the state file.
    """
    start = time.perf_counter()
    stopped = next((r.stopped for r in results if r.stopped is not None), None)
    rows = sorted(
        (row for r in results for row in r.rows),
        key=lambda row: (
            row["index"],
            plan.layout.models.index(row["checkpoint"]),
            plan.layout.layers.index(row["layer"]),
            plan.classes.index(row["class"]),
        ),
    )
    skipped = sorted((s for r in results for s in r.skipped), key=lambda s: s["index"])
    processed = sum(r.processed for r in results)
    missing = [] if stopped else _check_complete(plan, rows, skipped)
    report_images = sorted({tuple(item) for r in results for item in r.report_images})
    means = class_means(rows, plan)
    layout = plan.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    status = "partial" if stopped else "complete"
    if stopped:
        save_state(plan, results, process_seconds)
    write_metrics_csv(layout.file("metrics.csv"), rows, status)
    report_seconds = time.perf_counter() - start
    timings = {
        "load_s": plan.load_seconds,
        "process_s": process_seconds,
        "report_s": report_seconds,
        "total_s": total_seconds + report_seconds,
        "images_per_s": processed / process_seconds if process_seconds > 0 else None,
    }
    summary = build_summary(plan, results, rows, skipped, means, timings)
    if missing:
        summary["missing"] = missing
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
        total_seconds,
        images=len(plan.dataset),
        stopped=stopped,
        skip_reasons=tuple(f"{s['source']}: {s['reason']}" for s in skipped[:3]),
        unit="volume" if plan.volumes else "image",
    )


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
    empty cells, ``run_status`` is ``status`` on every row.

    Text cells that a spreadsheet would run as a formula (starting with ``= + - @``, a tab or a
    carriage return) get a leading ``'``, as OWASP advises; numbers are written as numbers.
    """
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        cells = {key: _csv_value(key, value) for key, value in row.items()}
        writer.writerow({**cells, "run_status": status})
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


def class_means(rows: Sequence[dict[str, Any]], plan: AuditPlan) -> list[dict[str, Any]]:
    """Means over images per checkpoint × layer × class (NaN cells left out; NaN if none).

    ``pointing_game``'s mean is the pointing-game score (the share of the images holding the
    class where the CAM's peak lies on it); ``images_with_class`` counts those images.
    """
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["checkpoint"], row["layer"], row["class"])].append(row)
    means = []
    for label in plan.layout.models:
        for layer in plan.layout.layers:
            for k in plan.classes:
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
                means.append(entry)
    return means


def build_summary(
    plan: AuditPlan,
    results: Sequence[LocalResult],
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    means: Sequence[dict[str, Any]],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``summary.json``."""
    settings = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(plan.settings).items()
    }
    settings["checkpoints"] = [str(p) for p in plan.settings.checkpoints]
    settings.update(
        image_size=list(plan.size),
        volumes=plan.volumes,
        output_kind=plan.output_kind,
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
                "kind": m.loaded.kind,
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
        "settings": settings,
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
    return outputs
