"""``--explain-errors``: where each checkpoint is wrong, and what its maps say about it.

Runs after the main pass, once per checkpoint, like the quality checks
(:mod:`~segcam_lightning.audit.checks`), from what the main pass kept of every audited image
with ground truth (its *tally*, :mod:`~segcam_lightning.audit.tallies`):

- **Confusion pairs**: the pixels of every (true class ``t``, predicted class ``p``) pair summed
  over the images, ranked by pixels, with their share of ``t``'s ground truth (multiclass and
  binary outputs; a multi-label output's classes are independent, so it has no pairs).
- **The largest mistakes of each class**: the ``--explain-errors-images`` images with the most
  false-positive plus false-negative pixels of the class. For them the engine runs again with
  the audited method and layers and the error-region targets of
  :mod:`segcam_lightning.cam.targets`: :class:`~segcam_lightning.cam.targets.FalsePositives`
  (pixels predicted as the class whose ground truth is another) and
  :class:`~segcam_lightning.cam.targets.FalseNegatives` (the class's pixels predicted as
  another), contrastive for a multiclass output (the chosen class's logit minus the true
  one's: what made the model prefer the wrong class). Each gets a panel: the image with the
  false positives outlined in red and the false negatives in blue | ground truth | prediction |
  false-positive map | false-negative map.
- **The top confusion pairs' maps** (multiclass): for each of the first
  :data:`PAIR_PANELS` pairs, the image with the most pixels of that pair and the map of
  :class:`~segcam_lightning.cam.targets.Confusion` (``t`` taken for ``p``, contrastive).

Outputs: ``mistakes/[<checkpoint>/][<layer>/]<class_idx>/<name>.jpg`` and
``mistakes/[<checkpoint>/][<layer>/]pairs/<t>_as_<p>.jpg``, ``mistakes.csv``
(:data:`MISTAKE_COLUMNS`: one row per panel's error map), ``summary.json['mistakes']`` and the
report's "Mistakes" section. The mistakes are the audit's images (not volumes) with masks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor

from segcam_lightning.audit.settings import JPEG_PARAMS
from segcam_lightning.audit.tallies import confusion_matrix, sound
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam import functional as FC
from segcam_lightning.cam.functional import class_regions
from segcam_lightning.cam.targets import Confusion, FalseNegatives, FalsePositives
from segcam_lightning.metrics import ground_truth_regions
from segcam_lightning.paths import safe_component, safe_join, write_atomic
from segcam_lightning.render import colorize_mask, hstack_with_separators, overlay_cam

if TYPE_CHECKING:
    from segcam_lightning.audit.batches import AuditModel
    from segcam_lightning.audit.plan import AuditPlan

#: The error kinds of the class panels, as ``mistakes.csv`` names them.
ERROR_KINDS = ("false_positive", "false_negative")
#: How many of the top confusion pairs get a map panel (multiclass).
PAIR_PANELS = 5
#: How many pairs ``summary.json`` and the report list per checkpoint.
PAIRS_LISTED = 20
#: Outline colours (RGB) of the false positives and the false negatives.
FP_COLOR, FN_COLOR = (255, 40, 40), (40, 120, 255)
#: Columns of ``mistakes.csv``: one row per checkpoint × layer × shown error map. ``error`` is
#: ``false_positive``, ``false_negative`` or ``confusion``; ``pixels`` the error region's size;
#: ``other_class`` the class most often on the other side of the error (for a false positive
#: the true class, for a false negative and a confusion the predicted one); ``energy_inside``
#: the share of the map's energy inside the error region.
MISTAKE_COLUMNS = (
    "checkpoint",
    "layer",
    "error",
    "class",
    "class_name",
    "other_class",
    "other_class_name",
    "index",
    "image",
    "source",
    "pixels",
    "image_share",
    "energy_inside",
    "panel",
)


@dataclass
class Mistakes:
    """What ``--explain-errors`` found, for the summary, ``mistakes.csv`` and the report.

    Attributes:
        images: images per class the panels show at most (``--explain-errors-images``).
        contrastive: the maps are contrastive (multiclass outputs).
        checkpoints: per checkpoint, ``{"checkpoint", "images", "pairs", "classes"}``: the
            images ranked, the ranked confusion pairs (the first :data:`PAIRS_LISTED`) and per
            class the false-positive, false-negative and ground-truth pixels over the data.
        rows: ``mistakes.csv``'s rows; each panel's path relative to ``--out`` in ``panel``.
        seconds: wall time.
    """

    images: int
    contrastive: bool
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_per_class": self.images,
            "contrastive": self.contrastive,
            "pair_panels": PAIR_PANELS,
            "checkpoints": self.checkpoints,
            "panels": len({row["panel"] for row in self.rows}),
            "rows": self.rows,
            "seconds": self.seconds,
        }


def ranked_pairs(entries: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """The confusion pairs of ``entries`` (tallies' entries with ``"confusion"``), most pixels
    first: ``true_class``, ``predicted_class``, their names, ``pixels`` and ``share_of_true``
    (of the true class's ground-truth pixels)."""
    total = _confusion_total(entries, len(names))
    if total is None:
        return []
    truth = total.sum(axis=1)
    pairs = [
        {
            "true_class": t,
            "true_name": names[t],
            "predicted_class": p,
            "predicted_name": names[p],
            "pixels": int(total[t, p]),
            "share_of_true": float(total[t, p] / truth[t]),
        }
        for t, p in zip(*(axis.tolist() for axis in np.nonzero(total)), strict=True)
        if t != p
    ]
    return sorted(pairs, key=lambda pair: (-pair["pixels"], pair["true_class"]))


def _confusion_total(entries: Sequence[dict[str, Any]], num_labels: int) -> np.ndarray | None:
    matrices = [confusion_matrix(e, num_labels) for e in entries if "confusion" in e]
    return np.sum(matrices, axis=0) if matrices else None


def class_errors(
    entries: Sequence[dict[str, Any]], position: int, label: int | None, num_labels: int
) -> tuple[np.ndarray, ...]:
    """Per entry, the false-positive and false-negative pixels of the class at ``position``
    in the plan's classes: ``(fp [N], fn [N])``. With confusion counts (multiclass and binary;
    ``label``: the class's mask label) from them, so pixels whose label is no class (an ignore
    index) count as neither, as in the error maps; else (multi-label) from the region counts."""
    if label is not None and entries and all("confusion" in e for e in entries):
        matrices = np.stack([confusion_matrix(e, num_labels) for e in entries])
        hits = matrices[:, label, label]
        return matrices[:, :, label].sum(1) - hits, matrices[:, label, :].sum(1) - hits
    get = {k: np.asarray([e[k][position] for e in entries], np.int64) for k in _COUNTS}
    return get["predicted"] - get["intersection"], get["truth"] - get["intersection"]


_COUNTS = ("truth", "predicted", "intersection")


def largest(entries: Sequence[dict[str, Any]], position: int, n: int, labels: _Labels) -> list[int]:
    """The dataset indices of the (at most) ``n`` images with the most false-positive plus
    false-negative pixels of the class at ``position``, most first (ties: dataset order)."""
    if not entries:
        return []
    fp, fn = class_errors(entries, position, labels.of(position), labels.count)
    errors = fp + fn
    order = sorted(range(len(entries)), key=lambda i: (-errors[i], entries[i]["index"]))
    return [entries[i]["index"] for i in order[:n] if errors[i] > 0]


def explain_mistakes(
    plan: AuditPlan,
    tallies: Sequence[dict[str, Any]],
    per_class: int,
    batch_size: int,
    step: Callable[[str], None],
) -> Mistakes:
    """Rank every checkpoint's mistakes on the audited images and explain the largest ones
    (see the module's docstring); writes the panels under ``--out``.

    Args:
        plan: the run.
        tallies: every audited image's tally.
        per_class: at most this many images per class get panels.
        batch_size: images per engine call.
        step: called with a line as each checkpoint starts (raises to stop the run).
    """
    start = time.perf_counter()
    contrastive = plan.readout.kind == "multiclass"
    found = Mistakes(per_class, contrastive)
    names = plan.label_names or plan.class_names
    for m, model in enumerate(plan.models):
        entries = sound(tallies, model.label)
        step(f"{model.label}: the largest mistakes of {len(entries)} image(s)")
        pairs = ranked_pairs(entries, names)
        labels = _Labels(plan)
        chosen = {k: largest(entries, k, per_class, labels) for k in range(len(plan.classes))}
        found.checkpoints.append(
            {
                "checkpoint": model.label,
                "images": len(entries),
                "pairs": pairs[:PAIRS_LISTED],
                "classes": _class_totals(plan, entries, labels),
            }
        )
        by_index = {e["index"]: e for e in entries}
        _Explainer(plan, m, model, batch_size, by_index, found).run(chosen, pairs)
    found.seconds = time.perf_counter() - start
    return found


def _class_totals(
    plan: AuditPlan, entries: Sequence[dict[str, Any]], labels: _Labels
) -> list[dict[str, Any]]:
    totals = []
    for k, class_idx in enumerate(plan.classes):
        fp, fn = (
            class_errors(entries, k, labels.of(k), labels.count)
            if entries
            else (np.zeros(0), np.zeros(0))
        )
        truth = sum(e["truth"][k] for e in entries)
        totals.append(
            {
                "class": class_idx,
                "class_name": plan.class_names[class_idx],
                "false_positive_pixels": int(fp.sum()),
                "false_negative_pixels": int(fn.sum()),
                "truth_pixels": int(truth),
                "images_with_errors": int(((fp + fn) > 0).sum()),
            }
        )
    return totals


class _Labels:
    """The mask labels the confusion counts are over: how many, and each explained class's
    (multiclass: its channel; binary: the foreground, 1; multi-label: none, no counts)."""

    def __init__(self, plan: AuditPlan) -> None:
        self.kind, self.classes = plan.readout.kind, plan.classes
        self.count = len(plan.label_names or plan.class_names)

    def of(self, position: int) -> int | None:
        if self.kind == "multilabel":
            return None
        return 1 if self.kind == "binary" else self.classes[position]


class _Explainer:
    """The engine runs and panels of one checkpoint's mistakes."""

    def __init__(
        self,
        plan: AuditPlan,
        m: int,
        model: AuditModel,
        batch_size: int,
        entries: dict[int, dict[str, Any]],
        found: Mistakes,
    ) -> None:
        self.plan, self.m, self.model, self.batch_size = plan, m, model, batch_size
        self.entries, self.found = entries, found
        contrastive = found.contrastive
        self.engines = {
            "false_positive": self._engine(FalsePositives(contrastive)),
            "false_negative": self._engine(FalseNegatives(contrastive)),
        }

    def _engine(self, target: Any) -> CAMEngine:
        """The checkpoint's engine with another target (its settings only: an engine keeps no
        state between calls)."""
        engine = copy.copy(self.model.engine)
        engine.target = target
        return engine

    def run(self, chosen: dict[int, list[int]], pairs: Sequence[dict[str, Any]]) -> None:
        wanted = sorted({i for indices in chosen.values() for i in indices})
        for first in range(0, len(wanted), self.batch_size):
            indices = wanted[first : first + self.batch_size]
            batch = _read(self.plan, self.model, indices)
            results = {
                kind: engine(batch.x, classes=self.plan.classes, masks=batch.masks)
                for kind, engine in self.engines.items()
            }
            batch.read_prediction(self.plan, results["false_positive"].logits)
            maps = {kind: result.cams for kind, result in results.items()}
            regions = self._regions(batch)
            for b, index in enumerate(indices):
                for k, shown in chosen.items():
                    if index in shown:
                        self._class_panels(batch, b, k, maps, regions)
        if self.found.contrastive:
            for pair in pairs[:PAIR_PANELS]:
                self._pair_panel(pair)

    def _regions(self, batch: _Batch) -> tuple[Tensor, Tensor]:
        """``(false positives, false negatives)`` ``[B, K, H, W]`` bool, as the error targets
        read them: a pixel whose mask label is no class (an ignore index) is in neither."""
        plan, kind = self.plan, self.plan.readout.kind
        predicted = class_regions(batch.labels, plan.classes, batch.outputs, kind, spatial_dims=2)
        truth = ground_truth_regions(batch.masks, plan.classes, kind, spatial_dims=2)[0]
        labels = _Labels(plan).count if kind != "multilabel" else batch.outputs
        valid = (batch.masks >= 0) & (batch.masks < labels)
        if plan.readout.ignore_index is not None:
            valid &= batch.masks != plan.readout.ignore_index
        return predicted & ~truth & valid[:, None], truth & ~predicted

    def _class_panels(
        self,
        batch: _Batch,
        b: int,
        k: int,
        maps: dict[str, Tensor],
        regions: tuple[Tensor, Tensor],
    ) -> None:
        plan, class_idx = self.plan, self.plan.classes[k]
        fp, fn = (r[b, k].cpu().numpy() for r in regions)
        outlined = _outline(_outline(batch.pictures[b], fp, FP_COLOR), fn, FN_COLOR)
        common = [outlined, batch.truth_tile(plan, b), batch.prediction_tile(plan, b)]
        for layer, layer_name in enumerate(plan.layout.layers):
            error_maps = [maps[kind][b, layer, k].cpu().numpy() for kind in ERROR_KINDS]
            overlays = [
                _outline(overlay_cam(batch.pictures[b], cam), region, (255, 255, 255))
                for cam, region in zip(error_maps, (fp, fn), strict=True)
            ]
            path = self._path(layer, str(class_idx), f"{batch.names[b]}.jpg")
            _write(path, hstack_with_separators([*common, *overlays]))
            for kind, cam, region in zip(ERROR_KINDS, error_maps, (fp, fn), strict=True):
                other = self._other(batch.indices[b], k, kind)
                self._row(batch, b, layer_name, kind, class_idx, other, cam, region, path)

    def _pair_panel(self, pair: dict[str, Any]) -> None:
        t, p = pair["true_class"], pair["predicted_class"]
        index = max(
            self.entries,
            key=lambda i: (self._matrix(i)[t, p], -i),
        )
        batch = _read(self.plan, self.model, [index])
        engine = self._engine(Confusion(true_class=t, contrastive=True))
        result = engine(batch.x, classes=[p], masks=batch.masks)
        batch.read_prediction(self.plan, result.logits)
        cams = result.cams[0]
        region = ((batch.masks[0] == t) & (batch.labels[0] == p)).cpu().numpy()
        picture = _outline(batch.pictures[0], region, FN_COLOR)
        common = [picture, batch.truth_tile(self.plan, 0), batch.prediction_tile(self.plan, 0)]
        for layer, layer_name in enumerate(self.plan.layout.layers):
            cam = cams[layer, 0].cpu().numpy()
            overlay = _outline(overlay_cam(batch.pictures[0], cam), region, (255, 255, 255))
            path = self._path(layer, "pairs", f"{t}_as_{p}.jpg")
            _write(path, hstack_with_separators([*common, overlay]))
            self._row(batch, 0, layer_name, "confusion", t, p, cam, region, path)

    def _matrix(self, index: int) -> np.ndarray:
        """Image ``index``'s confusion counts, dense."""
        matrix = confusion_matrix(self.entries[index], _Labels(self.plan).count)
        assert matrix is not None  # pairs (and _other's callers) exist only with counts
        return matrix

    def _other(self, index: int, k: int, kind: str) -> int | None:
        """The class most often on the other side of image ``index``'s error of the class at
        ``k``: the true class of its false positives, the predicted one of its false
        negatives (``None`` without confusion counts)."""
        entry = self.entries.get(index)
        if entry is None or "confusion" not in entry:
            return None
        matrix = self._matrix(index)
        label = 1 if self.plan.readout.kind == "binary" else self.plan.classes[k]
        line = matrix[:, label].copy() if kind == "false_positive" else matrix[label].copy()
        line[label] = 0
        return int(line.argmax()) if line.any() else None

    def _row(
        self,
        batch: _Batch,
        b: int,
        layer: str,
        kind: str,
        class_idx: int,
        other: int | None,
        cam: np.ndarray,
        region: np.ndarray,
        path: Path,
    ) -> None:
        names = self.plan.label_names or self.plan.class_names
        total = float(cam.sum())
        pixels = int(region.sum())
        if pixels == 0:  # no such error on this image: its map is empty
            return
        self.found.rows.append(
            {
                "checkpoint": self.model.label,
                "layer": layer,
                "error": kind,
                "class": class_idx,
                "class_name": self.plan.class_names[class_idx],
                "other_class": other,
                "other_class_name": names[other] if other is not None else None,
                "index": batch.indices[b],
                "image": batch.names[b],
                "source": batch.sources[b],
                "pixels": pixels,
                "image_share": pixels / region.size,
                "energy_inside": float((cam * region).sum()) / total if total > 0 else float("nan"),
                "panel": path.relative_to(self.plan.layout.root).as_posix(),
            }
        )

    def _path(self, layer: int, folder: str, file_name: str) -> Path:
        layout = self.plan.layout
        parts = ["mistakes"]
        if len(layout.models) > 1:
            parts.append(layout.models[self.m])
        if len(layout.layers) > 1:
            parts.append(safe_component(layout.layers[layer]))
        return safe_join(layout.root, *parts, folder, safe_component(file_name))


@dataclass
class _Batch:
    """Some audited images read again: what the network is fed, what it predicts and what
    panels show."""

    indices: list[int]
    names: list[str]
    sources: list[str]
    x: Tensor  # [N, C, H, W] the network's input
    masks: Tensor  # [N, H, W] int64 labels
    pictures: list[np.ndarray]  # RGB uint8 [H, W, 3]
    #: [N, H, W] predicted labels (multi-label: [N, K_all, H, W] masks), and the network's
    #: output channels: read from an engine call's logits (:meth:`read_prediction`).
    labels: Tensor | None = None
    outputs: int = 0

    def read_prediction(self, plan: AuditPlan, logits: Tensor) -> None:
        """What the checkpoint predicts, at the input's resolution, from its logits."""
        size = tuple(self.x.shape[2:])
        self.labels = FC.resize_labels(plan.readout.predicted(logits), size)
        self.outputs = logits.shape[1]

    def truth_tile(self, plan: AuditPlan, b: int) -> np.ndarray:
        return colorize_mask(self.masks[b].cpu().numpy(), plan.colormap)

    def prediction_tile(self, plan: AuditPlan, b: int) -> np.ndarray:
        labels = FC.label_map(self.labels, plan.readout.kind)[b]
        return colorize_mask(labels.cpu().numpy(), plan.colormap)


def _read(plan: AuditPlan, model: AuditModel, indices: Sequence[int]) -> _Batch:
    """The dataset's ``indices`` as the main pass read them."""
    samples = [plan.dataset[i] for i in indices]
    images = torch.stack([s["image"] for s in samples])  # [N, 3, H, W] uint8
    if "input" in samples[0]:  # the user's pipeline gives the network's input
        x = torch.stack([s["input"] for s in samples]).float()
    else:
        x = model.prepare_input(images.float().div(255.0))
    return _Batch(
        indices=list(indices),
        names=[s["name"] for s in samples],
        sources=[s["source"] for s in samples],
        x=x.to(plan.model_device),
        masks=torch.stack([s["mask"] for s in samples]).to(plan.model_device),
        pictures=[np.ascontiguousarray(p.permute(1, 2, 0).numpy()) for p in images],
    )


def _outline(picture: np.ndarray, region: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """``picture`` (RGB uint8) with the outline of ``region`` drawn in ``color``, a copy."""
    out = picture.copy()
    contours, _ = cv2.findContours(
        region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    cv2.drawContours(out, contours, -1, color, 1)
    return out


def _write(path: Path, rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), JPEG_PARAMS)
    if not ok:
        raise OSError(f"could not encode {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encoded.tobytes())


def describe_mistakes(summary: dict[str, Any]) -> str:
    """The closing message's line for ``summary.json['mistakes']``."""
    parts = []
    for entry in summary["checkpoints"]:
        top = entry["pairs"][0] if entry["pairs"] else None
        worst = (
            f"{top['true_name']} taken for {top['predicted_name']} most often "
            f"({top['pixels']} pixels, {top['share_of_true']:.1%} of {top['true_name']})"
            if top
            else "no confusion pair"
        )
        parts.append(f"{entry['checkpoint']}: {worst}")
    return (
        f"Mistakes ({summary['seconds']:.0f} s): {'; '.join(parts)}; "
        f"{summary['panels']} panel(s) in mistakes/, mistakes.csv."
    )


def mistake_csv_rows(mistakes: Mistakes) -> list[dict[str, Any]]:
    """``mistakes.csv``'s rows (:data:`MISTAKE_COLUMNS`)."""
    return [{column: row[column] for column in MISTAKE_COLUMNS} for row in mistakes.rows]
