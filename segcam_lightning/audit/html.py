"""``report.html``: one self-contained page (inline CSS, no scripts, every text escaped, images
referenced relatively under ``report_files/``)."""

from __future__ import annotations

import html
import json
import math
import urllib.parse
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
figcaption{overflow-wrap:anywhere}figcaption b.layer{display:flex;justify-content:center;
white-space:nowrap}figcaption b.layer span{overflow:hidden;text-overflow:ellipsis;min-width:0}
img.t{width:var(--thumb);height:var(--thumb);image-rendering:pixelated;display:block;
border:1px solid #ccc}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-1px;
margin:0 3px 0 10px}
.good{color:#1a7f37}.bad{color:#b3261e}a{color:#0b57d0}
p.partial{background:#fff4d6;border:1px solid #e0b000;padding:8px 12px;margin:8px 0 12px}
div.views{display:inline-flex;flex-direction:column;gap:2px;vertical-align:top;margin:0 1px}
span.bar{display:inline-block;height:9px;background:#4a7bd0;vertical-align:0}
span.bar.o{background:#c98a2b}td.bars{text-align:left;white-space:nowrap}
img.p{height:var(--thumb);max-width:100%;image-rendering:pixelated;border:1px solid #ccc;
display:block}figure.p{width:auto;margin:2px 10px 8px 0}h4{margin:12px 0 4px;font-size:14px}
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

    Sections: header and class legend, checkpoints, metrics per class (energy inside below
    chance marked ``*``, possible shortcuts ``†``) and the shortcut suspects, attention drift
    (several checkpoints), the randomisation test (``--sanity-check``), deletion and insertion
    (``--faithfulness``), images, skipped files, settings.
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
        _broken_banner(summary),
        f"<p class='meta'>{counts['processed']} of {counts['images']} "
        f"{'volume' if plan.volumes else 'image'}(s) audited"
        f"{skipped_note} · {_e(plan.explanation.method)} at {_e(', '.join(plan.layout.layers))} · "
        f"target {_e(plan.explanation.target)} · {_e(_kind_text(plan))} · "
        f"data: {_e(str(plan.data))} · "
        f"{'x'.join(map(str, plan.size))}{' volumes' if plan.volumes else ''}</p>",
        _notes(plan),
        _legend(plan),
        _checkpoint_table(plan),
        _class_table(plan, means, summary),
        _shortcut_section(summary),
        _objects_alone_section(plan, summary),
    ]
    if len(plan.models) > 1:
        body.append(_drift_table(plan, means))
    body.append(_sanity_section(plan, summary))
    body.append(_faithfulness_section(plan, summary))
    body.append(_modalities_section(plan, summary))
    body.append(_mistakes_section(plan, summary))
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


def _broken_banner(summary: dict[str, Any]) -> str:
    """One line per checkpoint whose logits were not finite (``--keep-going``)."""
    return "".join(
        f"<p class='partial'><b>Broken checkpoint {_e(b['checkpoint'])}</b>: its logits are not "
        f"finite (NaN or inf) on {b['images']} image(s), e.g. "
        f"{_e(', '.join(b['first_images']))}: its weights overflow. Those rows are marked "
        "<code>broken</code> in metrics.csv and left out of every table.</p>"
        for b in summary.get("broken_checkpoints", [])
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
    if plan.readout.kind == "multiclass":
        return "multiclass (softmax)"
    return f"{plan.readout.kind} (sigmoid > {plan.readout.threshold:g})"


def _notes(plan: AuditPlan) -> str:
    """What the run chose or assumed by itself (the default layer, an assumed setting)."""
    if not plan.notes:
        return ""
    items = "".join(f"<li>{_e(note)}</li>" for note in plan.notes)
    return f"<p>Chosen or assumed by the audit:</p><ul class='notes'>{items}</ul>"


def _legend(plan: AuditPlan) -> str:
    items = []
    for k, name in enumerate(plan.label_names or plan.class_names):
        b, g, r = plan.colormap[k]
        items.append(f"<span class='sw' style='background:rgb({r},{g},{b})'></span>{k}: {_e(name)}")
    title = "Mask labels" if plan.readout.kind == "binary" else "Classes"
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
    ("dataset_iou", "IoU over the data", "share"),
    ("iou", "IoU per image (mean)", "share"),
    ("raw_max", "raw CAM max", "sci"),
    ("pred_area", "predicted area", "pct"),
    ("gt_area", "GT area", "pct"),
)


def _class_table(plan: AuditPlan, means: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    columns = list(_MEAN_COLUMNS)
    truth = plan.dataset.has_masks
    if truth:
        columns.insert(1, ("chance", "chance", "share"))
    if len(plan.models) > 1:
        columns.append(("similarity_to_first", f"similarity to {plan.models[0].label}", "share"))
    head = (
        "<tr><th class='l'>class</th><th class='l'>checkpoint</th><th class='l'>layer</th>"
        "<th>images with class</th>"
        + "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
        + "</tr>"
    )
    suspects = {
        (s["checkpoint"], s["layer"], s["class"])
        for s in summary.get("shortcut_suspects", {}).get("suspects", [])
    }
    body = []
    for k in plan.classes:
        entries = [m for m in means if m["class"] == k]
        for i, m in enumerate(entries):
            cls = (
                f"<td class='c' rowspan='{len(entries)}'>{k}: {_e(plan.class_names[k])}</td>"
                if i == 0
                else ""
            )
            cells = []
            for name, _, kind in columns:
                text, tone = _fmt(m[name], kind), ""
                if name == "energy_inside" and m.get("below_chance"):
                    text, tone = f"{text}*", " class='bad' title='below chance'"
                if name == "energy_inside" and (m["checkpoint"], m["layer"], k) in suspects:
                    text, tone = f"{text}†", " class='bad' title='possible shortcut'"
                cells.append(f"<td{tone}>{text}</td>")
            body.append(
                f"<tr>{cls}<td class='l'>{_e(m['checkpoint'])}</td>"
                f"<td class='l'>{_e(m['layer'])}</td><td>{m['images_with_class']}</td>"
                + "".join(cells)
                + "</tr>"
            )
    legend = (
        "<p class='meta'>* below chance: the map puts less of its energy inside the class than "
        "the class's mean area share over the images holding it (the <i>chance</i> column), "
        "which a map with no information reaches; do not read such a layer's maps as evidence "
        "for the class. † possible shortcut (below).</p>"
        if truth
        else ""
    )
    return (
        "<h2>Metrics per class</h2><p class='meta'>Means over the audited images; energy inside "
        "the ground truth (GT) and the pointing game over the images whose GT holds the class; "
        "IoU of the predicted region over the images where prediction or GT holds it.</p>"
        f"<table>{head}{''.join(body)}</table>{legend}"
    )


def _shortcut_section(summary: dict[str, Any]) -> str:
    rule = summary.get("shortcut_suspects")
    if rule is None:
        return ""
    text = (
        f"A class is flagged when, over the images where it is both in the ground truth and "
        f"predicted (at least {rule['min_images']}), less than {rule['energy_threshold']:g} of "
        f"its maps' energy lies inside it while its IoU (pooled over the images) is at least "
        f"{rule['iou_threshold']:g}, and another class's maps at the same layer put at least "
        f"{rule['reference_threshold']:g} inside theirs (the layer localises). Classes covering "
        "half their images or more are background and not judged."
    )
    suspects = rule["suspects"]
    if not suspects:
        return (
            "<h2 id='shortcuts'>Shortcut suspects</h2>"
            f"<p>None: no class is flagged. <span class='meta'>{text}</span></p>"
        )
    items = "".join(
        f"<li class='bad'><b>{_e(s['class_name'])}</b> at {_e(s['layer'])} "
        f"({_e(s['checkpoint'])}): only {s['energy_inside']:.2f} of its maps lie inside its "
        f"ground truth while its IoU is {s['iou']:.2f} and {_e(s['reference_class_name'])}'s "
        f"maps put {s['reference_energy']:.2f} inside theirs ({s['num_images']} images hold "
        f"and predict it). The model may decide {_e(s['class_name'])} by something around its "
        "objects rather than the objects: look at its panels, and see docs/which-map.md.</li>"
        for s in suspects
    )
    return (
        f"<h2 id='shortcuts'>Shortcut suspects ({len(suspects)})</h2><ul>{items}</ul>"
        f"<p class='meta'>{text}</p>"
    )


#: Each check's ``summary.json`` key → its option, its section's title and anchor.
_CHECKS = {
    "sanity_check": ("--sanity-check", "Randomisation test (sanity check)", "sanity"),
    "faithfulness": ("--faithfulness", "Deletion and insertion (faithfulness)", "faithfulness"),
    "objects_alone": ("--objects-alone", "Objects alone (shortcut test)", "objects-alone"),
    "mistakes": ("--explain-errors", "Mistakes", "mistakes"),
    "modalities": (
        "--modalities",
        "Modalities: which input channels carry each class",
        "modalities",
    ),
}


def _heading(key: str) -> str:
    _, title, anchor = _CHECKS[key]
    return f"<h2 id='{anchor}'>{title}</h2>"


def _pending(summary: dict[str, Any], key: str) -> str:
    """A check's section while the run is partial: it runs once every image is audited."""
    if key not in summary.get("pending_checks", []):
        return ""
    return (
        f"{_heading(key)}<p>Not run yet: <code>{_CHECKS[key][0]}</code> runs once every image "
        "is audited; rerun the same command with <code>--resume</code>.</p>"
    )


def _verdict(word: str) -> str:
    tone = {"pass": "good", "passes": "good", "fail": "bad", "fails": "bad"}.get(word, "")
    return f"<span class='{tone}'>{_e(word or '—')}</span>"


def _sanity_section(plan: AuditPlan, summary: dict[str, Any]) -> str:
    sanity = summary.get("sanity_check")
    if sanity is None:
        return _pending(summary, "sanity_check")
    several = len(plan.models) > 1
    failing = [
        f"{v['method']} at {v['layer']}" + (f" [{v['checkpoint']}]" if several else "")
        for v in sanity["verdicts"]
        if v["verdict"] == "fails"
    ]
    headline = (
        f"<p><b class='bad'>Fails: {_e(', '.join(failing))}</b>. These maps stay too close to "
        "the trained model's when its weights are random (in at least one comparison below): "
        "there they show the image or the architecture more than what the model learned.</p>"
        if failing
        else "<p><b class='good'>No method fails.</b></p>"
    )
    verdict_items = "".join(
        f"<li>{_e(v['method'])} ({_e(v['target'])}) at {_e(v['layer'])}"
        + (f" [{_e(v['checkpoint'])}]" if several else "")
        + f": {_verdict(v['verdict'])} ({v['passed']} of {v['comparisons']} comparisons pass"
        + (f", {v['inconclusive']} inconclusive" if v["inconclusive"] else "")
        + ")</li>"
        for v in sanity["verdicts"]
    )
    head = (
        ("<tr><th class='l'>checkpoint</th>" if several else "<tr>")
        + "<th class='l'>method</th><th class='l'>layer</th><th class='l'>class</th>"
        "<th class='l'>randomised</th><th>images</th><th>median |ρ|</th><th>threshold</th>"
        "<th>ρ defined</th><th>SSIM</th><th>energy trained → random</th><th>chance</th>"
        "<th>all-zero random</th><th>verdict</th></tr>"
    )
    body = []
    for entry in sanity["checkpoints"]:
        for r in entry["rows"]:
            if not r["verdict"]:
                continue
            body.append(
                ("<tr>" + (f"<td class='l'>{_e(entry['checkpoint'])}</td>" if several else ""))
                + f"<td class='l'>{_e(r['method'])}</td><td class='l'>{_e(r['layer'])}</td>"
                f"<td class='l'>{_e(r['class_name'])}</td><td class='l'>{_e(r['randomized'])}</td>"
                f"<td>{r['num_images']}</td><td>{_fmt(r['rho_abs_median'])}</td>"
                f"<td>≤ {_fmt(r['threshold'])}</td><td>{_fmt(r['rho_defined'], 'pct')}</td>"
                f"<td>{_fmt(r['ssim_median'])}</td>"
                f"<td>{_fmt(r['energy_trained'])} → {_fmt(r['energy_randomized'])}</td>"
                f"<td>{_fmt(r['chance'])}</td><td>{_fmt(r['zero_randomized'], 'pct')}</td>"
                f"<td>{_verdict(r['verdict'])}</td></tr>"
            )
    seeds = ", ".join(str(s) for s in sanity["seeds"])
    return (
        _heading("sanity_check")
        + f"<p class='meta'>Does each map measure the model? A copy of each network is "
        f"re-initialised ({_e(sanity['initializer'])}: He-normal weights, normalisation reset; "
        f"seeds {seeds}) from the output head down to each layer's block, and as a whole "
        f"(<i>full</i>); each map of the first {sanity['images']} audited image(s) is compared "
        "with the trained model's map of the same image and class. A map <b>passes</b> when "
        "the median |ρ| (Spearman's rank correlation, over images and seeds) is at most "
        f"<b>{sanity['rho_threshold']:g}</b> for the cascade down to its layer and "
        f"<b>{sanity['full_rho_threshold']:g}</b> for the whole network, and <b>fails</b> "
        "above; it is <b>inconclusive</b> when fewer than half of the pairs have a ranking "
        "(all-zero maps). SSIM is shown but not used: mostly-zero maps share their zeros. "
        "Guided backpropagation is expected to fail (Adebayo et al. 2018). Every row, also "
        "those without a verdict, is in sanity.csv and summary.json.</p>"
        f"{headline}<ul>{verdict_items}</ul><table>{head}{''.join(body)}</table>"
    )


def _faithfulness_section(plan: AuditPlan, summary: dict[str, Any]) -> str:
    faith = summary.get("faithfulness")
    if faith is None:
        return _pending(summary, "faithfulness")
    several = len(plan.models) > 1
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in faith["rows"]:
        key = (r["checkpoint"], r["method"], r["layer"], r["class_index"], r["class_name"])
        pairs.setdefault(key, {})[r["curve"]] = r
    head = (
        ("<tr><th class='l'>checkpoint</th>" if several else "<tr>")
        + "<th class='l'>method</th><th class='l'>layer</th><th class='l'>class</th>"
        "<th>images</th><th>deletion AUC</th><th>random</th><th>GT first</th>"
        "<th>ratio</th><th>verdict</th><th>insertion AUC</th><th>random</th>"
        "<th>ratio</th></tr>"
    )
    body = []
    for (label, method, layer, _, name), curves in pairs.items():
        d, i = curves.get("deletion", {}), curves.get("insertion", {})
        body.append(
            ("<tr>" + (f"<td class='l'>{_e(label)}</td>" if several else ""))
            + f"<td class='l'>{_e(method)}</td><td class='l'>{_e(layer)}</td>"
            f"<td class='l'>{_e(name)}</td><td>{d.get('num_images', 0)}</td>"
            f"<td>{_fmt(d.get('auc_map'))}</td><td>{_fmt(d.get('auc_random'))}</td>"
            f"<td>{_fmt(d.get('auc_gt_first'))}</td><td>{_fmt(d.get('ratio'))}</td>"
            f"<td>{_verdict(_word(d.get('verdict', '')))}</td>"
            f"<td>{_fmt(i.get('auc_map'))}</td><td>{_fmt(i.get('auc_random'))}</td>"
            f"<td>{_fmt(i.get('ratio'))}</td></tr>"
        )
    fill = (
        "each image's mean colour"
        if faith["fill"] == "mean"
        else "a blur of the image (a blurred object often keeps its class: read with care)"
    )
    region = "ground truth" if plan.dataset.has_masks else "predicted region on the untouched image"
    return (
        _heading("faithfulness")
        + f"<p class='meta'>Does each map find the pixels the prediction depends on? On the "
        f"first {faith['images']} audited image(s) holding each class, its pixels are replaced "
        f"by {fill}, most important first by the map, in {faith['steps']} steps (deletion), or "
        "put back into the filled image in that order (insertion), while the class's mean "
        f"probability over its {region} is tracked. The area under each curve (AUC) is shown "
        "next to a random order (the baseline) and ground-truth pixels first. Deletion "
        f"<b>passes</b> when its AUC is at most <b>{faith['deletion_threshold']:g}</b> of "
        "random order's (ratio), and <b>fails</b> above; insertion has no verdict (a ratio "
        "above 1 beats random). Every row, with the mean curves, is in summary.json; without "
        "them in faithfulness.csv.</p>"
        f"<table>{head}{''.join(body)}</table>"
    )


def _objects_alone_section(plan: AuditPlan, summary: dict[str, Any]) -> str:
    alone = summary.get("objects_alone")
    if alone is None:
        return _pending(summary, "objects_alone")
    several = len(plan.models) > 1
    suspects = alone["suspects"]
    headline = (
        "<p><b class='bad'>Lost alone: "
        + _e(
            ", ".join(
                r["class_name"] + (f" [{r['checkpoint']}]" if several else "") for r in suspects
            )
        )
        + "</b>. The model segments these classes well but no longer predicts them on their "
        "own objects once the surroundings are flattened: it takes their label from around "
        "the objects. That is a shortcut unless the class is defined by its surroundings; "
        "a map that sits on such objects (next to the head it always does) shows where the "
        "class is, not what decided it. See docs/which-map.md.</p>"
        if suspects
        else "<p><b class='good'>Every judged class keeps its label alone.</b></p>"
    )
    head = (
        ("<tr><th class='l'>checkpoint</th>" if several else "<tr>")
        + "<th class='l'>class</th><th>images</th><th>IoU</th><th>kept alone</th>"
        "<th>verdict</th></tr>"
    )
    words = {"suspect": "fail", "keeps": "pass"}
    body = "".join(
        ("<tr>" + (f"<td class='l'>{_e(r['checkpoint'])}</td>" if several else ""))
        + f"<td class='l'>{_e(r['class_name'])}</td><td>{r['num_images']}</td>"
        f"<td>{_fmt(r['iou'])}</td><td>{_fmt(r['kept_alone'])}</td>"
        f"<td>{_verdict(words.get(r['verdict'], ''))}"
        + (" lost alone" if r["verdict"] == "suspect" else "")
        + "</td></tr>"
        for r in alone["rows"]
    )
    return (
        _heading("objects_alone")
        + "<p class='meta'>Does each class's label come from its objects? On the first "
        f"{alone['images']} audited image(s), each class's ground-truth objects are shown "
        "alone, every other pixel set to the mean colour of the pixels it replaces, and the "
        "model predicts again; <i>kept alone</i> is the share of the class's segmented pixels "
        "(ground truth and predicted on the untouched image) it still predicts, over the "
        "images that hold and predict the class. A class with IoU at least "
        f"{alone['iou_threshold']:g} (pooled over these images) on at least "
        f"{alone['min_images']} images is <b>lost alone</b> below "
        f"<b>{alone['kept_threshold']:g}</b>; classes covering half their images or more are "
        "background and not judged. No map is involved.</p>"
        f"{headline}<table>{head}{body}</table>"
    )


def _modalities_section(plan: AuditPlan, summary: dict[str, Any]) -> str:
    found = summary.get("modalities")
    if found is None:
        return _pending(summary, "modalities")
    groups = found["groups"]
    parts = [
        _heading("modalities"),
        f"<p class='meta'>On the first {found['images']} audited image(s): each class's "
        "evidence split over groups of input channels, by integrated gradients × input summed "
        f"over the class's region ({_e(found['target'])}); the share is a group's positive "
        "evidence over all groups' (blue bars), and the check occludes each group with its "
        "mean and splits the score's drops the same way (orange bars). <i>first</i>: how often "
        "the group carries the most; <i>agree</i>: how often the two rank the same group "
        "first. Rows in modalities.csv.</p>",
    ]
    head = "<tr><th class='l'>class</th><th>images</th>" + "".join(
        f"<th class='l'>{_e(g)}</th>" for g in groups
    )
    head += "<th>agree</th></tr>"
    for entry in found["checkpoints"]:
        if len(plan.models) > 1:
            parts.append(f"<h3>{_e(entry['checkpoint'])}</h3>")
        rows = "".join(_modality_row(c, len(groups)) for c in entry["classes"])
        parts.append(f"<table>{head}{rows}</table>")
    return "".join(parts)


def _modality_row(c: dict[str, Any], groups: int) -> str:
    none = c.get("images_without_evidence") or 0
    shown = f"{c['images']}" + (f" ({none} without evidence)" if none else "")
    cells = [f"<td class='c'>{_e(c['class_name'])}</td><td>{shown}</td>"]
    for g in range(groups):
        share, occluded = c["mean_share"][g], c["occlusion_mean_share"][g]
        if c["images"] == 0:
            cells.append("<td>—</td>")
            continue
        cells.append(
            f"<td class='bars'><span class='bar' style='width:{60 * share:.0f}px'></span> "
            f"{share:.2f} · first {_fmt(c['ranked_first'][g], 'pct')}<br>"
            f"<span class='bar o' style='width:{60 * occluded:.0f}px'></span> {occluded:.2f} · "
            f"first {_fmt(c['occlusion_ranked_first'][g], 'pct')}</td>"
        )
    cells.append(f"<td>{_fmt(c['agreement'], 'pct')}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _mistakes_section(plan: AuditPlan, summary: dict[str, Any]) -> str:
    mistakes = summary.get("mistakes")
    if mistakes is None:
        return _pending(summary, "mistakes")
    several = len(plan.models) > 1
    what = (
        "the chosen class's logit minus the true class's over the region (what made the model "
        "prefer the wrong class)"
        if mistakes["contrastive"]
        else "the class's logit over the region"
    )
    parts = [
        _heading("mistakes"),
        "<p class='meta'>Where the prediction and the ground truth disagree. Per class, the "
        f"{mistakes['images_per_class']} image(s) with the most false-positive plus "
        "false-negative pixels; each panel: the image with the false positives outlined in "
        "<b style='color:#ff2828'>red</b> and the false negatives in "
        "<b style='color:#2878ff'>blue</b> | ground truth | prediction | the map of the false "
        "positives | the map of the false negatives (each error region outlined in white). "
        f"A map's score is {what}. E = share of the map's energy inside its error region. "
        "Rows in mistakes.csv.</p>",
    ]
    for entry in mistakes["checkpoints"]:
        if several:
            parts.append(f"<h3>{_e(entry['checkpoint'])}</h3>")
        parts.append(_pairs_table(entry))
        parts.append(_errors_table(entry))
        parts.append(_mistake_panels(plan, mistakes["rows"], entry))
    return "".join(parts)


def _pairs_table(entry: dict[str, Any]) -> str:
    pairs = entry["pairs"][:10]
    if not pairs:
        return "<p>No confusion pair: no pixel of one class was predicted as another.</p>"
    body = "".join(
        f"<tr><td class='l'>{_e(p['true_name'])}</td><td class='l'>{_e(p['predicted_name'])}"
        f"</td><td>{p['pixels']}</td><td>{_fmt(p['share_of_true'], 'pct')}</td></tr>"
        for p in pairs
    )
    return (
        f"<p class='meta'>Confusion pairs over {entry['images']} image(s), most pixels first "
        "(share: of the true class's ground-truth pixels):</p><table><tr><th class='l'>true "
        "class</th><th class='l'>predicted as</th><th>pixels</th><th>share</th></tr>"
        f"{body}</table>"
    )


def _errors_table(entry: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><td class='c'>{_e(c['class_name'])}</td><td>{c['false_positive_pixels']}</td>"
        f"<td>{c['false_negative_pixels']}</td><td>{c['truth_pixels']}</td>"
        f"<td>{c['images_with_errors']}</td></tr>"
        for c in entry["classes"]
    )
    return (
        "<table><tr><th class='l'>class</th><th>false positives (px)</th><th>false negatives "
        f"(px)</th><th>ground truth (px)</th><th>images with errors</th></tr>{body}</table>"
    )


def _mistake_panels(plan: AuditPlan, rows: Sequence[dict[str, Any]], entry: dict[str, Any]) -> str:
    """The checkpoint's panels under a heading per class (its largest mistakes; the class with
    the most error pixels first), then the top confusion pairs'."""
    panels: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["checkpoint"] == entry["checkpoint"]:
            panels.setdefault(row["panel"], []).append(row)
    errors = {
        c["class"]: c["false_positive_pixels"] + c["false_negative_pixels"]
        for c in entry["classes"]
    }

    def group(shown: list[dict[str, Any]]) -> tuple[int, int, int]:
        first = shown[0]
        if first["error"] == "confusion":
            return (1, 0, 0)
        return (0, -errors.get(first["class"], 0), plan.classes.index(first["class"]))

    parts, heading = [], None
    for panel, shown in sorted(panels.items(), key=lambda item: group(item[1])):
        first = shown[0]
        title = (
            "The top confusion pairs"
            if first["error"] == "confusion"
            else f"{first['class_name']}: its largest mistakes"
        )
        if title != heading:
            heading = title
            parts.append(f"<h4>{_e(title)}</h4>")
        parts.append(_mistake_figure(plan, panel, shown))
    return "".join(parts)


def _mistake_figure(plan: AuditPlan, panel: str, shown: Sequence[dict[str, Any]]) -> str:
    first = shown[0]
    if first["error"] == "confusion":
        title = f"{first['class_name']} taken for {first['other_class_name']} · "
    else:
        title = ""
    energies = " · ".join(
        f"{r['error'].replace('_', ' ')}: {r['pixels']} px, E {_fmt(r['energy_inside'])}"
        for r in shown
    )
    several = len(plan.layout.layers) > 1
    layer = f" · {TIP_NAMES.get(first['layer'], first['layer'])}" if several else ""
    caption = f"<b>{_e(title)}{_e(first['image'])}</b>{_e(layer)}<br>{_e(energies)}"
    src = urllib.parse.quote(panel)
    return (
        f"<figure class='p'><img class='p' src='{_e(src)}' alt='' loading='lazy'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _word(verdict: str) -> str:
    return {"pass": "passes", "fail": "fails"}.get(verdict, verdict)


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
        f"indices below {plan.report_images}); every {what}'s panels are in "
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


#: Characters at the end of a layer's name that its caption always shows.
_NAME_TAIL = 10


def _caption(layer: str, row: dict[str, Any], with_layer: bool) -> str:
    # A layer's name can be wider than its tile: one line whose head the CSS shortens with an
    # ellipsis while its tail, where names of one network differ, stays; the full name on
    # hover. So it never runs under the next tile's caption.
    shown = TIP_NAMES.get(layer, layer)
    head, tail = shown[:-_NAME_TAIL], shown[-_NAME_TAIL:]
    name = f"<b class='layer' title='{_e(layer)}'><span>{_e(head)}</span>{_e(tail)}</b>"
    first = [name] if with_layer else []
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
        f"{f' ({rate:.1f} images/s)' if rate else ''}"
        + (f" · quality checks {timings['checks_s']:.1f} s" if timings["checks_s"] else "")
        + f" · reports {timings['report_s']:.1f} s</p>"
    )
