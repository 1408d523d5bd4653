"""Deletion and insertion curves (Petsiuk et al. 2018, RISE) for per-class segmentation maps.

Deletion replaces a class's pixels with a fill, most important first by the map, and tracks the
class's score; a map that finds the evidence makes the score fall fast (small area under the
curve). Insertion starts from the filled image and puts pixels back in the same order; the score
should rise fast (large area). Each curve is read next to two orders that need no model
explanation: a random order (the baseline: ``ratio = AUC_map / AUC_random``) and ground truth
first (the class's own pixels in random order, then the rest: what a perfect "look at the
object" map would do).

The score of class ``k`` in an image is its mean probability (softmax, or sigmoid for binary and
multi-label models) over a fixed region: the class's ground truth, or, without masks, the
pixels the model predicts as ``k`` on the untouched image.

The default fill is each image's mean colour. A blurred image (``fill="blur"``) keeps an object's
colour and coarse shape: on the default run a fully blurred round leaf is still predicted at
p 0.96, so blur deletes little and its curves say more about the blur than about the map.

Cost: ``(steps + 1)`` forward passes of the counted images per class, order (map, ground truth
first) and curve, plus ``2 (steps + 1)`` for the random order shared by all classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from segcam_lightning.cam import Readout
from segcam_lightning.cam.functional import class_regions, predicted_masks
from segcam_lightning.cam.layers import default_output_adapter, eval_mode, preserve_rng
from segcam_lightning.quality import functional as QF

__all__ = [
    "CURVES",
    "DELETION_THRESHOLD",
    "FILLS",
    "FaithfulnessRow",
    "class_generator",
    "deletion_insertion",
]

FILLS = ("mean", "blur")
CURVES = ("deletion", "insertion")
#: Default pass threshold: deletion AUC at most this share of random order's.
DELETION_THRESHOLD = 0.3


@dataclass(frozen=True)
class FaithfulnessRow:
    """One class's deletion or insertion curve for one set of maps.

    Attributes:
        curve_map, curve_random, curve_gt_first: the mean curves, ``steps + 1`` values each
            (last in :meth:`to_dict`).
        curve: ``"deletion"`` or ``"insertion"``.
        class_index, class_name: the output channel and its name.
        fill: ``"mean"`` or ``"blur"``.
        steps: the curve has ``steps + 1`` points at fractions ``0, 1/steps, ..., 1``.
        num_images: images where the class's region is not empty.
        auc_map: area under the mean curve when pixels go in the map's order.
        auc_random: the same in random order.
        auc_gt_first: ground-truth pixels first (NaN without masks).
        ratio: ``auc_map / auc_random``: below 1 beats random for deletion, above 1 for
            insertion.
        threshold: deletion passes at ``ratio`` at most this (NaN for insertion: no verdict).
        verdict: ``"pass"``, ``"fail"`` or ``""`` (insertion, or no image).
        score_start: mean score of the untouched images (deletion) or the filled ones
            (insertion).
        floor: mean score of the fully filled images (deletion's last point, insertion's
            first): what no order can go below. A fill that keeps a class (a round leaf's
            mean colour still reads round_leaf at p 0.13 on the default run) raises every
            area by it.
        ratio_above_floor: ``(auc_map - floor) / (auc_random - floor)``: the ratio with that
            floor taken out of both areas; NaN when the random order's area above the floor is
            under 5 % of its area (the fill does not delete the class).
        labels: what the caller says the maps are (e.g. method, target, layer).
    """

    curve_map: tuple[float, ...]
    curve_random: tuple[float, ...]
    curve_gt_first: tuple[float, ...]
    curve: str
    class_index: int
    class_name: str
    fill: str
    steps: int
    num_images: int
    auc_map: float
    auc_random: float
    auc_gt_first: float
    ratio: float
    threshold: float
    verdict: str
    score_start: float
    floor: float
    ratio_above_floor: float
    labels: tuple[tuple[str, str], ...] = ()

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        """Plain JSON-ready values (NaN as ``None``, labels as keys); without the curves when
        ``curves`` is false (a CSV row)."""
        values = asdict(self)
        labels = dict(values.pop("labels"))
        means = {key: values.pop(key) for key in ("curve_map", "curve_random", "curve_gt_first")}
        out = {**labels, **values, **(means if curves else {})}
        return {k: QF.plain(v) for k, v in out.items()}


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    masks: Tensor | None = None,
    classes: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    steps: int = 16,
    fill: str = "mean",
    blur_sigma: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    readout: Readout | None = None,
    output_adapter: Callable[[Any], Tensor] | None = None,
    deletion_threshold: float = DELETION_THRESHOLD,
    labels: dict[str, str] | None = None,
) -> list[FaithfulnessRow]:
    """Deletion and insertion curves of each class, the maps' order next to random order.

    Args:
        model: the network the maps explain (never modified: eval mode, no graph, flags and RNG
            restored).
        images: ``[N, C, H, W]``.
        maps: ``[N, K, H, W]`` one map per class in ``classes`` (e.g. ``result.layer(name)``;
            for guided maps :func:`~segcam_lightning.quality.functional.guided_maps`).
        masks: ground truth, labels ``[N, H, W]`` or per-class ``[N, K_out, H, W]``; sets the
            scored region and enables the ground-truth-first order. ``None``: the model's own
            prediction on the untouched image is the region.
        classes: the output channel of each map; default ``0..K-1``.
        class_names: a name per output channel; default ``class_<k>``.
        steps: points per curve minus one.
        fill: ``"mean"`` (each image's mean colour) or ``"blur"`` (Gaussian blur).
        blur_sigma: the blur's σ in pixels; default ``H / 16`` (8 px at 128²).
        seed: seed of the random order (shared by the classes) and of each class's
            tie-breaking (see :func:`class_generator`).
        batch_size: images per forward pass.
        readout: how logits are read, as the engine does (default ``Readout()``); its
            ``ignore_index`` needs nothing here: an ignored label lies in no class's region.
        output_adapter: ``f(model_output) -> logits``.
        deletion_threshold: deletion passes at ``AUC_map / AUC_random`` at most this.
        labels: added to every row (e.g. ``{"method": "gradcam", "layer": "d4.conv.conv.5"}``).

    Returns:
        Two rows per class, deletion then insertion, in class order.

    Raises:
        ValueError: for maps that do not match the images, an unknown fill or steps < 1.
    """
    wanted = _checked_classes(images, maps, classes, fill, steps)
    device = _device(model, images)
    images, maps = images.to(device).float(), maps.to(device)
    filled = _filled(images, fill, blur_sigma)
    scorer = _Scorer.of(model, images, output_adapter, batch_size, readout)
    regions, gt_pixels = _scored_regions(scorer, images, masks, wanted)
    curves = _Curves(scorer, images, filled, _counts(images, steps), wanted, regions, gt_pixels)
    # The random order serves every class: one forward per point scores them all.
    random = curves.random(seed)
    names = [QF.class_name(class_names, k) for k in wanted]
    rows: list[FaithfulnessRow] = []
    for k, (class_index, name) in enumerate(zip(wanted, names, strict=True)):
        index = regions[:, k].flatten(1).any(dim=-1).nonzero().flatten()  # the counted images
        by_map, by_random, by_gt = curves.of_class(k, index, maps, random, seed)
        about = (class_index, name, fill, steps, int(index.numel()))
        for mode in CURVES:
            found = (by_map.get(mode), by_random.get(mode), by_gt.get(mode))
            rows.append(_row(mode, *about, *found, deletion_threshold, labels))
    return rows


def _checked_classes(
    images: Tensor, maps: Tensor, classes: Sequence[int] | None, fill: str, steps: int
) -> list[int]:
    """The output channel of each map, once the images, maps, fill and steps are checked."""
    if images.ndim != 4 or maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"Expected images [N, C, H, W] and maps [N, K, H, W], but got {list(images.shape)} "
            f"and {list(maps.shape)}."
        )
    if maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"Expected maps at the images' size {list(images.shape[-2:])}, but got "
            f"{list(maps.shape[-2:])}."
        )
    if fill not in FILLS:
        raise ValueError(f"Expected `fill` to be one of {FILLS}, but got {fill!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be a positive int, but got {steps!r}.")
    wanted = list(classes) if classes is not None else list(range(maps.shape[1]))
    if len(wanted) != maps.shape[1]:
        raise ValueError(
            f"Expected one map per class in {wanted}, but got {maps.shape[1]} maps per image."
        )
    return wanted


def _filled(images: Tensor, fill: str, blur_sigma: float | None) -> Tensor:
    """The images fully filled: each one's mean colour, or blurred (σ default ``H / 16``)."""
    if fill == "mean":
        return QF.mean_fill(images)
    return QF.blur_images(images, blur_sigma if blur_sigma is not None else images.shape[-2] / 16)


def _counts(images: Tensor, steps: int) -> list[int]:
    """Pixels perturbed at each of the ``steps + 1`` points: ``round(j H W / steps)``."""
    h, w = images.shape[-2:]
    return [round(j * h * w / steps) for j in range(steps + 1)]


@contextlib.contextmanager
def _quiet(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Forwards that leave nothing behind: no graph, eval mode, flags and RNG restored."""
    with torch.inference_mode(False), torch.no_grad(), eval_mode(model), preserve_rng(device):
        yield


@dataclass(frozen=True)
class _Scorer:
    """The model's probabilities ``[N, K_out, h, w]`` of a batch of images, in forwards of
    ``batch_size`` images (see :func:`_quiet`), read as ``readout`` says.

    Attributes:
        num_outputs, size: the logits' channels ``K_out`` and size ``(h, w)``.
    """

    model: nn.Module
    adapter: Callable[[Any], Tensor]
    batch_size: int
    device: torch.device
    readout: Readout
    num_outputs: int
    size: tuple[int, ...]

    @classmethod
    def of(
        cls,
        model: nn.Module,
        images: Tensor,
        output_adapter: Callable[[Any], Tensor] | None,
        batch_size: int,
        readout: Readout | None,
    ) -> _Scorer:
        """The scorer of ``model``: its readout resolved, its channels and size read, on the
        first image's logits."""
        adapter = output_adapter or default_output_adapter
        with _quiet(model, images.device):
            first = adapter(model(images[:1])).float()
        read = (readout or Readout()).resolved(first.shape[1])
        size = tuple(first.shape[-2:])
        return cls(model, adapter, batch_size, images.device, read, first.shape[1], size)

    @property
    def kind(self) -> str:
        return self.readout.kind

    def __call__(self, batch: Tensor) -> Tensor:
        parts = []
        with _quiet(self.model, self.device):
            for start in range(0, batch.shape[0], self.batch_size):
                logits = self.adapter(self.model(batch[start : start + self.batch_size])).float()
                parts.append(_probabilities(logits, self.kind))
        return torch.cat(parts)


def _scored_regions(
    scorer: _Scorer, images: Tensor, masks: Tensor | None, wanted: list[int]
) -> tuple[Tensor, Tensor | None]:
    """Each class's scored region ``[N, K, h, w]`` at the logits' size (its ground truth, or
    the prediction on the untouched images) and its ground-truth pixels ``[N, K, H, W]`` at
    the images' size (``None`` without masks)."""
    outputs, kind = scorer.num_outputs, scorer.kind
    if masks is None:
        predicted = _predicted_regions(scorer(images), scorer.readout)
        return class_regions(predicted, wanted, outputs, kind, size=scorer.size), None
    masks = masks.to(images.device)
    regions = class_regions(masks, wanted, outputs, kind, size=scorer.size)
    return regions, class_regions(masks, wanted, outputs, kind, size=tuple(images.shape[-2:]))


@dataclass(frozen=True)
class _Curves:
    """What every curve is read from: the scorer, the images and their fill, the pixels
    perturbed at each point, the classes, each one's scored region ``[N, K, h, w]`` and its
    ground-truth pixels ``[N, K, H, W]`` (or ``None``).

    A curve is ``[n, steps + 1]``: the class's mean probability over its region in each of
    the ``n`` counted images, at each point.
    """

    scorer: _Scorer
    images: Tensor
    filled: Tensor
    counts: list[int]
    wanted: list[int]
    regions: Tensor
    gt_pixels: Tensor | None

    def random(self, seed: int) -> dict[str, list[Tensor]]:
        """Every image's probabilities ``[N, K_out, h, w]`` at each point of each mode, pixels
        in a random order drawn from ``seed``."""
        images, filled = self.images, self.filled
        n, _, h, w = images.shape
        generator = torch.Generator().manual_seed(int(seed))
        order = QF.random_order(n, h * w, generator, images.device)
        return {
            mode: [self.scorer(QF.perturbed(images, filled, order, c, mode)) for c in self.counts]
            for mode in CURVES
        }

    def of_class(
        self, k: int, index: Tensor, maps: Tensor, random: dict[str, list[Tensor]], seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Class ``k``'s curves over the counted images ``index``, per mode: in the order of its
        maps, in random order (read from :meth:`random`'s probabilities) and ground truth
        first (``{}`` without masks); all ``{}`` when no image counts."""
        if not index.numel():
            return {}, {}, {}
        # Each class draws its tie-breaking from its own generator: its curves do not
        # depend on which other classes were asked for.
        own = class_generator(seed, self.wanted[k])
        by_map = self.of_order(QF.ranked_order(maps[index, k].float(), own), index, k)
        by_gt = {}
        if self.gt_pixels is not None:
            by_gt = self.of_order(QF.gt_first_order(self.gt_pixels[index, k], own), index, k)
        channel, region = self._channel(k), self.regions[index, k].float()
        by_random = {
            mode: torch.stack([_region_mean(p[index, channel], region) for p in points], dim=1)
            for mode, points in random.items()
        }
        return by_map, by_random, by_gt

    def of_order(self, order: Tensor, index: Tensor, k: int) -> dict[str, Tensor]:
        """Class ``k``'s curves per mode when the images ``index`` take pixels in ``order``."""
        x, base = self.images[index], self.filled[index]
        channel, region = self._channel(k), self.regions[index, k].float()
        out = {}
        for mode in CURVES:
            points = []
            for c in self.counts:
                probs = self.scorer(QF.perturbed(x, base, order, c, mode))
                points.append(_region_mean(probs[:, channel], region))
            out[mode] = torch.stack(points, dim=1)  # [n, steps + 1]
        return out

    def _channel(self, k: int) -> int:
        return _channel(self.wanted[k], self.scorer.kind)


def _region_mean(probs: Tensor, region: Tensor) -> Tensor:
    """Mean probability ``[n]`` of ``probs`` ``[n, h, w]`` over a float 0/1 ``region``."""
    return (probs * region).flatten(1).sum(1) / region.flatten(1).sum(1)


def class_generator(seed: int, class_index: int) -> torch.Generator:
    """The generator of one class's orders: map order (ties) first, then ground truth first."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 1 + int(class_index))


def _row(
    mode: str,
    class_index: int,
    name: str,
    fill: str,
    steps: int,
    num_images: int,
    by_map: Tensor | None,
    by_random: Tensor | None,
    by_gt: Tensor | None,
    deletion_threshold: float,
    labels: dict[str, str] | None,
) -> FaithfulnessRow:
    nan = float("nan")

    def mean_curve(curve: Tensor | None) -> tuple[float, ...]:
        return tuple(curve.mean(0).tolist()) if curve is not None else ()

    def area(curve: Tensor | None) -> float:
        return float(QF.curve_auc(curve).mean()) if curve is not None else nan

    auc_map, auc_random, auc_gt = area(by_map), area(by_random), area(by_gt)
    ratio = auc_map / auc_random if auc_random > 0 else nan
    end = -1 if mode == "deletion" else 0
    floor = float(by_random[:, end].mean()) if by_random is not None else nan
    above = auc_random - floor
    # A fill that leaves the class in place (blurred round leaves) keeps even the random
    # curve at its floor: the ratio would divide noise by noise.
    ratio_above_floor = (auc_map - floor) / above if above > 0.05 * auc_random else nan
    limit = deletion_threshold if mode == "deletion" else nan
    verdict = ""
    if mode == "deletion" and not math.isnan(ratio):
        verdict = "pass" if ratio <= limit else "fail"
    return FaithfulnessRow(
        curve=mode,
        class_index=class_index,
        class_name=name,
        fill=fill,
        score_start=float(by_map[:, 0].mean()) if by_map is not None else nan,
        steps=steps,
        num_images=num_images,
        auc_map=auc_map,
        curve_map=mean_curve(by_map),
        auc_random=auc_random,
        curve_random=mean_curve(by_random),
        auc_gt_first=auc_gt,
        curve_gt_first=mean_curve(by_gt),
        ratio=ratio,
        threshold=limit,
        verdict=verdict,
        floor=floor,
        ratio_above_floor=ratio_above_floor,
        labels=tuple((str(k), str(v)) for k, v in (labels or {}).items()),
    )


def _probabilities(logits: Tensor, kind: str) -> Tensor:
    return logits.softmax(dim=1) if kind == "multiclass" else logits.sigmoid()


def _predicted_regions(probs: Tensor, readout: Readout) -> Tensor:
    """Predicted labels ``[N, h, w]`` (multiclass) or masks ``[N, K, h, w]`` from
    probabilities."""
    if readout.kind == "multiclass":
        return predicted_masks(probs.log(), readout.kind)
    return probs > readout.threshold


def _channel(class_index: int, kind: str) -> int:
    return 0 if kind == "binary" else class_index


def _device(model: nn.Module, images: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return images.device
