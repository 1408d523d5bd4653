"""Overlays, the blog's panels and labelled grids of CAMs: uint8 RGB images out, OpenCV inside.

Everything here takes CPU arrays/tensors (:func:`grid_tiles` also the maps' device, where
:mod:`segcam_lightning.overlays` composes them) and returns ``uint8`` arrays ``[H, W, 3]`` in
RGB order (what TensorBoard and PNG writers expect after ``cv2.cvtColor``). Colour maps are
OpenCV's (``cv2.COLORMAP_*``); the blog's overlay is ``addWeighted(image, 0.4, JET(cam), 0.6)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch

from segcam_lightning.data.colormap import BLOG_COLORMAP, mask_to_color
from segcam_lightning.overlays import Painter, colormap_table, label_colors, uint8_images

SEPARATOR = 10  # the blog's white gap between panel tiles, in pixels


@contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's own thread count set to ``count`` for a block, restored afterwards.

    Use ``1`` around a block that renders from several Python threads and forks DataLoader
    workers: the render threads are the parallelism, and a worker forked while OpenCV's pool
    holds state from other threads hangs at its first ``cv2.setNumThreads`` call (OpenCV's
    pthreads backend). Workers inherit the setting, so they need not call it themselves.
    """
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def class_palette(
    colormap: Sequence[Sequence[int]] | None, num_classes: int
) -> list[tuple[int, int, int]]:
    """BGR colours for ``num_classes`` classes: the data's ``colormap`` when it has one per
    class, else the blog's for up to three classes, else black and evenly spaced hues."""
    if colormap is not None and len(colormap) >= num_classes:
        return [tuple(int(v) for v in c) for c in colormap]  # type: ignore[misc]
    if num_classes <= len(BLOG_COLORMAP):
        return [tuple(c) for c in BLOG_COLORMAP]  # type: ignore[misc]
    hues = np.linspace(0, 179, num_classes, endpoint=False).astype(np.uint8)
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)], -1)[None]
    palette = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]
    return [(0, 0, 0)] + [tuple(int(v) for v in c) for c in palette[1:]]  # type: ignore[misc]


def data_attribute(data: Any, name: str) -> Any:
    """``data.image_<name>`` / ``data.<name>`` or the same hyperparameter, else ``None``: how a
    data module (or module) says its images were normalised (``mean``, ``std``) and ordered
    (``channel_order``), for :func:`display_images`."""
    if data is None:
        return None
    hparams = getattr(data, "hparams", {}) or {}
    for key in (f"image_{name}", name):
        value = getattr(data, key, None)
        if value is None and isinstance(hparams, Mapping):
            value = hparams.get(key)
        if value is not None and not callable(value):
            return value
    return None


