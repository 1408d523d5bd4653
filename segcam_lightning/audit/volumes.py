"""Volumes from a folder of ``.npy`` files: pairing, intensity scaling and resizing.

The layout is the original script's with NumPy arrays: ``DIR/images/<name>.npy`` (``[D, H, W]`` or
``[C, D, H, W]``, any integer or float dtype) and, for ground truth, ``DIR/masks/<name>.npy``
(integer labels ``[D, H, W]``), paired by file stem. Arrays are read with
``numpy.load(allow_pickle=False)``: numbers only, nothing in a file runs.

Each volume is scaled to [0, 1] per channel: from ``intensity_range`` ``(lo, hi)`` when given
(values outside are clipped: a CT window such as ``-1000 400``), else from the volume's own
minimum and maximum (a constant channel becomes 0); or, with ``zscore``, to mean 0 and standard
deviation 1 per channel over the volume (MONAI's ``NormalizeIntensity(channel_wise=True)``).
Then it is resized to the cube the network takes: trilinearly (``align_corners=False``), masks
by nearest neighbour (``nearest-exact``), so labels are never blended; a volume already of that
size is left as it is. With sliding windows and no ``--size``, volumes keep their own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segcam_lightning.errors import UsageError
from segcam_lightning.text import listing

#: The suffix of volume files.
VOLUME_SUFFIX = ".npy"


def volume_files(folder: Path) -> list[Path]:
    """The ``.npy`` files directly in ``folder`` (any case), sorted by name."""
    found = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == VOLUME_SUFFIX)
    return sorted(found, key=lambda p: p.name)


def pair_volumes(images: Sequence[Path], mask_dir: Path) -> list[tuple[Path, Path]]:
    """Pair each volume with the mask of the same stem in ``mask_dir``.

    Raises:
        UsageError: when some volumes have no mask or some masks no volume, naming them.
    """
    masks = {p.stem: p for p in volume_files(mask_dir)}
    stems = {p.stem for p in images}
    no_mask = [p.name for p in images if p.stem not in masks]
    no_volume = sorted(p.name for s, p in masks.items() if s not in stems)
    if no_mask or no_volume:
        problems = []
        if no_mask:
            problems.append(f"{len(no_mask)} volume(s) without a mask: {listing(no_mask)}")
        if no_volume:
            problems.append(f"{len(no_volume)} mask(s) without a volume: {listing(no_volume)}")
        raise UsageError(
            f"Volumes in {images[0].parent} and masks in {mask_dir} pair up by file name "
            f"(images/<name>.npy with masks/<name>.npy), but found {'; '.join(problems)}. Add "
            "the missing files, or remove or rename the unpaired ones."
        )
    return [(p, masks[p.stem]) for p in images]


@dataclass(frozen=True)
class VolumeSource:
    """Reads volume ``index`` (and its mask) ready for the network.

    Args:
        images: the volume files.
        masks: one mask file per volume, or ``None``.
        size: ``(D, H, W)`` every volume is resized to; ``None`` keeps each volume's own size
            (sliding windows, :mod:`~segcam_lightning.audit.windows`).
        channels: the channels the network takes; a volume with others is refused.
        num_labels: mask labels run from 0 to ``num_labels - 1``.
        intensity_range: ``(lo, hi)`` mapped to [0, 1], or ``None`` for each volume's range.
        zscore: z-score each channel over the volume instead.
    """

    images: tuple[Path, ...]
    masks: tuple[Path, ...] | None
    size: tuple[int, int, int] | None
    channels: int
    num_labels: int
    intensity_range: tuple[float, float] | None = None
    zscore: bool = False

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(volume [C, D, H, W] float32 in [0, 1], mask [D, H, W] int64 or None)``.

        Raises:
            ValueError: for a file that is not a volume of the expected shape, dtype and labels
                (the dataset then skips it, with this message).
        """
        volume = read_volume(self.images[index], self.channels, self.intensity_range, self.zscore)
        mask = None
        if self.masks is not None:
            mask = read_mask(self.masks[index], volume.shape[1:], self.num_labels)
        if self.size is None:
            return volume, mask
        return resize_volume(volume, mask, self.size)


