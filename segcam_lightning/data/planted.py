"""Planted modalities: multi-channel images and volumes where each class shows in one channel.

For checking per-modality attribution (:mod:`segcam_lightning.cam.modalities`): every channel
holds its own smooth background texture (like the sequences of an MRI study, which all show
the anatomy), and the objects of class ``k`` (``k = 1 .. C - 1``) are drawn *only in channel
k*, as a brighter, textured region; channel 0 holds texture alone. The object classes share one
distribution of shapes, sizes and brightness, so the channel is the only thing that tells them
apart: a model that segments them well must read class ``k`` from channel ``k``. Objects never
overlap (nor touch), so at every pixel of class ``k`` every other channel is its plain texture.

Images ``[C, S, S]`` (``PlantedModalities``) or volumes ``[C, S, S, S]`` (``PlantedVolumes``),
float32 in ``[0, 1]``, masks of labels ``0 .. C - 1``; every sample is a pure function of
``(seed, index)`` (numpy only, a few milliseconds each). :class:`PlantedDataModule` gives the
train/val/test loaders (``SegmentationDataModule`` reads only its own data sets).

Example:
    >>> ds = PlantedModalities(num_samples=4, image_size=32)
    >>> sample = ds[0]
    >>> sample["image"].shape, sample["mask"].shape, ds.class_names[1]
    (torch.Size([4, 32, 32]), torch.Size([32, 32]), 'in_channel_1')
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from segcam_lightning.data.datamodule import SplitLoaders
from segcam_lightning.data.synthetic import SPLIT_OFFSETS, GeneratedDataset, Transform
from segcam_lightning.data.transforms import RandomFlip
from segcam_lightning.text import require_int

__all__ = [
    "PlantedDataModule",
    "PlantedModalities",
    "PlantedVolumes",
    "planted_class_names",
    "render_planted",
]

# Lengths are in pixels at a side of 64 (images) or 32 (volumes) and scale with the side.
_BASE_SIZE = {2: 64, 3: 32}
# Probabilities of 0, 1, 2, 3 objects of each class; about one sample in ten lacks a class.
_COUNTS = (0.1, 0.35, 0.35, 0.2)
_TRIES = 20  # placements tried per object before it is left out (no overlap allowed)


def planted_class_names(num_channels: int) -> tuple[str, ...]:
    """``("background", "in_channel_1", ...)``: class ``k`` shows in channel ``k``."""
    return ("background", *(f"in_channel_{k}" for k in range(1, num_channels)))


class _Planted(GeneratedDataset):
    """What the 2-D and 3-D planted data sets share."""

    dims = 2

    def __init__(
        self,
        num_samples: int,
        size: int,
        seed: int,
        num_channels: int,
        transform: Transform | None,
    ) -> None:
        super().__init__(num_samples, seed, transform)
        self.size = require_int("size", size, 16)
        self.num_channels = require_int("num_channels", num_channels, 2)
        self.class_names = planted_class_names(self.num_channels)
        self.num_classes = self.in_channels = self.num_channels

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_planted(self.seed, index, self.size, self.num_channels, self.dims)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, size={self.size}, "
            f"seed={self.seed}, num_channels={self.num_channels})"
        )


class PlantedModalities(_Planted):
    """Images ``[C, S, S]`` where class ``k`` shows only in channel ``k`` (see the module).

    Args:
        num_samples: number of samples.
        image_size: side ``S``, at least 16 (64 is the intended size).
        seed: dataset seed; one per split.
        num_channels: ``C`` channels, and ``C`` classes (background and ``C - 1`` objects).
        transform: optional sample transform (e.g. ``RandomFlip``).
    """

    dims = 2

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        num_channels: int = 4,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(num_samples, image_size, seed, num_channels, transform)


class PlantedVolumes(_Planted):
    """Volumes ``[C, S, S, S]`` where class ``k`` shows only in channel ``k`` (see the module).

    Args:
        num_samples: number of samples.
        size: side ``S`` of the cube, at least 16 (32 is the intended size; a multiple of 16
            for the U-Net).
        seed, num_channels, transform: as for :class:`PlantedModalities`.
    """

    dims = 3

    def __init__(
        self,
        num_samples: int,
        size: int = 32,
        seed: int = 0,
        num_channels: int = 4,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(num_samples, size, seed, num_channels, transform)


def render_planted(
    seed: int, index: int, size: int, num_channels: int = 4, dims: int = 2, objects: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One sample from ``(seed, index)`` alone.

    Args:
        seed, index: the sample's seed and index.
        size: side ``S``.
        num_channels: ``C``.
        dims: 2 (images) or 3 (volumes).
        objects: ``False`` gives the same sample's textures without its objects (what every
            channel shows where no object of its own is; the tests compare the two).

    Returns:
        ``(image, mask)``: ``[C, *S]`` float32 in ``[0, 1]`` and ``[*S]`` uint8 labels.
    """
    if dims not in _BASE_SIZE:
        raise ValueError(f"Expected `dims` 2 (images) or 3 (volumes), but got {dims!r}.")
    shape = (size,) * dims
    texture_rng = np.random.default_rng([seed, index, 0])
    image = np.stack([_texture(texture_rng, size, dims) for _ in range(num_channels)])
    mask = np.zeros(shape, dtype=np.uint8)
    if objects:
        _place_objects(np.random.default_rng([seed, index, 1]), image, mask, dims)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _texture(rng: np.random.Generator, size: int, dims: int) -> np.ndarray:
    """A channel's background: a random level, smooth noise at two scales, voxel noise."""
    level = rng.uniform(0.25, 0.45)
    texture = 0.08 * _smooth_noise(rng, size, 4, dims) + 0.05 * _smooth_noise(rng, size, 8, dims)
    texture += 0.03 * rng.standard_normal((size,) * dims, dtype=np.float32)
    return (level + texture).astype(np.float32)


