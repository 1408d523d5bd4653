"""Overlays composed as tensor operations, on the device the maps are on.

The grids of :class:`~segcam_lightning.callbacks.GradCAMCallback` and the audit's panels colour
each map through an OpenCV colour map and blend it over its image as the blog's
``cv2.addWeighted(image, alpha, heatmap, 1 - alpha, 0)`` does. Here both steps are table
lookups (gathers), so they run where the maps are (the GPU when there is one) and the CPU only
lays the tiles out and encodes them:

- the colour table is OpenCV's own map of the 256 levels (what ``cv2.applyColorMap`` reads);
- the blend table holds ``cv2.addWeighted`` of every pair of 8-bit values: OpenCV blends each
  value on its own and gives a pair the same result wherever it sits in an image (checked in
  ``tests/test_overlays.py``), so a lookup gives its pixels exactly.

The tables are built once per ``(alpha, colour map)`` and copied once to each device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["Painter", "blend_table", "colormap_table", "label_colors", "uint8_images"]

#: Elements of the int64 lookup index built at once (a chunk of maps): 32 MiB, whatever the
#: number of maps, classes and layers.
_CHUNK_ELEMENTS = 1 << 22


@lru_cache(maxsize=32)
def colormap_table(colormap: int) -> np.ndarray:
    """OpenCV's colour map ``colormap`` (``cv2.COLORMAP_*``) as a ``[256, 1, 3]`` RGB table, as
    ``cv2.applyColorMap`` takes it.

    ``applyColorMap`` with a built-in map id rebuilds its table on every call, which costs more
    than colouring a 128² map with a table, so the table is built once.
    """
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    table = np.ascontiguousarray(cv2.applyColorMap(ramp, colormap)[:, :, ::-1])
    table.flags.writeable = False
    return table


@lru_cache(maxsize=32)
def blend_table(alpha: float) -> np.ndarray:
    """``cv2.addWeighted(a, alpha, b, 1 - alpha, 0)`` for every pair of 8-bit values, as a flat
    ``[256 * 256]`` uint8 table indexed by ``a * 256 + b``."""
    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(-1, 1)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(-1, 1)
    table = np.ascontiguousarray(cv2.addWeighted(a, alpha, b, 1.0 - alpha, 0)[:, 0])
    table.flags.writeable = False
    return table


def scaled_maps(cams: Tensor) -> Tensor:
    """Maps in [0, 1] as the colour map's 8-bit levels: ``uint8(clip(cam * 255, 0, 255))``, in
    float32 and truncated, as :func:`~segcam_lightning.render.colorize_cam` does in NumPy."""
    return (cams.float() * 255.0).clamp_(0, 255).to(torch.uint8)


def uint8_images(images: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in [0, 1] (``C`` 1 or 3) as ``[N, H, W, 3]`` uint8, rounded as
    :func:`~segcam_lightning.render.to_uint8_image` does; uint8 ``[N, H, W, 3]`` passes."""
    if images.dtype == torch.uint8 and images.shape[-1] == 3:
        return images.contiguous()
    values = images.float().permute(0, 2, 3, 1)
    if values.shape[-1] == 1:
        values = values.expand(*values.shape[:-1], 3)
    return (values * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).contiguous()


def label_colors(labels: Tensor, colormap: Sequence[Sequence[int]]) -> Tensor:
    """Label maps ``[N, H, W]`` painted with a BGR ``colormap`` (one colour per label), as RGB
    uint8 ``[N, H, W, 3]`` on the labels' device (every label must have a colour)."""
    palette = np.asarray(colormap, dtype=np.uint8).reshape(-1, 3)[:, ::-1].copy()
    table = torch.from_numpy(palette).to(labels.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(palette)):
        raise ValueError(
            f"Expected labels in [0, {len(palette)}) for a colormap of {len(palette)} colours, "
            f"but got values from {int(labels.min())} to {int(labels.max())}."
        )
    return table[labels.long()]


class Painter:
    """Colours maps and blends them over images with OpenCV's tables, on the maps' device.

    Args:
        alpha: weight of the image in the overlays (the blog's 0.4).
        colormap: OpenCV colour map id of the maps (the blog's ``cv2.COLORMAP_JET``).

    Example:
        >>> painter = Painter(0.4, cv2.COLORMAP_JET)
        >>> images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
        >>> painter.overlays(images, torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8, 3])
    """

    def __init__(self, alpha: float = 0.4, colormap: int = cv2.COLORMAP_JET) -> None:
        self.alpha = float(alpha)
        self.colormap = int(colormap)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(blend [65536] uint8, colours [256, 3] int64)`` on ``device``."""
        if device not in self._tables:
            blend = torch.from_numpy(blend_table(self.alpha).copy()).to(device)
            colours = colormap_table(self.colormap).reshape(256, 3).astype(np.int64)
            self._tables[device] = (blend, torch.from_numpy(colours).to(device))
        return self._tables[device]

    def overlays(self, images: Tensor, cams: Tensor) -> Tensor:
        """Each map blended over its image: ``images`` RGB uint8 ``[B, H, W, 3]``, ``cams``
        ``[B, *M, H, W]`` in [0, 1]; returns uint8 ``[B, *M, H, W, 3]`` on the maps' device."""
        if images.shape[0] != cams.shape[0] or images.shape[1:3] != cams.shape[-2:]:
            raise ValueError(
                f"Expected images [B, H, W, 3] matching maps [B, ..., H, W], but got "
                f"{list(images.shape)} and {list(cams.shape)}."
            )
        blend, colours = self.tables(cams.device)
        batch, height, width = cams.shape[0], cams.shape[-2], cams.shape[-1]
        maps = cams.reshape(batch, -1, height, width)
        base = images.to(cams.device).long().mul_(256)  # [B, H, W, 3]
        out = torch.empty((*maps.shape, 3), dtype=torch.uint8, device=cams.device)
        per_image = maps.shape[1] * height * width * 3
        if per_image <= _CHUNK_ELEMENTS:  # chunks of images bound the int64 index's memory
            step = _CHUNK_ELEMENTS // per_image
            for s in range(0, batch, step):
                index = colours[scaled_maps(maps[s : s + step]).long()]
                out[s : s + step] = blend[index.add_(base[s : s + step, None])]
        else:  # one image's maps at a time, in chunks of maps
            step = max(1, _CHUNK_ELEMENTS // (height * width * 3))
            for b in range(batch):
                for s in range(0, maps.shape[1], step):
                    index = colours[scaled_maps(maps[b, s : s + step]).long()]
                    out[b, s : s + step] = blend[index.add_(base[b])]
        return out.reshape(*cams.shape, 3)