def read_volume(
    path: Path,
    channels: int,
    intensity_range: tuple[float, float] | None = None,
    zscore: bool = False,
) -> np.ndarray:
    """One ``.npy`` volume as ``[C, D, H, W]`` float32 in [0, 1], or z-scored with ``zscore``
    (see the module's scaling).

    Raises:
        ValueError: for an array that is not ``[D, H, W]`` or ``[C, D, H, W]`` with ``channels``
            channels, not numeric, or not finite.
    """
    array = _load(path)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or not _numeric(array):
        raise ValueError(
            f"expected a volume [D, H, W] or [C, D, H, W] of numbers, but {path.name} holds "
            f"{_describe(array)}"
        )
    if array.shape[0] != channels:
        raise ValueError(
            f"{path.name} has {array.shape[0]} channel(s) ({_describe(array)}), but the network "
            f"takes {channels}; save [C, D, H, W] with C = {channels}"
        )
    volume = array.astype(np.float32)
    if not np.isfinite(volume).all():
        raise ValueError(f"{path.name} holds NaN or infinite values")
    if intensity_range is not None:
        lo, hi = intensity_range
        return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    axes = (1, 2, 3)
    if zscore:
        mean = volume.mean(axis=axes, keepdims=True, dtype=np.float64)
        std = volume.std(axis=axes, keepdims=True, dtype=np.float64)
        scaled = np.where(std > 0, (volume - mean) / np.where(std > 0, std, 1), 0)
        return scaled.astype(np.float32)
    low = volume.min(axis=axes, keepdims=True)
    span = volume.max(axis=axes, keepdims=True) - low
    return np.where(span > 0, (volume - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


def read_mask(path: Path, shape: Sequence[int], num_labels: int) -> np.ndarray:
    """One ``.npy`` mask: integer labels ``[D, H, W]`` of the volume's ``shape``, as int64.

    Raises:
        ValueError: for another shape, a non-integer dtype or labels outside
            ``0 .. num_labels - 1``.
    """
    array = _load(path)
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    if tuple(array.shape) != tuple(shape) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"expected the mask {path.name} to hold integer labels of the volume's shape "
            f"{list(shape)}, but it holds {_describe(array)}"
        )
    labels = array.astype(np.int64)
    bad = np.unique(labels[(labels < 0) | (labels >= num_labels)])
    if bad.size:
        raise ValueError(
            f"the mask {path.name} holds labels {listing(bad.tolist())} outside "
            f"0..{num_labels - 1} (one label per class); relabel them"
        )
    return labels


def resize_volume(
    volume: np.ndarray, mask: np.ndarray | None, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``volume`` ``[C, D, H, W]`` trilinearly and ``mask`` ``[D, H, W]`` by nearest neighbour
    at ``size``; arrays already at ``size`` are returned as they are."""
    if tuple(volume.shape[1:]) == tuple(size):
        return volume, mask
    x = torch.from_numpy(np.ascontiguousarray(volume))[None]
    resized = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]
    if mask is not None:
        labels = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        mask = F.interpolate(labels, size=tuple(size), mode="nearest-exact")[0, 0].long().numpy()
    return resized.numpy(), mask


def check_intensity_range(value: tuple[float, float] | None) -> None:
    """Check ``--intensity-range`` (``None``: not given).

    Raises:
        UsageError: for a range whose low end is not below its high end, or not finite.
    """
    if value is None:
        return
    lo, hi = value
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise UsageError(
            f"--intensity-range {lo:g} {hi:g}: expected two finite values, the low one first "
            "(e.g. --intensity-range -1000 400 for a CT window)."
        )


def _load(path: Path) -> np.ndarray:
    # allow_pickle=False: an array of objects would need unpickling, which can run code.
    return np.load(path, allow_pickle=False)


def _numeric(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating))


def _describe(array: np.ndarray) -> str:
    return f"{array.dtype} {list(array.shape)}"
