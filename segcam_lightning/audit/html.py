"""``report.html``: one self-contained page (inline CSS, no scripts, every text escaped, images
referenced relatively under ``report_files/``)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segcam_lightning.audit.settings import TIP_NAMES, jsonable
from segcam_lightning.render import VIEWS

if TYPE_CHECKING:
    from segcam_lightning.audit.paths import OutputLayout
    from segcam_lightning.audit.plan import AuditPlan

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
div.views{display:inline-flex;flex-direction:column;gap:2px;vertical-align:top;margin:0 1px}
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
        f"<p class='meta'>{counts['processed']} of {counts['images']} "
        f"{'volume' if plan.volumes else 'image'}(s) audited"
        f"{skipped_note} · {_e(plan.settings.method)} at {_e(', '.join(plan.layout.layers))} · "
        f"target {_e(plan.settings.target)} · {_e(_kind_text(plan))} · "
        f"data: {_e(str(plan.settings.data))} · "
        f"{'x'.join(map(str, plan.size))}{' volumes' if plan.volumes else ''}</p>",
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
    ("pointing_game", "pointing game", "share"),
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
    what = "volume" if plan.volumes else "image"
    views = (
        " Each volume is shown in axial, coronal and sagittal slices: the image, ground truth "
        "and prediction through its centre, each class's maps through that map's peak (the "
        "slices its panel shows)."
        if plan.volumes
        else ""
    )
    intro = (
        f"<h2>Images</h2><p class='meta'>The first {shown} of {total} audited {what}(s) (dataset "
        f"indices below {plan.settings.report_images}); every {what}'s panels are in "
        f"{_e(plan.layout.panel_pattern())}.{views} Captions: E = share of CAM energy inside the "
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
    views: tuple[str | None, ...] = VIEWS if plan.volumes else (None,)
    head = "<tr><th>image</th>" + ("<th>ground truth</th>" if truth else "")
    head += ("<th class='l'>checkpoint</th>" if several else "") + "<th>prediction</th>"
    head += "".join(f"<th>{k}: {_e(plan.class_names[k])}</th>" for k in plan.classes) + "</tr>"
    span = f" rowspan='{len(plan.models)}'"
    first = f"<td{span}>{_views(layout, views, lambda v: layout.input_tile(name, v))}</td>"
    if truth:
        first += f"<td{span}>{_views(layout, views, lambda v: layout.truth_tile(name, v))}</td>"
    trs = []
    for m, model in enumerate(plan.models):
        cells = [first] if m == 0 else []
        if several:
            cells.append(f"<td class='label'>{_e(model.label)}</td>")
        predicted = _views(layout, views, lambda v, m=m: layout.prediction_tile(name, m, v))
        cells.append(f"<td>{predicted}</td>")
        for k in plan.classes:
            stacks, row = [], None
            for layer, layer_name in enumerate(layout.layers):
                row = lookup[(index, model.label, layer_name, k)]
                caption = _caption(layer_name, row, len(layout.layers) > 1)
                stacks.append(
                    _views(
                        layout,
                        views,
                        lambda v, m=m, layer=layer, k=k: layout.overlay_tile(name, m, layer, k, v),
                        caption,
                    )
                )
            cells.append(f"<td class='cls'>{''.join(stacks)}{_class_line(row, truth)}</td>")
        trs.append("<tr>" + "".join(cells) + "</tr>")
    source = plan.dataset.sources[index]
    title = f"<h3>{_e(name)} <small>(#{index} · {_e(source)})</small></h3>"
    return f"{title}<table class='img'>{head}{''.join(trs)}</table>"


def _views(
    layout: OutputLayout,
    views: Sequence[str | None],
    tile: Callable[[str | None], Path],
    caption: str = "",
) -> str:
    """One figure (an image), or a column of one per view (a volume) named by their view;
    ``caption`` under the last."""
    if views == (None,):
        return _figure(layout.relative(tile(None)), caption)
    figures = [
        _figure(
            layout.relative(tile(view)),
            _e(view) + (f"<br>{caption}" if caption and i == len(views) - 1 else ""),
        )
        for i, view in enumerate(views)
    ]
    return f"<div class='views'>{''.join(figures)}</div>"


def _figure(src: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure><img class='t' src='{_e(src)}' alt='' loading='lazy'>{cap}</figure>"


def _caption(layer: str, row: dict[str, Any], with_layer: bool) -> str:
    first = [f"<b>{_e(TIP_NAMES.get(layer, layer))}</b>"] if with_layer else []
    if not math.isnan(row["energy_inside"]):
        hit = row["pointing_game"] == 1.0
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
        f"<tr><th class='l'>{_e(key)}</th><td class='l'>{_e(json.dumps(jsonable(value)))}</td></tr>"
        for key, value in summary["settings"].items()
    )
    timings = summary["timings"]
    rate = timings["images_per_s"]
    return (
        f"<h2>Settings</h2><table>{rows}</table><p class='meta'>Checkpoint loading "
        f"{timings['load_s']:.1f} s · audit {timings['process_s']:.1f} s"
        f"{f' ({rate:.1f} images/s)' if rate else ''} · reports {timings['report_s']:.1f} s</p>"
    )