def _place_objects(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, dims: int
) -> None:
    """Draw every class's objects in its own channel, in place, none touching another."""
    size, channels = mask.shape[0], image.shape[0]
    scale = size / _BASE_SIZE[dims]
    objects = [k for k in range(1, channels) for _ in range(_count(rng))]
    rng.shuffle(objects)
    taken = np.zeros(mask.shape, dtype=bool)  # objects grown by a margin: no touching
    grid = _grid(size, dims)
    for k in objects:
        for _ in range(_TRIES):
            region, halo = _ellipsoid(rng, grid, size, scale)
            if not (halo & taken).any():
                break
        else:
            continue
        taken |= halo
        mask[region] = k
        brightness = rng.uniform(0.25, 0.45)
        image[k][region] += brightness * (1.0 + 0.15 * _smooth_noise(rng, size, 8, dims)[region])


def _count(rng: np.random.Generator) -> int:
    return int(rng.choice(len(_COUNTS), p=_COUNTS))


def _ellipsoid(
    rng: np.random.Generator, grid: np.ndarray, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A randomly oriented ellipse (ellipsoid) and the same grown by 2 pixels (its halo)."""
    dims = grid.shape[0]
    centre = rng.uniform(0.1, 0.9, dims) * size
    axes = rng.uniform(3.0, 7.0, dims) * scale
    rotation, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    offset = grid - centre.reshape(dims, *(1,) * dims)
    local = np.tensordot(rotation.T, offset, axes=1)
    axes_shape = (dims, *(1,) * dims)
    rho = np.sqrt(((local / axes.reshape(axes_shape)) ** 2).sum(axis=0))
    grown = np.sqrt(((local / (axes + 2.0).reshape(axes_shape)) ** 2).sum(axis=0))
    return rho <= 1.0, grown <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, dims: int) -> np.ndarray:
    """Gaussian noise on a ``cells^dims`` lattice, linearly interpolated to ``size^dims``."""
    volume = rng.standard_normal((cells,) * dims).astype(np.float32)
    matrix = _interpolation(cells, size)
    for axis in range(dims):
        volume = np.moveaxis(np.tensordot(matrix, volume, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(volume, dtype=np.float32)


@lru_cache(maxsize=16)
def _interpolation(cells: int, size: int) -> np.ndarray:
    """``[size, cells]`` linear interpolation weights from cell centres to pixel centres."""
    position = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    matrix = np.zeros((size, cells), dtype=np.float32)
    np.add.at(matrix, (np.arange(size), low), 1 - (position - low))
    np.add.at(matrix, (np.arange(size), high), position - low)
    matrix.flags.writeable = False
    return matrix


@lru_cache(maxsize=4)
def _grid(size: int, dims: int) -> np.ndarray:
    """Pixel centre coordinates ``[dims, *S]`` float32, read-only."""
    grid = np.indices((size,) * dims, dtype=np.float32)
    grid.flags.writeable = False
    return grid


class PlantedDataModule(SplitLoaders):
    """Train/val/test loaders of the planted data (images or volumes).

    Args:
        dims: 2 for :class:`PlantedModalities`, 3 for :class:`PlantedVolumes`.
        size: side of the images (default 64) or volumes (use 32).
        num_channels: ``C`` channels and classes.
        batch_size: batch size of every loader.
        seed: data seed; train, val and test use ``seed + 0, 1, 2`` as the synthetic data does.
        num_train, num_val, num_test: samples per split.
        augment: random flips and 90° rotations of training samples.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dims: int = 2,
        size: int = 64,
        num_channels: int = 4,
        batch_size: int = 8,
        seed: int = 0,
        num_train: int = 256,
        num_val: int = 32,
        num_test: int = 64,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dims not in _BASE_SIZE:
            raise ValueError(f"Expected `dims` 2 (images) or 3 (volumes), but got {dims!r}.")
        self.save_hyperparameters()
        self.class_names = list(planted_class_names(num_channels))
        self.datasets: dict[str, _Planted] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        kind = PlantedModalities if hp.dims == 2 else PlantedVolumes
        counts = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        self.datasets = {
            split: kind(
                count,
                hp.size,
                hp.seed + SPLIT_OFFSETS[split],
                hp.num_channels,
                RandomFlip() if split == "train" and hp.augment else None,
            )
            for split, count in counts.items()
        }
