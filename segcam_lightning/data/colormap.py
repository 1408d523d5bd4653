"""Colour masks ↔ class-index masks, in cv2's BGR channel order.

A colormap is a sequence of ``(b, g, r)`` triples, one per class: entry ``k`` is the colour of
class ``k`` in a mask *as cv2 reads it* (``cv2.imread(path, cv2.IMREAD_COLOR)`` gives BGR).
This is how the blog post matched its masks, so its colormap
``[[0, 0, 0], [0, 0, 128], [0, 128, 0]]`` means black, red (RGB ``128, 0, 0``) and green — not
black, blue and green.

Example:
    >>> import numpy as np
    >>> mask = np.array([[0, 1], [2, 1]])
    >>> bgr = mask_to_color(mask, BLOG_COLORMAP)
    >>> bgr[0, 1].tolist()  # class 1 is red: BGR (0, 0, 128)
    [0, 0, 128]
    >>> back, n_unknown, unknown = color_to_mask(bgr, BLOG_COLORMAP)
    >>> bool((back == mask).all()), n_unknown, unknown
    (True, 0, set())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The blog's colormap in cv2's BGR order: class 0 black, class 1 red, class 2 green.
BLOG_COLORMAP: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (0, 0, 128), (0, 128, 0))

Colormap = Sequence[Sequence[int]]


def validate_colormap(colormap: Colormap) -> tuple[tuple[int, int, int], ...]:
    """Check a colormap and return it as a tuple of ``(b, g, r)`` int triples.

    Args:
        colormap: one ``(b, g, r)`` triple per class, each value an integer in ``[0, 255]``.

    Returns:
        The colormap as a tuple of tuples of Python ints.

    Raises:
        ValueError: if it is empty, an entry is not three integers in ``[0, 255]``, or two
            classes share a colour.
    """
    entries = [tuple(entry) for entry in colormap]
    if not entries:
        raise ValueError("Expected a colormap with at least one (b, g, r) entry, but got none.")
    for k, entry in enumerate(entries):
        if len(entry) != 3 or not all(_is_byte(v) for v in entry):
            raise ValueError(
                f"Expected colormap entry {k} to be three integers in [0, 255] in BGR order, "
                f"but got {list(entry)}."
            )
    result = tuple(tuple(int(v) for v in entry) for entry in entries)
    seen: dict[tuple[int, ...], int] = {}
    for k, entry in enumerate(result):
        if entry in seen:
            raise ValueError(
                f"Expected one colour per class, but classes {seen[entry]} and {k} share the "
                f"colour {list(entry)}."
            )
        seen[entry] = k
    return result  # type: ignore[return-value]


def _is_byte(value: object) -> bool:
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    return is_int and 0 <= int(value) <= 255  # type: ignore[call-overload]


def _pack(bgr: np.ndarray) -> np.ndarray:
    """Pack ``[..., 3]`` uint8 BGR into one int32 per pixel, so colours compare as numbers."""
    bgr = bgr.astype(np.int32, copy=False)
    return (bgr[..., 0] << 16) | (bgr[..., 1] << 8) | bgr[..., 2]


def _unpack(keys: np.ndarray) -> list[tuple[int, int, int]]:
    return [(int(k >> 16) & 255, int(k >> 8) & 255, int(k) & 255) for k in keys]


def mask_to_color(mask: np.ndarray, colormap: Colormap) -> np.ndarray:
    """Paint a class-index mask with a colormap.

    Args:
        mask: ``[H, W]`` integer class indices, each in ``[0, len(colormap))``.
        colormap: one ``(b, g, r)`` triple per class.

    Returns:
        ``[H, W, 3]`` uint8 image in BGR order, ready for ``cv2.imwrite``.

    Raises:
        ValueError: if ``mask`` is not 2-D integer or holds an index without a colour.
    """
    lut = np.asarray(validate_colormap(colormap), dtype=np.uint8)
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"Expected an integer mask of shape [H, W], but got dtype {mask.dtype} and shape "
            f"{list(mask.shape)}."
        )
    if mask.size and (mask.min() < 0 or mask.max() >= len(lut)):
        bad = np.unique(mask[(mask < 0) | (mask >= len(lut))])
        raise ValueError(
            f"Expected class indices in [0, {len(lut)}) for a colormap of {len(lut)} colours, "
            f"but the mask holds {bad[:10].tolist()}."
        )
    return lut[mask]


def color_to_mask(
    bgr: np.ndarray, colormap: Colormap, unknown_index: int | None = None
) -> tuple[np.ndarray, int, set[tuple[int, int, int]]]:
    """Map each pixel's exact BGR colour to its class index.

    Args:
        bgr: ``[H, W, 3]`` uint8 colour mask as ``cv2.imread(path, cv2.IMREAD_COLOR)`` returns it.
        colormap: one ``(b, g, r)`` triple per class.
        unknown_index: index given to pixels whose colour is not in the colormap;
            ``None`` gives them ``-1`` so that the caller can decide to raise.

    Returns:
        A tuple ``(mask, n_unknown, unknown_colors)``: the ``[H, W]`` int64 class indices, the
        number of pixels whose colour is not in the colormap, and the set of those ``(b, g, r)``
        colours.

    Raises:
        ValueError: if ``bgr`` is not ``[H, W, 3]``.
    """
    cmap = validate_colormap(colormap)
    bgr = np.asarray(bgr)
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"Expected a BGR mask of shape [H, W, 3], but got {list(bgr.shape)}.")
    keys = _pack(bgr)
    table = _pack(np.asarray(cmap, dtype=np.int32))
    order = np.argsort(table)
    sorted_table = table[order]
    pos = np.minimum(np.searchsorted(sorted_table, keys), len(sorted_table) - 1)
    known = sorted_table[pos] == keys
    mask = order[pos].astype(np.int64)
    n_unknown = int(known.size - np.count_nonzero(known))
    unknown_colors: set[tuple[int, int, int]] = set()
    if n_unknown:
        unknown_colors = set(_unpack(np.unique(keys[~known])))
        mask[~known] = -1 if unknown_index is None else unknown_index
    return mask, n_unknown, unknown_colors
