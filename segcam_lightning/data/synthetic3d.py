"""Synthetic 3-D segmentation volumes, generated on the fly from a seed with numpy alone.

Three classes: ``background``, ``tube`` (elongated, gently curved rods) and ``blob`` (lumpy,
roughly round bodies). Both object classes draw their brightness and texture from the *same*
distribution, so a model has to tell them apart by shape, not by intensity. The background is
smooth noise at two scales and holds distractors that are background in the mask: dark tubes
and blobs (the objects' shapes at another intensity) and small bright specks (the objects'
intensity without their shape). A blur, contrast jitter and voxel noise finish each volume.
Sizes are set for 32³ and scale with the volume (64³ doubles every length).

Every sample is a pure function of ``(seed, index)``: the same on any worker, process or
machine, in any order.

Example:
    >>> ds = SyntheticVolumes(num_samples=4, size=32)
    >>> sample = ds[0]
    >>> sample["image"].shape, sample["mask"].shape, sample["name"]
    (torch.Size([1, 32, 32, 32]), torch.Size([32, 32, 32]), '0000')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise

import numpy as np
import torch

from segcam_lightning.data.synthetic import GeneratedDataset, Transform
from segcam_lightning.text import require_int

__all__ = ["SYNTHETIC3D_CLASS_NAMES", "SyntheticVolumes", "render_volume"]

SYNTHETIC3D_CLASS_NAMES = ("background", "tube", "blob")
TUBE, BLOB = 1, 2

# Lengths are in voxels at 32³ and scale with the volume's side.
_BASE_SIZE = 32
_MIN_SIZE = 16
# Probabilities of 0, 1, 2, ... objects per volume; about one volume in ten lacks a class.
_TUBE_COUNTS = (0.08, 0.22, 0.3, 0.25, 0.15)
_BLOB_COUNTS = (0.08, 0.22, 0.3, 0.25, 0.15)
# Points along a tube's centre line (a quadratic Bézier curve drawn as straight segments).
_TUBE_POINTS = 6


class SyntheticVolumes(GeneratedDataset):
    """Tubes and blobs in noisy volumes, generated deterministically from ``(seed, index)``.

    Args:
        num_samples: number of samples (``len(dataset)``).
        size: side ``S`` of the cubic volumes, at least 16; 32 (default) to 64 is the intended
            range. A U-Net with four poolings needs a multiple of 16.
        seed: dataset seed; different seeds give independent datasets (use one per split).
        transform: optional callable applied to each sample dict (e.g. ``RandomFlip``, which
            flips and rotates the last two axes of ``[1, D, H, W]`` and ``[D, H, W]`` alike).

    Each sample is a dict with ``"image"`` ``[1, S, S, S]`` float32 in ``[0, 1]`` (``[C, D, H,
    W]``), ``"mask"`` ``[S, S, S]`` int64 class indices in ``{0, 1, 2}`` and ``"name"`` the
    zero-padded index. :meth:`render` gives ``(image, mask)`` as ``[S, S, S]`` float32 in
    ``[0, 1]`` and ``[S, S, S]`` uint8 class indices, axes ``(D, H, W)``.
    """

    class_names = SYNTHETIC3D_CLASS_NAMES
    num_classes = len(SYNTHETIC3D_CLASS_NAMES)
    in_channels = 1

    def __init__(
        self, num_samples: int, size: int = 32, seed: int = 0, transform: Transform | None = None
    ) -> None:
        super().__init__(num_samples, seed, transform)
        self.size = require_int("size", size, _MIN_SIZE)

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_volume(self.seed, index, self.size)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).unsqueeze(0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, size={self.size}, "
            f"seed={self.seed})"
        )


def render_volume(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one volume from ``(seed, index)`` alone.

    Args:
        seed: dataset seed.
        index: sample index.
        size: side ``S`` of the cube.

    Returns:
        ``(image, mask)``: ``[S, S, S]`` float32 in ``[0, 1]`` and ``[S, S, S]`` uint8 class
        indices.
    """
    rng = np.random.default_rng([seed, index])
    scale = size / _BASE_SIZE
    grid = _grid(size)
    image = _background(rng, size)
    mask = np.zeros((size, size, size), dtype=np.uint8)
    _distractors(rng, image, grid, size, scale)
    objects = [TUBE] * _count(rng, _TUBE_COUNTS) + [BLOB] * _count(rng, _BLOB_COUNTS)
    rng.shuffle(objects)  # interleave, so that each class occludes the other
    for cls in objects:
        region = _tube(rng, grid, size, scale) if cls == TUBE else _blob(rng, grid, size, scale)
        _paint(rng, image, region, _object_intensity(rng), size)
        mask[region] = cls
    return _finish(rng, image), mask


@lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """Voxel centre coordinates ``[3, S, S, S]`` (``z, y, x``), float32, read-only."""
    grid = np.indices((size, size, size), dtype=np.float32)
    grid.flags.writeable = False
    return grid


def _count(rng: np.random.Generator, probabilities: Sequence[float]) -> int:
    return int(rng.choice(len(probabilities), p=probabilities))


def _object_intensity(rng: np.random.Generator) -> float:
    """One object's mean intensity; the same distribution for tubes, blobs and bright specks."""
    return float(rng.uniform(0.6, 0.9))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise at two scales around a random level, ``[S, S, S]`` float32."""
    level = rng.uniform(0.25, 0.4)
    volume = 0.07 * _smooth_noise(rng, size, 4) + 0.04 * _smooth_noise(rng, size, 8)
    return (level + volume).astype(np.float32)


def _distractors(
    rng: np.random.Generator, image: np.ndarray, grid: np.ndarray, size: int, scale: float
) -> None:
    """Background in the mask, drawn in place: dark tubes and blobs (the objects' shapes) and
    bright specks (the objects' intensity)."""
    for _ in range(int(rng.integers(0, 4))):
        draw = _tube if rng.random() < 0.5 else _blob
        _paint(rng, image, draw(rng, grid, size, scale), float(rng.uniform(0.05, 0.18)), size)
    n_specks = round(int(rng.integers(4, 16)) * scale**3)
    centres = rng.uniform(0, size, (n_specks, 3)).astype(np.float32)
    radii = rng.uniform(0.6, 1.3, n_specks) * scale
    for centre, radius in zip(centres, radii, strict=True):
        box = _box(centre - radius, centre + radius, size)
        offset = grid[(slice(None), *box)] - centre[:, None, None, None]
        image[box][(offset * offset).sum(axis=0) <= radius * radius] = _object_intensity(rng)


def _tube(rng: np.random.Generator, grid: np.ndarray, size: int, scale: float) -> np.ndarray:
    """A gently curved rod of constant radius: voxels within ``r`` of a Bézier centre line.

    Returns:
        ``[S, S, S]`` bool region.
    """
    start = rng.uniform(0.1, 0.9, 3) * size
    direction = _unit(rng.standard_normal(3))
    length = rng.uniform(16, 28) * scale
    radius = rng.uniform(1.4, 2.2) * scale
    bend = _unit(np.cross(direction, rng.standard_normal(3))) * rng.uniform(-0.3, 0.3) * length
    end = start + direction * length
    control = (start + end) / 2 + bend
    t = np.linspace(0.0, 1.0, _TUBE_POINTS)[:, None]
    points = ((1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end).astype(np.float32)
    box = _box(points.min(axis=0) - radius, points.max(axis=0) + radius, size)
    local = grid[(slice(None), *box)]
    nearest = np.full(local.shape[1:], np.inf, dtype=np.float32)
    for a, b in pairwise(points):
        np.minimum(nearest, _segment_squared_distance(local, a, b), out=nearest)
    region = np.zeros((size, size, size), dtype=bool)
    region[box] = nearest <= radius * radius
    return region


def _blob(rng: np.random.Generator, grid: np.ndarray, size: int, scale: float) -> np.ndarray:
    """A lumpy, randomly oriented ellipsoid with axes within ±20 % of one radius.

    Returns:
        ``[S, S, S]`` bool region.
    """
    centre = rng.uniform(0.1, 0.9, 3).astype(np.float32) * size
    radius = rng.uniform(3.5, 6.0) * scale
    axes = (radius * rng.uniform(0.8, 1.2, 3)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    lumps = 1.0 + 0.15 * _smooth_noise(rng, size, 4)
    reach = 1.2 * float(axes.max()) * float(lumps.max())
    box = _box(centre - reach, centre + reach, size)
    offset = grid[(slice(None), *box)] - centre[:, None, None, None]
    local = np.tensordot(rotation.T.astype(np.float32), offset, axes=1)
    rho = np.sqrt(((local / axes[:, None, None, None]) ** 2).sum(axis=0))
    region = np.zeros((size, size, size), dtype=bool)
    region[box] = rho <= lumps[box]
    return region


def _paint(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, intensity: float, size: int
) -> None:
    """Paint a region with its intensity times a smooth texture of mean 1, in place.

    Normalising the texture keeps each object's mean at its intensity, so texture does not tell
    the classes apart either.
    """
    if not region.any():
        return
    texture = 1.0 + 0.12 * _smooth_noise(rng, size, 8)[region]
    image[region] = intensity * texture / texture.mean()


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur, contrast/brightness jitter and voxel noise; float32 clipped to ``[0, 1]``."""
    image = _blur(image, rng.uniform(0.4, 0.9))
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.05, 0.05)
    image = (image - 0.4) * contrast + 0.4 + brightness
    image += rng.uniform(0.02, 0.05) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance-ish Gaussian noise on a ``cells³`` lattice, linearly interpolated to
    ``[S, S, S]`` float32."""
    coarse = rng.standard_normal((cells, cells, cells), dtype=np.float32)
    return _separable(coarse, _interpolation_matrix(cells, size))


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``[S, S, S]`` with edge weights renormalised (no dark border)."""
    size = volume.shape[0]
    offsets = np.arange(size, dtype=np.float32)
    kernel = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma) ** 2)
    kernel /= kernel.sum(axis=1, keepdims=True)
    return _separable(volume, kernel.astype(np.float32))


def _separable(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply ``matrix`` ``[S_out, S_in]`` along each of the three axes of ``volume``.

    ``einsum`` rather than ``tensordot`` of the moved axes: it is much faster for these small
    matrices (benchmarks/RESULTS.md, "Implementation notes").
    """
    volume = np.einsum("ai,ijk->ajk", matrix, volume)
    volume = np.einsum("bj,ajk->abk", matrix, volume)
    volume = np.einsum("ck,abk->abc", matrix, volume)
    return np.ascontiguousarray(volume, dtype=np.float32)


@lru_cache(maxsize=16)
def _interpolation_matrix(cells: int, size: int) -> np.ndarray:
    """``[size, cells]`` weights of linear interpolation from cell centres to voxel centres."""
    position = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    frac = position - low
    matrix = np.zeros((size, cells), dtype=np.float32)
    np.add.at(matrix, (np.arange(size), low), 1 - frac)
    np.add.at(matrix, (np.arange(size), high), frac)
    matrix.flags.writeable = False
    return matrix


def _box(low: np.ndarray, high: np.ndarray, size: int) -> tuple[slice, slice, slice]:
    """The voxels whose centres may lie in ``[low, high]`` (``z, y, x``), inside the volume."""
    start = np.clip(np.floor(low), 0, size).astype(int)
    stop = np.clip(np.ceil(high) + 1, 0, size).astype(int)
    return tuple(slice(a, b) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _segment_squared_distance(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distance from every voxel centre of ``grid`` ``[3, *s]`` to the segment
    ``[a, b]``: ``[*s]``."""
    ab = (b - a).astype(np.float32)
    offset = grid - a.astype(np.float32)[:, None, None, None]
    t = np.tensordot(ab, offset, axes=1) / max(float(ab @ ab), 1e-12)
    np.clip(t, 0.0, 1.0, out=t)
    closest = offset - t[None] * ab[:, None, None, None]
    return (closest * closest).sum(axis=0)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = math.sqrt(float(vector @ vector))
    return vector / norm if norm > 0 else np.array([1.0, 0.0, 0.0])
