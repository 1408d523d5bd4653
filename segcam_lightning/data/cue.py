"""A planted confusion: two classes of objects that differ only in a small cue.

``marked`` and ``plain`` discs have the same colour, size and texture; a ``marked`` disc carries
one small dark dot somewhere inside it, a ``plain`` one does not. The dot's contrast varies from
clear to faint, so a trained model sometimes misses it and takes a marked disc for a plain one:
the error ``--explain-errors`` and ``Confusion`` are made to explain. Each sample also holds the
cue's pixels (``"cue"``), so a map's energy on the cue can be measured (see
docs/which-map.md, "Explaining a confusion").

Every sample is a pure function of ``(seed, index)``.

Example:
    >>> data = CueConfusion(4, image_size=64)
    >>> sample = data[0]
    >>> sample["image"].shape, sample["mask"].shape, sample["cue"].dtype
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.bool)
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segcam_lightning.text import require_int

__all__ = ["CUE_CLASS_NAMES", "CUE_COLORMAP", "CueConfusion"]

CUE_CLASS_NAMES = ("background", "marked", "plain")
#: BGR colours of the masks (background black, marked red, plain green), for folders on disk.
CUE_COLORMAP = ((0, 0, 0), (0, 0, 255), (0, 255, 0))
MARKED, PLAIN = 1, 2
# Sizes at 64², scaled with the image size.
_BASE = 64


class CueConfusion(Dataset):
    """Discs on a textured background; ``marked`` ones carry a small dark dot (the cue).

    Args:
        num_samples: number of images.
        image_size: side of the square images.
        seed: the data seed (a split's images are a function of it).
        faint: the lowest contrast of the dot (its darkening of the disc, 0..1); contrasts are
            drawn uniformly in ``[faint, 0.6]``.

    Each sample is a dict: ``image`` float ``[3, S, S]`` in [0, 1], ``mask`` int64 ``[S, S]``
    (0 background, 1 marked, 2 plain), ``cue`` bool ``[S, S]`` (the dots' pixels) and ``name``.
    """

    class_names = CUE_CLASS_NAMES

    def __init__(
        self, num_samples: int, image_size: int = 64, seed: int = 0, faint: float = 0.05
    ) -> None:
        self.num_samples = require_int("num_samples", num_samples, minimum=1)
        self.image_size = require_int("image_size", image_size, minimum=16)
        self.seed = require_int("seed", seed, minimum=0)
        if not 0.0 <= faint <= 0.6:
            raise ValueError(f"Expected `faint` in [0, 0.6], but got {faint!r}.")
        self.faint = float(faint)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index, 7919])
        image, mask, cue = _sample(rng, self.image_size, self.faint)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(mask),
            "cue": torch.from_numpy(cue),
            "name": f"{index:04d}",
        }


def _sample(
    rng: np.random.Generator, size: int, faint: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = size / _BASE
    base = rng.uniform(0.35, 0.55) * np.array([0.75, 0.6, 0.45], np.float32)
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 2)
    image = base + 0.08 * texture[..., None] * np.ones(3, np.float32)
    mask = np.zeros((size, size), np.int64)
    cue = np.zeros((size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    colour = np.array([0.3, 0.75, 0.35], np.float32) * rng.uniform(0.8, 1.1)
    for _ in range(rng.integers(2, 5)):
        radius = rng.uniform(7, 11) * scale
        cy, cx = rng.uniform(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        disc &= mask == 0  # an earlier disc stays whole
        if disc.sum() < 0.5 * np.pi * radius**2:
            continue
        image[disc] = colour + 0.04 * texture[disc][:, None]
        # The dot's centre: a pixel of the disc at least 3 px (at 64²) from its edge.
        inner = cv2.erode(disc.astype(np.uint8), np.ones((7, 7), np.uint8), iterations=1)
        inner_y, inner_x = np.nonzero(inner)
        marked = bool(rng.random() < 0.5) and len(inner_y) > 0
        mask[disc] = MARKED if marked else PLAIN
        if marked:
            pick = rng.integers(len(inner_y))
            dy, dx = inner_y[pick], inner_x[pick]
            dot = ((yy - dy) ** 2 + (xx - dx) ** 2 <= (1.6 * scale) ** 2) & disc
            image[dot] *= 1.0 - rng.uniform(faint, 0.6)
            cue |= dot
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask, cue