def display_images(
    images: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channel_order: str = "rgb",
) -> torch.Tensor:
    """Model inputs as the pictures they are: ``[B, C, H, W]`` → RGB ``[B, 3, H, W]`` in [0, 1],
    or volumes ``[B, C, D, H, W]`` → ``[B, 3, D, H, W]``.

    Undoes the data's normalisation (``x * std + mean``, per channel), puts BGR inputs in RGB
    order and shows one-channel inputs (a grayscale photo, a CT or MRI slice) as gray. Inputs
    with more than three channels show their first three.

    Without ``mean``/``std``, images already in [0, 1] are shown as they are; images outside
    it (normalised by a transform the caller did not name, or in 0..255) are min-max stretched
    per image, so they show their content rather than clipped noise: a volume once as a whole,
    so that its slices in every view share one intensity scale.

    Args:
        images: ``[B, C, H, W]`` or ``[B, C, D, H, W]`` float.
        mean: the normalisation's per-channel mean (one value, or ``C``).
        std: the normalisation's per-channel standard deviation (one value, or ``C``).
        channel_order: ``"rgb"`` or ``"bgr"``, the inputs' channel order.

    Returns:
        ``[B, 3, *spatial]`` float32 in [0, 1] on the CPU.

    Raises:
        ValueError: for a ``mean``/``std`` that matches neither 1 nor ``C`` channels, a zero
            ``std`` or an unknown ``channel_order``.
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"Expected `channel_order` 'rgb' or 'bgr', but got {channel_order!r}.")
    if images.ndim not in (4, 5):
        raise ValueError(
            "Expected images [B, C, H, W] or volumes [B, C, D, H, W], but got shape "
            f"{list(images.shape)}."
        )
    x = images.detach().float().cpu()
    channels = x.shape[1]
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    if mean is not None or std is not None:
        m = _per_channel("image_mean", 0.0 if mean is None else mean, channels)
        s = _per_channel("image_std", 1.0 if std is None else std, channels)
        if (s == 0).any():
            raise ValueError(f"Expected a non-zero `image_std`, but got {s.tolist()}.")
        x = x * s.view(per_channel) + m.view(per_channel)
    elif x.numel() and (x.amin() < -1e-3 or x.amax() > 1 + 1e-3):
        each = tuple(range(1, x.ndim))  # one scale per image or volume, all its channels
        lo = x.amin(dim=each, keepdim=True)
        span = x.amax(dim=each, keepdim=True) - lo
        x = torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), 0.0)
    if channels >= 3:
        x = x[:, :3]
        if channel_order == "bgr":
            x = x.flip(1)
    else:
        x = x[:, :1].expand(-1, 3, *x.shape[2:])
    return x.clamp(0.0, 1.0).contiguous()


def _per_channel(name: str, values: float | Sequence[float], channels: int) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if tensor.numel() == 1:
        return tensor.expand(channels)
    if tensor.numel() != channels:
        raise ValueError(
            f"Expected `{name}` with one value or one per input channel ({channels}), but got "
            f"{tensor.tolist()}."
        )
    return tensor


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``[3, H, W]`` float image in [0, 1] (or ``[H, W, 3]`` uint8) as ``[H, W, 3]`` uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


#: PNG settings for pictures written at every validation (the callback's grids): zlib level 1
#: with run-length matching after the "up" filter. On the default run's grids this encodes
#: 4.3x faster than TensorBoard's own PNG writer (PIL) for 4 % more bytes, and, PNG being
#: lossless, the same pixels (``python benchmarks/bench_encoding.py``, benchmarks/RESULTS.md).
PNG_FAST = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    *(
        (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP)
        if hasattr(cv2, "IMWRITE_PNG_FILTER")
        else ()
    ),
]


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image ``[H, W, 3]`` as PNG bytes (:data:`PNG_FAST`). The channels are
    swapped with NumPy, not ``cv2.cvtColor``: this runs on the callback's picture worker, where
    OpenCV's thread pool must stay unused (a DataLoader worker forked meanwhile would inherit
    it locked)."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), PNG_FAST)
    if not ok:
        raise OSError(f"cv2 could not encode a {rgb.shape} {rgb.dtype} image as PNG.")
    return encoded.tobytes()


def _apply_colormap(scaled: np.ndarray, colormap: int | np.ndarray) -> np.ndarray:
    """``cv2.applyColorMap`` in RGB; ``colormap``: a built-in id or a ``[256, 1, 3]`` BGR table."""
    if isinstance(colormap, np.ndarray):
        return cv2.cvtColor(cv2.applyColorMap(scaled, colormap), cv2.COLOR_BGR2RGB)
    return cv2.applyColorMap(scaled, colormap_table(int(colormap)))


def colorize_cam(
    cam: torch.Tensor | np.ndarray, colormap: int | np.ndarray = cv2.COLORMAP_JET
) -> np.ndarray:
    """A map ``[H, W]`` in [0, 1] through an OpenCV colour map (an id such as
    ``cv2.COLORMAP_JET``, or a ``[256, 1, 3]`` BGR table), as RGB uint8 ``[H, W, 3]``."""
    if isinstance(cam, torch.Tensor):
        cam = cam.detach().float().cpu().numpy()
    scaled = np.clip(cam * 255.0, 0, 255).astype(np.uint8)
    return _apply_colormap(scaled, colormap)


def overlay_cam(
    image: np.ndarray,
    cam: torch.Tensor | np.ndarray,
    alpha: float = 0.4,
    colormap: int | np.ndarray = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend a CAM over an image as the blog post did: ``alpha * image + (1 - alpha) * heatmap``.

    Args:
        image: RGB uint8 ``[H, W, 3]``.
        cam: map ``[H, W]`` in [0, 1], same size as ``image``.
        alpha: weight of the image (blog: 0.4).
        colormap: an OpenCV colour map id (blog: ``cv2.COLORMAP_JET``).
    """
    heatmap = colorize_cam(cam, colormap)
    return cv2.addWeighted(image, alpha, heatmap, 1.0 - alpha, 0)


