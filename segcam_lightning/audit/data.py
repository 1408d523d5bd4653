"""The audit's data: folders in the original script's layout, image folders, volume folders and
the synthetic images and volumes; unreadable items become skipped ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from segcam_lightning.audit.paths import unique_components
from segcam_lightning.audit.settings import (
    PROG,
    SYNTHETIC_DEFAULT_COUNT,
    SYNTHETIC_TEST_SEED,
    DataSource,
)
from segcam_lightning.audit.volumes import VOLUME_SUFFIX, VolumeSource, pair_volumes, volume_files
from segcam_lightning.data.datamodule import SYNTHETIC, SYNTHETIC3D
from segcam_lightning.data.folder import IMAGE_EXTENSIONS, FolderSegmentation, read_image
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES, SyntheticSegmentation
from segcam_lightning.data.synthetic3d import SYNTHETIC3D_CLASS_NAMES, SyntheticVolumes
from segcam_lightning.errors import UsageError
from segcam_lightning.text import path_problem

# The fix for unknown mask colours in explain.py's own options.
_COLOR_HINT = (
    f"Pass the masks' colours to {PROG}, one [b, g, r] per class in cv2's BGR order, e.g. "
    "--colormap '[[0,0,0],[0,0,128],[0,128,0]]'."
)
_VOLUME_DATA = (
    f"--data {SYNTHETIC3D} (the synthetic volumes) or a folder of volumes "
    "(DIR/images/<name>.npy, with DIR/masks/<name>.npy for ground truth)"
)


@dataclass(frozen=True)
class DataSpec:
    """What the audit's data must fit: the network's input and the model's labels.

    Attributes:
        size: ``(H, W)`` every image is resized to, or ``(D, H, W)`` for volumes.
        colormap: the masks' colours, one BGR triple per mask label (image folders).
        num_labels: the mask labels: the model's classes, or 2 for a binary model
            (background, foreground).
        limit: ``--limit``.
        kind: the model's output kind, for messages.
        channels: the channels a network of volumes takes (a volume must have them).
        intensity_range: ``--intensity-range`` for ``.npy`` volumes.
        zscore: ``--zscore`` for ``.npy`` volumes.
        own_size: ``.npy`` volumes keep their own size instead of being resized to ``size``
            (sliding windows without ``--size``); they are then read one per batch.
    """

    size: tuple[int, ...]
    colormap: Sequence[Sequence[int]]
    num_labels: int
    limit: int | None = None
    kind: str = "multiclass"
    channels: int = 1
    intensity_range: tuple[float, float] | None = None
    zscore: bool = False
    own_size: bool = False

    @property
    def volumes(self) -> bool:
        return len(self.size) == 3


@dataclass(frozen=True)
class _FolderSource:
    reader: FolderSegmentation
    pairs: tuple[tuple[Path, Path], ...]

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        return self.reader.read_image(image_path), self.reader.read_mask(mask_path)


@dataclass(frozen=True)
class _ImageSource:
    """Images without masks, read exactly as :class:`FolderSegmentation` reads them (RGB)."""

    files: tuple[Path, ...]
    size: tuple[int, int]

    def __call__(self, index: int) -> tuple[np.ndarray, None]:
        return read_image(self.files[index], self.size, "rgb"), None


@dataclass(frozen=True)
class _SyntheticSource:
    dataset: SyntheticSegmentation | SyntheticVolumes

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.dataset.render(index)
        if isinstance(self.dataset, SyntheticVolumes):
            image = image[None]  # [1, D, H, W]: one channel
        return image, mask.astype(np.int64)


class AuditDataset(Dataset):
    """Items read one by one; an unreadable item comes back marked as skipped, never raises.

    Each sample: ``"index"``, ``"name"`` (a safe, unique file stem), ``"source"``, ``"path"``,
    ``"ok"``, ``"reason"`` (why it was skipped, else ``""``), ``"image"`` ``[3, H, W]`` uint8 RGB
    (zeros when skipped), or for volumes ``[C, D, H, W]`` float32 in [0, 1], and, with masks,
    ``"mask"`` ``[H, W]`` (``[D, H, W]``) int64.

    Args:
        read: ``read(index) -> (image, mask or None)``: an image ``[H, W, 3]`` uint8 RGB and
            its mask ``[H, W]`` int64, or a volume ``[C, D, H, W]`` float32 and its mask
            ``[D, H, W]``.
        names: one name per item.
        paths: one source description per item (file path, or ``synthetic:<index>``).
        size: ``(height, width)`` of every image, or ``(depth, height, width)`` of every
            volume.
        has_masks: whether items carry ground truth.
        sources: one name per item that maps it back to its file whatever its script: the path
            relative to ``--data`` (or ``synthetic:<index>``); ``paths`` by default.
        channels: a volume's channels (for the zeros of a skipped one).
        own_size: items keep their own sizes (``size`` is only that of a skipped item's
            zeros), so the loader reads one per batch.
    """

    def __init__(
        self,
        read: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
        names: Sequence[str],
        paths: Sequence[str],
        size: tuple[int, ...],
        has_masks: bool,
        sources: Sequence[str] | None = None,
        channels: int = 1,
        own_size: bool = False,
    ) -> None:
        self.read = read
        self.own_size = own_size
        self.names = list(names)
        self.paths = list(paths)
        self.sources = list(sources) if sources is not None else list(paths)
        self.size = tuple(size)
        self.has_masks = has_masks
        self.channels = channels

    @property
    def volumes(self) -> bool:
        """Whether the items are volumes."""
        return len(self.size) == 3

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, mask = self.read(index)
            reason = ""
        except Exception as error:  # any unreadable file is skipped, with the reason
            image, mask = self._blank(), None
            reason = f"{type(error).__name__}: {error}"
        picture = torch.from_numpy(np.ascontiguousarray(image))
        sample = {
            "index": index,
            "name": self.names[index],
            "source": self.sources[index],
            "path": self.paths[index],
            "ok": not reason,
            "reason": reason,
            "image": picture if self.volumes else picture.permute(2, 0, 1),
        }
        if self.has_masks:
            if mask is None:
                mask = np.zeros(self.size, np.int64)
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        return sample

    def _blank(self) -> np.ndarray:
        if self.volumes:
            return np.zeros((self.channels, *self.size), np.float32)
        return np.zeros((*self.size, 3), np.uint8)


def build_dataset(data: str, spec: DataSpec) -> AuditDataset:
    """The audit's dataset for ``--data``: the synthetic images or volumes, a folder in the
    original script's layout     folder, a folder of images, or a folder of ``.npy`` volumes
    (:mod:`~segcam_lightning.audit.volumes`).

    Raises:
        UsageError: for a missing folder, no images, unpaired files, a colormap that does not
            have one colour per class, or data of the other kind than the network's (images for
            a network of volumes, or volumes for one of images).
    """
    if data in (SYNTHETIC, SYNTHETIC3D):
        return _synthetic_dataset(data, spec)
    root = Path(data)
    if problem := path_problem(root, "folder"):
        raise UsageError(
            f"--data {root} {problem}. Pass a folder with images/ and masks/ (the original "
            "script's layout), "
            f"a folder of images, '{SYNTHETIC}', or for volumes {_VOLUME_DATA}; write an example "
            f"with `segcam-synthetic --out {root}`."
        )
    try:
        folder = root / "images" if (root / "images").is_dir() else root
        volumes = volume_files(folder)
        if volumes or spec.volumes:
            return _volume_dataset(root, folder, volumes, spec)
        if (root / "masks").is_dir():
            return _folder_dataset(root, spec)
        return _image_folder_dataset(root, folder, spec)
    except OSError as error:  # a folder that cannot be listed: an input problem, not a bug
        where = error.filename or root
        raise UsageError(
            f"Could not read the data folder {where}: {error.strerror or error}. The audit lists "
            f"--data's images/ and masks/ before it starts; make them readable (e.g. chmod -R "
            f"u+rX {root}) or pass another --data."
        ) from None


def _synthetic_dataset(data: str, spec: DataSpec) -> AuditDataset:
    volumes = data == SYNTHETIC3D
    names = SYNTHETIC3D_CLASS_NAMES if volumes else SYNTHETIC_CLASS_NAMES
    if volumes != spec.volumes:
        network = "volumes [B, C, D, H, W]" if spec.volumes else "images [B, C, H, W]"
        other = _VOLUME_DATA if spec.volumes else f"--data {SYNTHETIC} or a folder of images"
        raise UsageError(
            f"--data {data} holds {'volumes' if volumes else 'images'}, but the network takes "
            f"{network}. Pass {other}."
        )
    square = len(set(spec.size)) == 1
    channels = spec.channels if volumes else 1
    if not square or spec.num_labels != len(names) or channels != 1:
        shape = "x".join(map(str, spec.size))
        what = "one-channel cubic volumes" if volumes else "square images"
        raise UsageError(
            f"The {data} data has {len(names)} classes {list(names)} and {what}, but the model "
            f"predicts {spec.num_labels} classes at {shape}"
            f"{f' from {channels} channels' if channels != 1 else ''}. Audit this checkpoint on "
            "its own data with --data DIR."
        )
    count = spec.limit or SYNTHETIC_DEFAULT_COUNT
    side = spec.size[0]
    if volumes:
        dataset: SyntheticSegmentation | SyntheticVolumes = SyntheticVolumes(
            count, side, SYNTHETIC_TEST_SEED
        )
    else:
        dataset = SyntheticSegmentation(count, side, SYNTHETIC_TEST_SEED)
    item_names = [dataset.name(i) for i in range(len(dataset))]
    paths = [f"{data}:{i}" for i in range(len(dataset))]
    return AuditDataset(
        _SyntheticSource(dataset), item_names, paths, spec.size, has_masks=True, channels=1
    )


def _folder_dataset(root: Path, spec: DataSpec) -> AuditDataset:
    colormap, num_labels = spec.colormap, spec.num_labels
    if len(colormap) != num_labels:
        if spec.kind == "binary":
            what, example = "is binary: its masks have background and foreground", "[255,255,255]"
        else:
            what, example = f"predicts {num_labels} classes", "[0,0,128],[0,128,0]"
        raise UsageError(
            f"The masks' colormap has {len(colormap)} colours {[list(c) for c in colormap]}, but "
            f"the model {what}. Pass the masks' colours, one [b, g, r] per "
            f"{'label' if spec.kind == 'binary' else 'class'} in cv2's BGR order, e.g. --colormap "
            f"'[[0,0,0],{example}]'."
        )
    try:
        reader = FolderSegmentation(
            root,
            spec.size,
            colormap,
            channel_order="rgb",
            check=False,
            unknown_color_hint=_COLOR_HINT,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    pairs = reader.pairs[: spec.limit] if spec.limit else reader.pairs
    images = [image for image, _ in pairs]
    source = _FolderSource(reader, tuple(pairs))
    return _files_dataset(source, images, root, spec, has_masks=True)


def _image_folder_dataset(root: Path, folder: Path, spec: DataSpec) -> AuditDataset:
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise UsageError(
            f"No images found in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case). "
            "Pass a folder with images/ (and masks/ for ground-truth metrics) or of images."
        )
    files = files[: spec.limit] if spec.limit else files
    source = _ImageSource(tuple(files), spec.size)  # type: ignore[arg-type]
    return _files_dataset(source, files, root, spec, has_masks=False)


def _volume_dataset(
    root: Path, folder: Path, files: Sequence[Path], spec: DataSpec
) -> AuditDataset:
    if not spec.volumes:
        raise UsageError(
            f"{folder} holds volumes ({VOLUME_SUFFIX} files), but the network takes images "
            "[B, C, H, W]. Audit a network of volumes (e.g. a checkpoint of "
            "configs/synthetic3d.yaml) on them, or pass a folder of images."
        )
    if not files:
        raise UsageError(
            f"No volumes found in {folder} (looked for *{VOLUME_SUFFIX}), but the network takes "
            f"volumes [B, C, D, H, W]. Pass {_VOLUME_DATA}."
        )
    files = list(files[: spec.limit] if spec.limit else files)
    mask_dir = root / "masks"
    masks = [m for _, m in pair_volumes(files, mask_dir)] if mask_dir.is_dir() else None
    source = VolumeSource(
        tuple(files),
        tuple(masks) if masks is not None else None,
        None if spec.own_size else spec.size,  # type: ignore[arg-type]
        spec.channels,
        spec.num_labels,
        spec.intensity_range,
        spec.zscore,
    )
    return _files_dataset(source, files, root, spec, has_masks=masks is not None)


def _files_dataset(
    read: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
    files: Sequence[Path],
    root: Path,
    spec: DataSpec,
    has_masks: bool,
) -> AuditDataset:
    """A dataset of files under ``root``: safe unique names from their stems, sources relative
    to ``root`` with ``/`` separators."""
    names = unique_components([p.stem for p in files], fallback="image")
    sources = [p.relative_to(root).as_posix() for p in files]
    paths = [str(p) for p in files]
    own_size = spec.own_size and spec.volumes
    return AuditDataset(
        read, names, paths, spec.size, has_masks, sources, spec.channels, own_size=own_size
    )


def _init_worker(_worker_id: int) -> None:
    # One OpenCV thread per worker (PyTorch already sets its own to one). A forked worker has
    # inherited opencv_threads(1) and must not call cv2.setNumThreads (see make_loader); a
    # spawned one (macOS, forkserver) starts with OpenCV's full pool and may.
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def make_loader(dataset: Dataset, source: DataSource, pin: bool) -> DataLoader:
    """The audit's DataLoader: in order, ``--batch-size`` (one item per batch for items of
    their own sizes: volumes explained through sliding windows), ``--num-workers``.

    Iterate it inside :func:`~segcam_lightning.render.opencv_threads` ``(1)``: forked workers
    then inherit one OpenCV thread each. A worker forked after the render threads have used
    OpenCV's pool blocks for ever in ``cv2.setNumThreads`` (OpenCV's pthreads backend; seen
    with ``os.fork`` alone), so a worker only calls it when it did not inherit 1.
    """
    workers = source.num_workers
    return DataLoader(
        dataset,
        batch_size=1 if getattr(dataset, "own_size", False) else source.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_init_worker if workers else None,
        prefetch_factor=4 if workers else None,
    )
