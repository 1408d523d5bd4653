"""The end of a run: ``metrics.csv``, ``summary.json`` and ``report.html``."""

from __future__ import annotations

import csv
import html
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

from segcam_lightning.audit.paths import OutputLayout, write_atomic
from segcam_lightning.audit.resume import save_state
from segcam_lightning.audit.settings import CSV_COLUMNS, STATE_FILE, TIP_NAMES, Stop
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
    """

    out: Path
    processed: int
    skipped: int
    rows: int
    seconds: float
    images: int = 0
    stopped: Stop | None = None
    skip_reasons: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """``"complete"``, or ``"partial"`` for a run that stopped early."""
        return "partial" if self.stopped else "complete"

    def describe(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        partial = " (partial: marked so in every file)" if self.stopped else ""
        return (
            f"Audited {self.processed} image(s) ({self.skipped} skipped) in {self.seconds:.1f} s "
            f"({rate:.1f} images/s); {self.rows} metric rows{partial}. Open "
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
    write_atomic(layout.file("summary.json"), json.dumps(_jsonable(summary), indent=2) + "\n")
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
    if key in ("gt_present", "pointing_hit"):
        return int(value)
    return format(value, ".7g")


_MEAN_NAMES = (
    "energy_inside",
    "pointing_hit",
    "iou",
    "raw_max",
    "pred_area",
    "gt_area",
    "similarity_to_first",
)


def class_means(rows: Sequence[dict[str, Any]], plan: AuditPlan) -> list[dict[str, Any]]:
    """Means over images per checkpoint × layer × class (NaN cells left out; NaN if none).

    ``pointing_hit``'s mean is the pointing-game hit rate; ``images_with_class`` counts the
    images whose ground truth holds the class.
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
        "outputs": {
            "panels": _panel_pattern(plan.layout),
            "report": "report.html",
            "metrics": "metrics.csv",
        },
    }