def colorize_mask(mask: torch.Tensor | np.ndarray, colormap: Sequence[Sequence[int]]) -> np.ndarray:
    """A class-index mask ``[H, W]`` in its dataset's BGR colormap, returned as RGB uint8."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return cv2.cvtColor(mask_to_color(mask, colormap), cv2.COLOR_BGR2RGB)


def hstack_with_separators(tiles: Sequence[np.ndarray], gap: int = SEPARATOR) -> np.ndarray:
    """Tiles of equal height side by side with ``gap`` white pixels between them."""
    height = tiles[0].shape[0]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, tile in enumerate(tiles):
        if i:
            parts.append(spacer)
        parts.append(tile)
    return np.concatenate(parts, axis=1)


def blog_panel(image: np.ndarray, overlay: np.ndarray, binary_mask: np.ndarray) -> np.ndarray:
    """The blog's panel: image | overlay | binary GT mask (white on black), 10 px white gaps."""
    gt = np.repeat((binary_mask.astype(bool) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return hstack_with_separators([image, overlay, gt])


def blog_panels(
    image: np.ndarray,
    cams: np.ndarray,
    binary_masks: np.ndarray | None = None,
    alpha: float = 0.4,
    colormap: int | np.ndarray = cv2.COLORMAP_JET,
    gap: int = SEPARATOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Every class's blog panel of one image at once (one OpenCV call per step, not per class).

    Args:
        image: RGB uint8 ``[H, W, 3]``.
        cams: ``[N, H, W]`` maps in [0, 1].
        binary_masks: ``[N, H, W]`` ground-truth regions, or ``None`` (panels are then
            image | overlay).
        alpha: weight of the image in the overlays (blog: 0.4).
        colormap: an OpenCV colour map id.
        gap: white pixels between tiles.

    Returns:
        ``(panels [N, H, W_panel, 3], overlays [N, H, W, 3])``, equal to :func:`blog_panel` (or
        :func:`hstack_with_separators` without masks) and :func:`overlay_cam` per map.
    """
    n, h, w = cams.shape
    scaled = np.clip(cams * 255.0, 0, 255).astype(np.uint8).reshape(n * h, w)
    heat = _apply_colormap(scaled, colormap)
    tiled = np.ascontiguousarray(np.broadcast_to(image, (n, h, w, 3))).reshape(n * h, w, 3)
    overlays = cv2.addWeighted(tiled, alpha, heat, 1.0 - alpha, 0).reshape(n, h, w, 3)
    return panel_layout(image, overlays, binary_masks, gap), overlays


def panel_layout(
    image: np.ndarray,
    overlays: np.ndarray,
    binary_masks: np.ndarray | None = None,
    gap: int = SEPARATOR,
) -> np.ndarray:
    """The blog's panels from composed overlays (:func:`blog_panels` without the blending):
    ``image`` RGB uint8 ``[H, W, 3]``, ``overlays`` ``[N, H, W, 3]``, ``binary_masks``
    ``[N, H, W]`` or ``None``; returns ``[N, H, W_panel, 3]``."""
    n, h, w = overlays.shape[:3]
    tiles = 2 if binary_masks is None else 3
    panels = np.full((n, h, tiles * w + (tiles - 1) * gap, 3), 255, dtype=np.uint8)
    panels[:, :, :w] = image
    panels[:, :, w + gap : 2 * w + gap] = overlays
    if binary_masks is not None:
        panels[:, :, 2 * (w + gap) :] = (binary_masks.astype(bool) * np.uint8(255))[..., None]
    return panels


def _title_bar(text: str, width: int, height: int) -> np.ndarray:
    bar = np.full((height, width, 3), 255, dtype=np.uint8)
    scale = height / 40.0
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    while tw > width - 4 and scale > 0.25:
        scale *= 0.9
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    full, keep = text, len(text)
    while keep and tw > width - 4:  # still too wide at the smallest font: shortened, not cut
        keep -= 1
        text = full[:keep] + ".."
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    origin = (max((width - tw) // 2, 2), (height + th) // 2)
    cv2.putText(bar, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def cam_grid(
    images: torch.Tensor,
    cams: torch.Tensor,
    class_names: Sequence[str],
    colormap: Sequence[Sequence[int]],
    masks: torch.Tensor | None = None,
    preds: torch.Tensor | None = None,
    alpha: float = 0.4,
    cam_colormap: int = cv2.COLORMAP_JET,
    gap: int = 4,
    legend: Sequence[str] | None = None,
    notes: Sequence[Sequence[str]] | None = None,
    row_notes: Sequence[str] | None = None,
) -> np.ndarray:
    """One labelled grid: a row per image, columns input | ground truth | prediction | one overlay
    per class, a title row naming the columns and a footer with the class colours and the CAM
    colour bar.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1], RGB.
        cams: ``[B, K, H, W]`` in [0, 1], one map per class in ``class_names`` order.
        class_names: ``K`` names for the overlay columns.
        colormap: BGR colours (indexed by label) for masks and predictions.
        masks: ground truth labels ``[B, H, W]`` or ``None`` (column left out).
        preds: predicted labels ``[B, H, W]`` or ``None`` (column left out).
        alpha: image weight in the overlays.
        cam_colormap: OpenCV colour map for the CAMs.
        gap: white pixels between tiles.
        legend: a name per label of ``colormap`` for the footer's colour key (``None``: no key).
        notes: per image, one short text per overlay column written on the tile (e.g.
            ``"absent"`` where the class is neither in the ground truth nor predicted, whose
            min-max normalised map shows noise at full range); ``""`` for none.
        row_notes: per image, a short text written on its input tile (e.g. the view and slice
            of a volume); ``""`` for none.

    Returns:
        RGB uint8 ``[rows, cols, 3]``.
    """
    if cams.shape[1] != len(class_names):
        raise ValueError(
            f"Expected one class name per CAM channel ({cams.shape[1]}), but got"
            f" {len(class_names)}: {list(class_names)}."
        )
    tiles = grid_tiles(images, cams, colormap, masks, preds, Painter(alpha, cam_colormap))
    return tiled_grid(tiles, class_names, colormap, gap, legend, notes, row_notes, cam_colormap)


@dataclass(frozen=True)
class GridTiles:
    """The pictures of a grid's rows, RGB uint8 on the CPU: ``images`` ``[B, H, W, 3]``,
    ``overlays`` ``[B, *M, H, W, 3]`` (one per map), ``masks`` and ``preds`` ``[B, H, W, 3]``
    painted with the label colours, or ``None`` (column left out)."""

    images: np.ndarray
    overlays: np.ndarray
    masks: np.ndarray | None = None
    preds: np.ndarray | None = None

    def maps(self, *at: int | slice) -> GridTiles:
        """The same rows with the overlays ``overlays[:, *at]`` (one layer's, one class's)."""
        return replace(self, overlays=self.overlays[(slice(None), *at)])


def grid_tiles(
    images: torch.Tensor,
    cams: torch.Tensor,
    colormap: Sequence[Sequence[int]],
    masks: torch.Tensor | None,
    preds: torch.Tensor | None,
    painter: Painter,
) -> GridTiles:
    """A grid's pictures composed on the maps' device (:mod:`segcam_lightning.overlays`), then
    copied to the CPU once: ``images`` ``[B, 3, H, W]`` in [0, 1], ``cams`` ``[B, *M, H, W]``
    in [0, 1], ``masks``/``preds`` labels ``[B, H, W]`` (each with a colour in
    ``colormap``)."""
    device = cams.device
    shown = uint8_images(images.to(device))

    def painted(labels: torch.Tensor | None) -> np.ndarray | None:
        return (
            label_colors(labels.to(device), colormap).cpu().numpy() if labels is not None else None
        )

    overlays = painter.overlays(shown, cams).cpu().numpy()
    return GridTiles(shown.cpu().numpy(), overlays, painted(masks), painted(preds))


def tiled_grid(
    tiles: GridTiles,
    class_names: Sequence[str],
    colormap: Sequence[Sequence[int]],
    gap: int = 4,
    legend: Sequence[str] | None = None,
    notes: Sequence[Sequence[str]] | None = None,
    row_notes: Sequence[str] | None = None,
    cam_colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """:func:`cam_grid` from its composed pictures (``tiles.overlays`` ``[B, K, H, W, 3]``, one
    per class in ``class_names``): the titles, the notes, the footer and the layout, on the
    CPU."""
    titles = ["input"]
    if tiles.masks is not None:
        titles.append("ground truth")
    if tiles.preds is not None:
        titles.append("prediction")
    titles += [f"CAM {name}" for name in class_names]
    width = tiles.images.shape[2]
    bar_height = max(16, min(32, width // 6))
    rows = [hstack_with_separators([_title_bar(t, width, bar_height) for t in titles], gap)]
    for b, image in enumerate(tiles.images):
        shown = image.copy() if row_notes is not None and row_notes[b] else image
        if shown is not image:
            _note(shown, row_notes[b], bar_height)  # type: ignore[index]
        row = [shown, *[t[b] for t in (tiles.masks, tiles.preds) if t is not None]]
        for k in range(len(class_names)):
            tile = tiles.overlays[b, k]
            if notes is not None and notes[b][k]:
                tile = tile.copy()
                _note(tile, notes[b][k], bar_height)
            row.append(tile)
        rows.append(hstack_with_separators(row, gap))
    total_width = rows[0].shape[1]
    footer = _footer(total_width, width, bar_height, colormap, legend, cam_colormap)
    spacer = np.full((gap, total_width, 3), 255, dtype=np.uint8)
    out: list[np.ndarray] = []
    for i, row in enumerate([*rows, footer]):
        if i > 1:
            out.append(spacer)
        out.append(row)
    return np.concatenate(out, axis=0)


def _note(tile: np.ndarray, text: str, height: int) -> None:
    """Write ``text`` in the tile's top-left corner, white on black, in place."""
    scale = height / 48.0
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    while tw > tile.shape[1] - 4 and scale > 0.2:
        scale *= 0.9
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(tile, (0, 0), (tw + 4, th + baseline + 3), (0, 0, 0), thickness=-1)
    cv2.putText(
        tile, text, (2, th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
    )


#: Smallest font scale of the grids' colour key: below it, the key wraps to more lines.
LEGEND_MIN_SCALE = 0.3
#: Narrowest room, in pixels, beside the CAM colour bar for the colour key; with less, the key
#: goes under the bar, across the whole footer.
_LEGEND_MIN_ROOM = 48
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _legend_lines(
    names: Sequence[str], room: int, scale: float
) -> tuple[float, list[list[tuple[int, str]]]]:
    """The key's font scale and its lines of ``(label, text)``: the scale shrinks (to
    :data:`LEGEND_MIN_SCALE`) until every item fits on one line of ``room`` pixels, then the
    items wrap to more lines; a name wider than a line on its own is shortened with ``..``."""
    floor = min(scale, LEGEND_MIN_SCALE)

    def width(text: str, at: float) -> int:
        (tw, th), _ = cv2.getTextSize(text, _FONT, at, 1)
        return max(th, 6) + 3 + tw

    while scale > floor and sum(width(n, scale) + 8 for n in names) - 8 > room:
        scale = max(scale * 0.9, floor)
    lines: list[list[tuple[int, str]]] = [[]]
    x = 0
    for label, name in enumerate(names):
        text, keep = name, len(name)
        while keep and width(text, scale) > room:
            keep -= 1
            text = name[:keep] + ".."
        if lines[-1] and x + width(text, scale) > room:
            lines.append([])
            x = 0
        lines[-1].append((label, text))
        x += width(text, scale) + 8
    return scale, lines


def _footer(
    total_width: int,
    tile_width: int,
    height: int,
    colormap: Sequence[Sequence[int]],
    legend: Sequence[str] | None,
    cam_colormap: int,
) -> np.ndarray:
    """The key under a grid: class colours on the left, the CAM colour bar (0 to 1) on the
    right, under the last overlay column. Every class of ``legend`` is keyed: the font shrinks
    to a floor, then the key wraps to more lines and the footer grows (``height`` per line at
    the default size, less for a smaller font)."""
    black = (0, 0, 0)
    bar_left = max(total_width - tile_width, 0)
    names = [str(n) for n in legend or ()]
    room, below = bar_left - 6, False
    if names and room < _LEGEND_MIN_ROOM:
        room, below = total_width - 4, True
    scale, lines = _legend_lines(names, room, height / 40.0) if names else (0.0, [])
    (_, text_height), text_base = cv2.getTextSize("Ag", _FONT, scale or 1.0, 1)
    single = len(lines) == 1 and not below
    line_height = height if single else max(text_height + text_base + 4, 10)
    top = height if below else 0
    footer_height = max(height, top + len(lines) * line_height)
    footer = np.full((footer_height, total_width, 3), 255, dtype=np.uint8)
    for row, items in enumerate(lines):
        y, x = top + row * line_height, 2
        for label, text in items:
            (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
            size = max(th, 6)
            b, g, r = (int(v) for v in colormap[label])
            corner = y + (line_height - size) // 2
            cv2.rectangle(footer, (x, corner), (x + size, corner + size), (r, g, b), thickness=-1)
            cv2.rectangle(footer, (x, corner), (x + size, corner + size), (120, 120, 120), 1)
            baseline = y + (line_height + th) // 2
            cv2.putText(footer, text, (x + size + 3, baseline), _FONT, scale, black, 1, cv2.LINE_AA)
            x += size + 3 + tw + 8
    scale = height / 40.0
    (zw, th), _ = cv2.getTextSize("0", _FONT, scale, 1)
    (ow, _), _ = cv2.getTextSize("1", _FONT, scale, 1)
    left = bar_left + zw + 4
    bar_width = min(tile_width - zw - ow - 8, total_width - left - ow - 3)
    if bar_width < 8:
        return footer  # tiles too narrow for a readable colour bar
    ramp = np.linspace(0.0, 1.0, bar_width, dtype=np.float32)[None].repeat(max(height // 2, 4), 0)
    bar = colorize_cam(ramp, cam_colormap)
    corner = (height - bar.shape[0]) // 2
    footer[corner : corner + bar.shape[0], left : left + bar_width] = bar
    baseline = (height + th) // 2
    cv2.putText(footer, "0", (bar_left + 1, baseline), _FONT, scale, black, 1, cv2.LINE_AA)
    cv2.putText(footer, "1", (left + bar_width + 3, baseline), _FONT, scale, black, 1, cv2.LINE_AA)
    return footer


#: The three orthogonal views of a volume ``[D, H, W]``, in :func:`volume_slices`' order.
VIEWS = ("axial", "coronal", "sagittal")


def peak_voxel(cam: torch.Tensor) -> tuple[int, int, int]:
    """``(d, h, w)`` of a map's maximum ``[D, H, W]`` (the first one; the centre for a map that
    is zero everywhere, which has no peak to point at)."""
    if cam.ndim != 3:
        raise ValueError(f"Expected a map [D, H, W], but got shape {list(cam.shape)}.")
    if not bool((cam > 0).any()):
        return tuple(n // 2 for n in cam.shape)  # type: ignore[return-value]
    flat = int(cam.reshape(-1).argmax())
    depth, rest = divmod(flat, cam.shape[1] * cam.shape[2])
    return depth, *divmod(rest, cam.shape[2])  # type: ignore[return-value]


def volume_slices(
    volume: torch.Tensor,
    index: Sequence[int],
    size: tuple[int, int],
    labels: bool = False,
) -> torch.Tensor:
    """The axial, coronal and sagittal slices of ``volume`` ``[..., D, H, W]`` through
    ``index`` ``(d, h, w)``, each resized to ``size``: ``[3, ..., *size]``.

    Axial slices are ``[H, W]`` at depth ``d``, coronal ``[D, W]`` at row ``h``, sagittal
    ``[D, H]`` at column ``w``; a slice's rows follow its first remaining axis. Labels are
    resized by nearest neighbour (never blended), images and maps bilinearly.
    """
    d, h, w = (int(i) for i in index)
    views = [volume[..., d, :, :], volume[..., :, h, :], volume[..., :, :, w]]
    out = []
    for view in views:
        if tuple(view.shape[-2:]) != tuple(size):
            lead = view.shape[:-2]
            flat = view.reshape(-1, 1, *view.shape[-2:]).float()
            mode = "nearest-exact" if labels else "bilinear"
            options = {} if labels else {"align_corners": False}
            flat = torch.nn.functional.interpolate(flat, size=size, mode=mode, **options)
            view = flat.reshape(*lead, *size).to(volume.dtype)
        out.append(view)
    return torch.stack(out)


#: Smallest side, in pixels, of a volume slice's tile in :func:`volume_grid`.
VOLUME_TILE = 96


def volume_grid(
    volumes: torch.Tensor,
    cams: torch.Tensor,
    class_name: str,
    colormap: Sequence[Sequence[int]],
    masks: torch.Tensor | None = None,
    preds: torch.Tensor | None = None,
    at: Sequence[int] | None = None,
    **grid_options: object,
) -> np.ndarray:
    """:func:`cam_grid` for volumes: three rows per volume, its axial, coronal and sagittal
    slices through the class's CAM peak (or through the voxel ``at``), each labelled on its
    input tile with the view and the slice (``ax z=12``, ``cor y=5``, ``sag x=30``). Slices
    are resized to the volume's largest side, times the smallest whole number that makes it at
    least :data:`VOLUME_TILE` pixels (a 32³ volume's tiles are 96 px).

    Args:
        volumes: ``[N, 3, D, H, W]`` float in [0, 1], RGB (gray volumes repeated to 3 channels).
        cams: ``[N, D, H, W]`` the class's maps in [0, 1].
        class_name: the overlay column's name.
        colormap: BGR colours (indexed by label) for masks and predictions.
        masks: ground-truth labels ``[N, D, H, W]`` or ``None``.
        preds: predicted labels ``[N, D, H, W]`` or ``None``.
        at: ``(d, h, w)`` to slice every volume at, instead of each map's peak.
        grid_options: passed to :func:`cam_grid` (``alpha``, ``legend``, ``notes`` per volume,
            ...); ``notes`` given per volume apply to its three rows.

    Returns:
        RGB uint8 ``[rows, cols, 3]``.
    """
    side = max(volumes.shape[-3:])
    # Small volumes are shown at a whole multiple of their side, at least VOLUME_TILE pixels:
    # a 32-voxel slice is too small for its label and for the eye.
    side *= -(-VOLUME_TILE // side)
    size = (side, side)
    rows: dict[str, list[torch.Tensor]] = {"images": [], "cams": [], "masks": [], "preds": []}
    titles = []
    for n in range(volumes.shape[0]):
        index = tuple(at) if at is not None else peak_voxel(cams[n])
        rows["images"].append(volume_slices(volumes[n], index, size))
        rows["cams"].append(volume_slices(cams[n], index, size)[:, None])
        if masks is not None:
            rows["masks"].append(volume_slices(masks[n], index, size, labels=True))
        if preds is not None:
            rows["preds"].append(volume_slices(preds[n], index, size, labels=True))
        titles += [
            f"{short} {axis}={i}"
            for short, axis, i in zip(("ax", "cor", "sag"), "zyx", index, strict=True)
        ]
    notes = grid_options.pop("notes", None)
    if notes is not None:
        grid_options["notes"] = [note for note in notes for _ in VIEWS]  # type: ignore[union-attr]
    return cam_grid(
        torch.cat(rows["images"]),
        torch.cat(rows["cams"]),
        [class_name],
        colormap,
        masks=torch.cat(rows["masks"]) if masks is not None else None,
        preds=torch.cat(rows["preds"]) if preds is not None else None,
        row_notes=titles,
        **grid_options,  # type: ignore[arg-type]
    )
