"""The audit's data: seed-format folders, image folders and the synthetic set; skipped items."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader, Dataset

from segcam_lightning.audit.paths import unique_components
from segcam_lightning.audit.settings import (
    PROG,
    SYNTHETIC,
    SYNTHETIC_DEFAULT_COUNT,
    SYNTHETIC_TEST_SEED,
    AuditSettings,
    UsageError,
)
from segcam_lightning.data.folder import IMAGE_EXTENSIONS, FolderSegmentation, read_image
from segcam_lightning.data.synthetic import SYNTHETIC_CLASS_NAMES, SyntheticSegmentation

# The fix for unknown mask colours in explain.py's own options.
_COLOR_HINT = (
    f"Pass the masks' colours to {PROG}, one [b, g, r] per class in cv2's BGR order, e.g. "
    "--colormap '[[0,0,0],[0,0,128],[0,128,0]]'."
)


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
    dataset: SyntheticSegmentation

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.dataset.render(index)
        return image, mask.astype(np.int64)


class AuditDataset(Dataset):
    """Items read one by one; an unreadable item comes back marked as skipped, never raises.

    Each sample: ``"index"``, ``"name"`` (a safe, unique file stem), ``"source"``, ``"path"``,
    ``"ok"``, ``"reason"`` (why it was skipped, else ``""``), ``"image"`` ``[3, H, W]`` uint8 RGB
    (zeros when skipped) and, with masks, ``"mask"`` ``[H, W]`` int64.

    Args:
        read: ``read(index) -> (image [H, W, 3] uint8 RGB, mask [H, W] int64 or None)``.
        names: one name per item.
        paths: one source description per item (file path, or ``synthetic:<index>``).
        size: ``(height, width)`` of every image.
        has_masks: whether items carry ground truth.
        sources: one name per item that maps it back to its file whatever its script: the path
            relative to ``--data`` (or ``synthetic:<index>``); ``paths`` by default.
    """

    def __init__(
        self,
        read: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
        names: Sequence[str],
        paths: Sequence[str],
        size: tuple[int, int],
        has_masks: bool,
        sources: Sequence[str] | None = None,
    ) -> None:
        self.read = read
        self.names = list(names)
        self.paths = list(paths)
        self.sources = list(sources) if sources is not None else list(paths)
        self.size = size
        self.has_masks = has_masks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        height, width = self.size
        try:
            image, mask = self.read(index)
            reason = ""
        except Exception as error:  # any unreadable file is skipped, with the reason
            image, mask = np.zeros((height, width, 3), np.uint8), None
            reason = f"{type(error).__name__}: {error}"
        sample = {
            "index": index,
            "name": self.names[index],
            "source": self.sources[index],
            "path": self.paths[index],
            "ok": not reason,
            "reason": reason,
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        }
        if self.has_masks:
            if mask is None:
                mask = np.zeros((height, width), np.int64)
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        return sample


def build_dataset(
    data: str,
    size: tuple[int, int],
    colormap: Sequence[Sequence[int]],
    num_classes: int,
    limit: int | None,
    kind: str = "multiclass",
) -> AuditDataset:
    """The audit's dataset for ``--data``: synthetic, a seed-format folder or an image folder.

    Args:
        data: ``--data``.
        size: ``(height, width)`` every image is resized to.
        colormap: the masks' colours, one per mask label (BGR).
        num_classes: the mask labels: the model's classes, or 2 for a binary model
            (background, foreground).
        limit: ``--limit``.
        kind: the model's output kind, for messages.

    Raises:
        UsageError: for a missing folder, no images, unpaired files, or a colormap that does
            not have one colour per class.
    """
    if data == SYNTHETIC:
        return _synthetic_dataset(size, num_classes, limit)
    root = Path(data)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(
            f"--data {root} {what}. Pass a folder with images/ and masks/ (the seed's layout), a "
            "folder of images, or 'synthetic'; write an example with `segcam-synthetic --out "
            f"{root}`."
        )
    try:
        if (root / "masks").is_dir():
            return _folder_dataset(root, size, colormap, num_classes, limit, kind)
        return _image_folder_dataset(root, size, limit)
    except OSError as error:  # a folder that cannot be listed: an input problem, not a bug
        folder = error.filename or root
        raise UsageError(
            f"Could not read the data folder {folder}: {error.strerror or error}. The audit lists "
            f"--data's images/ and masks/ before it starts; make them readable (e.g. chmod -R "
            f"u+rX {root}) or pass another --data."
        ) from None


def _synthetic_dataset(size: tuple[int, int], num_classes: int, limit: int | None) -> AuditDataset:
    if size[0] != size[1] or num_classes != len(SYNTHETIC_CLASS_NAMES):
        raise UsageError(
            f"The synthetic data has {len(SYNTHETIC_CLASS_NAMES)} classes "
            f"{list(SYNTHETIC_CLASS_NAMES)} and square images, but the model predicts "
            f"{num_classes} classes at {size[0]}x{size[1]}. Audit this checkpoint on its own "
            "data with --data DIR."
        )
    dataset = SyntheticSegmentation(limit or SYNTHETIC_DEFAULT_COUNT, size[0], SYNTHETIC_TEST_SEED)
    names = [dataset.name(i) for i in range(len(dataset))]
    paths = [f"synthetic:{i}" for i in range(len(dataset))]
    return AuditDataset(_SyntheticSource(dataset), names, paths, size, has_masks=True)


def _folder_dataset(
    root: Path,
    size: tuple[int, int],
    colormap: Sequence[Sequence[int]],
    num_classes: int,
    limit: int | None,
    kind: str,
) -> AuditDataset:
    if len(colormap) != num_classes:
        if kind == "binary":
            what, example = "is binary: its masks have background and foreground", "[255,255,255]"
        else:
            what, example = f"predicts {num_classes} classes", "[0,0,128],[0,128,0]"
        raise UsageError(
            f"The masks' colormap has {len(colormap)} colours {[list(c) for c in colormap]}, but "
            f"the model {what}. Pass the masks' colours, one [b, g, r] per "
            f"{'label' if kind == 'binary' else 'class'} in cv2's BGR order, e.g. --colormap "
            f"'[[0,0,0],{example}]'."
        )
    try:
        reader = FolderSegmentation(
            root,
            size,
            colormap,
            channel_order="rgb",
            check=False,
            unknown_color_hint=_COLOR_HINT,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    pairs = reader.pairs[:limit] if limit else reader.pairs
    images = [image for image, _ in pairs]
    return _files_dataset(_FolderSource(reader, tuple(pairs)), images, root, size, has_masks=True)


def _image_folder_dataset(root: Path, size: tuple[int, int], limit: int | None) -> AuditDataset:
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise UsageError(
            f"No images found in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case). "
            "Pass a folder with images/ (and masks/ for ground-truth metrics) or of images."
        )
    files = files[:limit] if limit else files
    return _files_dataset(_ImageSource(tuple(files), size), files, root, size, has_masks=False)


def _files_dataset(
    read: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
    files: Sequence[Path],
    root: Path,
    size: tuple[int, int],
    has_masks: bool,
) -> AuditDataset:
    """A dataset of image files under ``root``: safe unique names from their stems, sources
    relative to ``root`` with ``/`` separators."""
    names = unique_components([p.stem for p in files], fallback="image")
    sources = [p.relative_to(root).as_posix() for p in files]
    return AuditDataset(read, names, [str(p) for p in files], size, has_masks, sources)


def _init_worker(_worker_id: int) -> None:
    # One OpenCV thread per worker (PyTorch already sets its own to one). A forked worker has
    # inherited opencv_threads(1) and must not call cv2.setNumThreads (see make_loader); a
    # spawned one (macOS, forkserver) starts with OpenCV's full pool and may.
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def make_loader(dataset: Dataset, settings: AuditSettings, pin: bool) -> DataLoader:
    """The audit's DataLoader: in order, ``--batch-size``, ``--num-workers``.

    Iterate it inside :func:`~segcam_lightning.render.opencv_threads` ``(1)``: forked workers
    then inherit one OpenCV thread each. A worker forked after the render threads have used
    OpenCV's pool blocks for ever in ``cv2.setNumThreads`` (OpenCV's pthreads backend; seen
    with ``os.fork`` alone), so a worker only calls it when it did not inherit 1.
    """
    workers = settings.num_workers
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_init_worker if workers else None,
        prefetch_factor=4 if workers else None,
    )