def _panel_pattern(layout: OutputLayout) -> str:
    parts = ["<checkpoint>"] if len(layout.models) > 1 else []
    parts.append("gradcam")
    if len(layout.layers) > 1:
        parts.append("<layer>")
    return "/".join([*parts, "<class_idx>", "<name>.jpg"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- report.html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px 24px;color:#222}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{margin:18px 0 4px;font-size:15px}p.meta{color:#555;margin:2px 0 8px}
table{border-collapse:collapse;margin:4px 0 14px}
th,td{border:1px solid #d4d4d4;padding:2px 7px;font-size:13px;text-align:right}
th{background:#f4f4f4}th.l,td.l{text-align:left}td.c{text-align:left;font-weight:600}
table.img{margin-bottom:4px}table.img th,table.img td{border:none;text-align:center;
vertical-align:top;padding:1px 3px}table.img td.cls{white-space:nowrap;padding:1px 7px}
table.img td.label{text-align:left;font-size:12px;max-width:120px;word-break:break-all}
figure{display:inline-block;margin:0 1px;vertical-align:top;width:var(--thumb)}
figcaption,div.cl{font-size:11px;color:#444;line-height:1.3}div.cl{white-space:nowrap}
img.t{width:var(--thumb);height:var(--thumb);image-rendering:pixelated;display:block;
border:1px solid #ccc}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-1px;
margin:0 3px 0 10px}
.good{color:#1a7f37}.bad{color:#b3261e}a{color:#0b57d0}
p.partial{background:#fff4d6;border:1px solid #e0b000;padding:8px 12px;margin:8px 0 12px}
"""


def render_report(
    plan: AuditPlan,
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    means: Sequence[dict[str, Any]],
    report_images: Sequence[tuple[int, str]],
    summary: dict[str, Any],
) -> str:
    """``report.html``: inline CSS, no scripts, every text escaped, images referenced relatively.

    Sections: header and class legend, checkpoints, metrics per class, attention drift (several
    checkpoints), images, skipped files, settings.
    """
    counts = summary["counts"]
    skipped_note = (
        f", <a href='#skipped'>{counts['skipped']} skipped</a>" if counts["skipped"] else ""
    )
    tiles = len(plan.layout.layers) * len(plan.classes)
    thumb = 128 if tiles <= 8 else max(64, 1024 // tiles)
    body = [
        "<h1>CAM audit</h1>",
        _partial_banner(summary),
        f"<p class='meta'>{counts['processed']} of {counts['images']} image(s) audited"
        f"{skipped_note} · {_e(plan.settings.method)} at {_e(', '.join(plan.layout.layers))} · "
        f"target {_e(plan.settings.target)} · {_e(_kind_text(plan))} · "
        f"data: {_e(str(plan.settings.data))} · "
        f"{plan.size[0]}x{plan.size[1]}</p>",
        _legend(plan),
        _checkpoint_table(plan),
        _class_table(plan, means),
    ]
    if len(plan.models) > 1:
        body.append(_drift_table(plan, means))
    body.append(_image_sections(plan, rows, report_images, summary))
    body.append(_skipped_section(skipped))
    body.append(_settings_table(summary))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>CAM audit: {_e(', '.join(m.label for m in plan.models))}</title>"
        f"<style>:root{{--thumb:{thumb}px}}{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _partial_banner(summary: dict[str, Any]) -> str:
    if summary["status"] != "partial":
        return ""
    counts = summary["counts"]
    done = counts["processed"] + counts["skipped"]
    return (
        f"<p class='partial'><b>Partial audit</b>: {_e(summary['partial_reason'])}; "
        f"{done} of {counts['images']} image(s) finished, {summary['remaining']} not yet "
        "audited. Every table below covers the finished images only. Rerun the same command "
        "with <code>--resume</code> to finish it.</p>"
    )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float, kind: str = "share") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "sci":
        return f"{value:.2e}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.3f}"


def _kind_text(plan: AuditPlan) -> str:
    """How the outputs are read, e.g. ``"binary (sigmoid > 0.5)"``."""
    if plan.output_kind == "multiclass":
        return "multiclass (softmax)"
    return f"{plan.output_kind} (sigmoid > {plan.settings.threshold:g})"


def _legend(plan: AuditPlan) -> str:
    items = []
    for k, name in enumerate(plan.label_names or plan.class_names):
        b, g, r = plan.colormap[k]
        items.append(f"<span class='sw' style='background:rgb({r},{g},{b})'></span>{k}: {_e(name)}")
    title = "Mask labels" if plan.output_kind == "binary" else "Classes"
    return f"<p>{title}:" + "".join(items) + "</p>"


def _checkpoint_table(plan: AuditPlan) -> str:
    head = (
        "<tr><th class='l'>checkpoint</th><th class='l'>file</th><th class='l'>what</th>"
        "<th class='l'>fed</th></tr>"
    )
    body = "".join(
        f"<tr><td class='l'>{_e(m.label)}</td><td class='l'>{_e(m.loaded.path)}</td>"
        f"<td class='l'>{_e(m.loaded.describe())}</td>"
        f"<td class='l'>{m.input_description}</td></tr>"
        for m in plan.models
    )
    return f"<h2>Checkpoints</h2><table>{head}{body}</table>"


def _skipped_section(skipped: Sequence[dict[str, Any]]) -> str:
    if not skipped:
        return "<h2 id='skipped'>Skipped files</h2><p>None: every image was read.</p>"
    head = "<tr><th>#</th><th class='l'>file</th><th class='l'>reason</th></tr>"
    body = "".join(
        f"<tr><td>{s['index']}</td><td class='l'>{_e(s['source'])}</td>"
        f"<td class='l bad'>{_e(s['reason'])}</td></tr>"
        for s in skipped
    )
    return (
        f"<h2 id='skipped'>Skipped files ({len(skipped)})</h2><p class='meta'>Unreadable images "
        f"or masks; everything else was audited.</p><table>{head}{body}</table>"
    )


_MEAN_COLUMNS = (
    ("energy_inside", "energy inside GT", "share"),
    ("pointing_hit", "pointing game", "share"),
    ("iou", "IoU (prediction)", "share"),
    ("raw_max", "raw CAM max", "sci"),
    ("pred_area", "predicted area", "pct"),
    ("gt_area", "GT area", "pct"),
)


def _class_table(plan: AuditPlan, means: Sequence[dict[str, Any]]) -> str:
    columns = list(_MEAN_COLUMNS)
    if len(plan.models) > 1:
        columns.append(("similarity_to_first", f"similarity to {plan.models[0].label}", "share"))
    head = (
        "<tr><th class='l'>class</th><th class='l'>checkpoint</th><th class='l'>layer</th>"
        "<th>images with class</th>"
        + "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
        + "</tr>"
    )
    body = []
    for k in plan.classes:
        entries = [m for m in means if m["class"] == k]
        for i, m in enumerate(entries):
            cls = (
                f"<td class='c' rowspan='{len(entries)}'>{k}: {_e(plan.class_names[k])}</td>"
                if i == 0
                else ""
            )
            body.append(
                f"<tr>{cls}<td class='l'>{_e(m['checkpoint'])}</td>"
                f"<td class='l'>{_e(m['layer'])}</td><td>{m['images_with_class']}</td>"
                + "".join(f"<td>{_fmt(m[name], kind)}</td>" for name, _, kind in columns)
                + "</tr>"
            )
    return (
        "<h2>Metrics per class</h2><p class='meta'>Means over the audited images; energy inside "
        "the ground truth (GT) and the pointing game over the images whose GT holds the class; "
        "IoU of the predicted region over the images where prediction or GT holds it.</p>"
        f"<table>{head}{''.join(body)}</table>"
    )


def _drift_table(plan: AuditPlan, means: Sequence[dict[str, Any]]) -> str:
    labels = [m.label for m in plan.models]
    lookup = {(m["checkpoint"], m["layer"], m["class"]): m for m in means}
    has_truth = plan.dataset.has_masks
    metric, title = ("energy_inside", "energy inside GT") if has_truth else ("raw_max", "raw max")
    kind = "share" if has_truth else "sci"
    head = (
        "<tr><th class='l'>class</th><th class='l'>layer</th>"
        + "".join(f"<th>{_e(label)}</th>" for label in labels)
        + f"<th>change {_e(labels[0])} → {_e(labels[-1])}</th>"
        + "".join(f"<th>similarity {_e(label)}</th>" for label in labels[1:])
        + "</tr>"
    )
    body = []
    for k in plan.classes:
        for layer in plan.layout.layers:
            cells = [lookup[(label, layer, k)] for label in labels]
            change = cells[-1][metric] - cells[0][metric]
            tone = "" if math.isnan(change) else ("good" if change >= 0 else "bad")
            body.append(
                f"<tr><td class='l'>{k}: {_e(plan.class_names[k])}</td>"
                f"<td class='l'>{_e(layer)}</td>"
                + "".join(f"<td>{_fmt(c[metric], kind)}</td>" for c in cells)
                + f"<td class='{tone}'>{_signed(change, kind)}</td>"
                + "".join(f"<td>{_fmt(c['similarity_to_first'])}</td>" for c in cells[1:])
                + "</tr>"
            )
    return (
        f"<h2>Attention drift</h2><p class='meta'>Per class and layer: mean {title} per "
        f"checkpoint, its change from the first to the last, and the mean cosine similarity of "
        f"each checkpoint's maps with {_e(labels[0])}'s on the same images.</p>"
        f"<table>{head}{''.join(body)}</table>"
    )


def _signed(value: float, kind: str) -> str:
    if math.isnan(value):
        return "—"
    return ("+" if value >= 0 else "") + _fmt(value, kind)


def _image_sections(
    plan: AuditPlan,
    rows: Sequence[dict[str, Any]],
    report_images: Sequence[tuple[int, str]],
    summary: dict[str, Any],
) -> str:
    shown = len(report_images)
    total = summary["counts"]["processed"]
    intro = (
        f"<h2>Images</h2><p class='meta'>The first {shown} of {total} audited image(s) (dataset "
        f"indices below {plan.settings.report_images}); every image's panels are in "
        f"{_e(_panel_pattern(plan.layout))}. Captions: E = share of CAM energy inside the "
        "class's ground truth, ✓/✗ = pointing game, max = raw CAM maximum.</p>"
    )
    lookup = {(row["index"], row["checkpoint"], row["layer"], row["class"]): row for row in rows}
    return intro + "".join(
        _image_section(plan, index, name, lookup) for index, name in report_images
    )


def _image_section(
    plan: AuditPlan, index: int, name: str, lookup: dict[tuple[Any, ...], dict[str, Any]]
) -> str:
    layout, truth, several = plan.layout, plan.dataset.has_masks, len(plan.models) > 1
    head = "<tr><th>image</th>" + ("<th>ground truth</th>" if truth else "")
    head += ("<th class='l'>checkpoint</th>" if several else "") + "<th>prediction</th>"
    head += "".join(f"<th>{k}: {_e(plan.class_names[k])}</th>" for k in plan.classes) + "</tr>"
    span = f" rowspan='{len(plan.models)}'"
    first = f"<td{span}>{_figure(layout.relative(layout.input_tile(name)))}</td>"
    if truth:
        first += f"<td{span}>{_figure(layout.relative(layout.truth_tile(name)))}</td>"
    trs = []
    for m, model in enumerate(plan.models):
        cells = [first] if m == 0 else []
        if several:
            cells.append(f"<td class='label'>{_e(model.label)}</td>")
        cells.append(f"<td>{_figure(layout.relative(layout.prediction_tile(name, m)))}</td>")
        for k in plan.classes:
            figures, row = [], None
            for layer, layer_name in enumerate(layout.layers):
                row = lookup[(index, model.label, layer_name, k)]
                src = layout.relative(layout.overlay_tile(name, m, layer, k))
                figures.append(_figure(src, _caption(layer_name, row, len(layout.layers) > 1)))
            cells.append(f"<td class='cls'>{''.join(figures)}{_class_line(row, truth)}</td>")
        trs.append("<tr>" + "".join(cells) + "</tr>")
    source = plan.dataset.sources[index]
    title = f"<h3>{_e(name)} <small>(#{index} · {_e(source)})</small></h3>"
    return f"{title}<table class='img'>{head}{''.join(trs)}</table>"


def _figure(src: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure><img class='t' src='{_e(src)}' alt='' loading='lazy'>{cap}</figure>"


def _caption(layer: str, row: dict[str, Any], with_layer: bool) -> str:
    first = [f"<b>{_e(TIP_NAMES.get(layer, layer))}</b>"] if with_layer else []
    if not math.isnan(row["energy_inside"]):
        hit = row["pointing_hit"] == 1.0
        mark = f"<span class='{'good' if hit else 'bad'}'>{'✓' if hit else '✗'}</span>"
        first.append(f"E {row['energy_inside']:.2f} {mark}")
    return " ".join(first) + f"<br>max {row['raw_max']:.1e}"


def _class_line(row: dict[str, Any] | None, truth: bool) -> str:
    if row is None:
        return ""
    parts = [f"pred {_fmt(row['pred_area'], 'pct')}"]
    if truth:
        parts += [f"GT {_fmt(row['gt_area'], 'pct')}", f"IoU {_fmt(row['iou'])}"]
    return f"<div class='cl'>{' · '.join(parts)}</div>"


def _settings_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th class='l'>{_e(key)}</th>"
        f"<td class='l'>{_e(json.dumps(_jsonable(value)))}</td></tr>"
        for key, value in summary["settings"].items()
    )
    timings = summary["timings"]
    rate = timings["images_per_s"]
    return (
        f"<h2>Settings</h2><table>{rows}</table><p class='meta'>Checkpoint loading "
        f"{timings['load_s']:.1f} s · audit {timings['process_s']:.1f} s"
        f"{f' ({rate:.1f} images/s)' if rate else ''} · reports {timings['report_s']:.1f} s</p>"
    )
