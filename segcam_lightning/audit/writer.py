"""Panels and report tiles rendered in a thread pool; metric rows collected per process.

A volume's panel stacks three of the original script's panels, one per view (axial, coronal,
sagittal: the slices through the class's CAM peak), 10 px white gaps between them; its maps are
also saved as ``cams/<name>.npy``: float32 ``[L, K, D, H, W]`` (layers, classes), the engine's
maps as they are (stitched, with sliding windows), and, when ``nibabel`` is installed, as
``cams/<name>.nii.gz`` (:func:`nifti_bytes`).
"""

from __future__ import annotations

import gzip
import io
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segcam_lightning.audit.batches import BatchResult
from segcam_lightning.audit.paths import OutputLayout, write_atomic
from segcam_lightning.audit.settings import BROKEN, JPEG_PARAMS, VALUE_NAMES, Stop
from segcam_lightning.audit.tallies import image_tally
from segcam_lightning.render import (
    SEPARATOR,
    VIEWS,
    blog_panels,
    colorize_mask,
    panel_layout,
    peak_voxel,
    volume_slices,
)


@dataclass
class LocalResult:
    """What one process audited: metric rows, skipped items, counts (plain data, picklable).

    An image counts (``processed``, its ``rows``, its files in ``written``: path relative to
    ``--out`` -> bytes, its pixel counts in ``tallies``: :mod:`~segcam_lightning.audit.tallies`)
    once all its files are written. ``stopped`` says why the run ended
    before its last image (``None`` when it did not).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    report_images: list[tuple[int, str]] = field(default_factory=list)
    processed: int = 0
    files: int = 0
    written: dict[str, int] = field(default_factory=dict)
    tallies: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    seconds: float = 0.0
    stopped: Stop | None = None

    def finished(self) -> set[int]:
        """Dataset indices done: audited (every file written) or skipped."""
        return {row["index"] for row in self.rows} | {item["index"] for item in self.skipped}

    def merged(self, later: LocalResult) -> LocalResult:
        """This result followed by ``later``'s (a resumed run's), with ``later``'s stop."""
        return LocalResult(
            rows=self.rows + later.rows,
            skipped=self.skipped + later.skipped,
            report_images=self.report_images + later.report_images,
            processed=self.processed + later.processed,
            files=self.files + later.files,
            written={**self.written, **later.written},
            tallies=self.tallies + later.tallies,
            rank=later.rank,
            seconds=self.seconds + later.seconds,
            stopped=later.stopped,
        )


@dataclass
class _ImageJob:
    """One image's rendering job and what it adds to the result once its files are written."""

    future: Future[dict[str, int]]
    index: int
    rows: list[dict[str, Any]]
    report_image: tuple[int, str] | None
    tally: dict[str, Any] | None = None


class OutputWriter:
    """Renders panels and report tiles in a thread pool and collects the metric rows.

    Each image is one job (its panels and tiles for every checkpoint, layer and class), so the
    threads share a batch evenly. With ``overlap`` (a GPU computes the CAMs), a batch renders
    while the next one is explained; without it (the CPU computes them with every core), the
    batch's files are written before :meth:`submit` returns: render threads running beside
    PyTorch's own threads stall its parallel kernels (benchmarks/RESULTS.md, Implementation
    notes).

    Args:
        layout: where files go.
        layer_names: the ``L`` layer names.
        classes: the ``K`` class ids.
        class_names: all class names (indexed by class id: output channel).
        colormap: BGR colours for masks and predictions, at least one per mask label.
        report_images: images with a dataset index below this get report tiles.
        threads: rendering threads.
        overlap: render while the next batch is computed (else finish each batch first).
    """

    def __init__(
        self,
        layout: OutputLayout,
        layer_names: Sequence[str],
        classes: Sequence[int],
        class_names: Sequence[str],
        colormap: Sequence[Sequence[int]],
        report_images: int,
        threads: int,
        overlap: bool = True,
    ) -> None:
        self.layout = layout
        self.layer_names = list(layer_names)
        self.classes = list(classes)
        self.class_names = list(class_names)
        self.colormap = [tuple(c) for c in colormap]
        self.report_limit = report_images
        self.threads = threads
        self.overlap = overlap
        self.result = LocalResult()
        #: The first failure of a rendering job (its image is not counted), else ``None``.
        self.failure: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[_ImageJob] = deque()
        self._seen: set[int] = set()
        self._start = 0.0

    def open(self, rank: int = 0) -> None:
        """Create the panel folders and start the thread pool."""
        for folder in self.layout.panel_dirs(self.classes):
            folder.mkdir(parents=True, exist_ok=True)
        self.result = LocalResult(rank=rank)
        self.failure = None
        self._seen = set()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="audit-render")
        self._start = time.perf_counter()

    def submit(self, batch: BatchResult, owns: Callable[[int], bool] | None = None) -> None:
        """Queue a batch's files; each image's rows are recorded once its files are written.
        Items ``owns`` rejects, or already seen, are dropped (a distributed sampler may hand an
        image to two ranks).

        Raises:
            Exception: the first failure of an earlier rendering job (:attr:`failure`), so a run
                stops at a full disk instead of rendering on.
        """
        if self._pool is None:
            raise RuntimeError("OutputWriter.submit() called before open().")
        self._raise_failure()
        for item in batch.skipped:
            if self._take(item["index"], owns):
                self.result.skipped.append(item)
        keep = [self._take(i, owns) for i in batch.indices]
        if not all(keep):
            batch = batch.select(keep)
        for b, (index, name) in enumerate(zip(batch.indices, batch.names, strict=True)):
            self._wait(8 * self.threads - 1)  # a few images per thread in flight: flat memory
            future = self._pool.submit(self._write_image, batch, b)
            report = (index, name) if index < self.report_limit else None
            rows = list(self._rows(batch, b))
            self._pending.append(_ImageJob(future, index, rows, report, self._tally(batch, b)))
        if not self.overlap:
            self._wait(0)
            self._raise_failure()

    def close(self) -> LocalResult:
        """Wait for every file, stop the pool and return this process's :class:`LocalResult`
        (the images whose files were all written; a failure is left in :attr:`failure`)."""
        try:
            self._wait(0)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        self.result.seconds = time.perf_counter() - self._start
        return self.result

    def _take(self, index: int, owns: Callable[[int], bool] | None) -> bool:
        if index in self._seen or (owns is not None and not owns(index)):
            return False
        self._seen.add(index)
        return True

    def _wait(self, most: int) -> None:
        """Collect finished jobs until at most ``most`` are pending: a job's image counts once
        its files are written; a failed job's image does not, and its error is kept."""
        while len(self._pending) > most:
            job = self._pending.popleft()
            try:
                written = job.future.result()
            except Exception as error:  # kept for the caller: the other images still count
                self.failure = self.failure or error
                continue
            self.result.files += len(written)
            self.result.written.update(written)
            self.result.processed += 1
            self.result.rows.extend(job.rows)
            if job.report_image is not None:
                self.result.report_images.append(job.report_image)
            if job.tally is not None:
                self.result.tallies.append(job.tally)

    def _tally(self, batch: BatchResult, b: int) -> dict[str, Any] | None:
        """Image ``b``'s pixel counts per checkpoint (:func:`image_tally`)."""
        if not batch.models:
            return None
        models = batch.models
        return image_tally(
            batch.indices[b],
            int(np.prod(models[0].cams.shape[3:])),
            self.layout.models,
            [
                {k: v[b] for k, v in m.counts.items()} if m.counts is not None else None
                for m in models
            ],
            [m.values["energy_inside"][b] for m in models],
            [m.finite is not None and not bool(m.finite[b]) for m in models],
        )

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _rows(self, batch: BatchResult, b: int) -> Iterable[dict[str, Any]]:
        """Image ``b``'s rows: one per checkpoint × layer × class; those of a checkpoint whose
        logits are not finite on the image carry ``"run_status": "broken"``."""
        index, name, source = batch.indices[b], batch.names[b], batch.sources[b]
        for m, model in enumerate(batch.models):
            broken = model.finite is not None and not bool(model.finite[b])
            for layer, layer_name in enumerate(self.layer_names):
                for k, class_idx in enumerate(self.classes):
                    row = {
                        "checkpoint": self.layout.models[m],
                        "layer": layer_name,
                        "index": index,
                        "image": name,
                        "source": source,
                        "class": class_idx,
                        "class_name": self.class_names[class_idx],
                    }
                    for value_name in VALUE_NAMES:
                        row[value_name] = float(model.values[value_name][b, layer, k])
                    if broken:
                        row["run_status"] = BROKEN
                    yield row

    def _write_image(self, batch: BatchResult, b: int) -> dict[str, int]:
        """Write image ``b``'s files; returns them (path relative to the root -> bytes).

        A failure (a full disk) removes the files of this image already written, so that
        every image's files are on disk whole or not at all, and frees their space.
        """
        written: dict[Path, int] = {}
        try:
            if batch.volumes:
                self._write_volume(batch, b, written)
            else:
                self._write_panels(batch, b, written)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return {path.relative_to(self.layout.root).as_posix(): n for path, n in written.items()}

    def _write_panels(self, batch: BatchResult, b: int, written: dict[Path, int]) -> None:
        """Image ``b``'s panels for every checkpoint, layer and class, and its report tiles,
        each recorded in ``written`` once on disk."""
        index, name, image = batch.indices[b], batch.names[b], batch.images[b]
        mask = batch.masks[b] if batch.masks is not None else None
        in_report = index < self.report_limit
        regions = batch.truth[b] if batch.truth is not None else None  # [K, H, W]
        if in_report:
            _imwrite(written, self.layout.input_tile(name), image, JPEG_PARAMS)
            if mask is not None:
                truth = colorize_mask(mask, self.colormap)
                _imwrite(written, self.layout.truth_tile(name), truth)
        for m, model in enumerate(batch.models):
            if in_report:
                pred = colorize_mask(model.preds[b], self.colormap)
                _imwrite(written, self.layout.prediction_tile(name, m), pred)
            for layer in range(len(self.layer_names)):
                overlays = model.overlays[b, layer]  # type: ignore[index]
                panels = panel_layout(image, overlays, regions)
                for k, class_idx in enumerate(self.classes):
                    path = self.layout.panel(m, layer, class_idx, name)
                    _imwrite(written, path, panels[k], JPEG_PARAMS)
                    if in_report:
                        tile = self.layout.overlay_tile(name, m, layer, class_idx)
                        _imwrite(written, tile, overlays[k], JPEG_PARAMS)

    def _write_volume(self, batch: BatchResult, b: int, written: dict[Path, int]) -> None:
        """Volume ``b``'s maps (``cams/<name>.npy``) and panels for every checkpoint, layer and
        class, and its report tiles: one per view, through the centre for the volume, its
        ground truth and predictions, through each class's peak for its overlays. Each file
        is recorded in ``written`` once on disk."""
        index, name = batch.indices[b], batch.names[b]
        volume = torch.from_numpy(batch.images[b])  # [D, H, W] uint8
        size = (max(volume.shape), max(volume.shape))
        in_report = index < self.report_limit
        regions = torch.from_numpy(batch.truth[b]) if batch.truth is not None else None
        centre = tuple(n // 2 for n in volume.shape)
        if in_report:
            for v, view in enumerate(VIEWS):
                path = self.layout.input_tile(name, view)
                _imwrite(written, path, _grey(volume, centre, size)[v])
            if batch.masks is not None:
                self._label_tiles(written, batch.masks[b], centre, size, name, None)
        for m, model in enumerate(batch.models):
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(model.cams[b], dtype=np.float32))
            path = self.layout.cams(m, name)
            write_atomic(path, buffer.getvalue())
            written[path] = buffer.getbuffer().nbytes
            nifti = nifti_bytes(model.cams[b])
            if nifti is not None:
                path = path.with_name(f"{name}.nii.gz")
                write_atomic(path, nifti)
                written[path] = len(nifti)
            if in_report:
                self._label_tiles(written, model.preds[b], centre, size, name, m)
            for layer in range(len(self.layer_names)):
                for k, class_idx in enumerate(self.classes):
                    cam = torch.from_numpy(model.cams[b, layer, k])
                    region = regions[k] if regions is not None else None
                    panel, overlays = _volume_panel(volume, cam, region, size)
                    path = self.layout.panel(m, layer, class_idx, name)
                    _imwrite(written, path, panel, JPEG_PARAMS)
                    if in_report:
                        for view, overlay in zip(VIEWS, overlays, strict=True):
                            tile = self.layout.overlay_tile(name, m, layer, class_idx, view)
                            _imwrite(written, tile, overlay, JPEG_PARAMS)

    def _label_tiles(
        self,
        written: dict[Path, int],
        labels: np.ndarray,
        at: Sequence[int],
        size: tuple[int, int],
        name: str,
        model: int | None,
    ) -> None:
        """The ground truth's (``model`` ``None``) or a model's predicted labels ``[D, H, W]``
        sliced at ``at``, one coloured tile per view (recorded in ``written``)."""
        slices = volume_slices(torch.from_numpy(labels), at, size, labels=True)
        for view, tile in zip(VIEWS, slices, strict=True):
            if model is None:
                path = self.layout.truth_tile(name, view)
            else:
                path = self.layout.prediction_tile(name, model, view)
            _imwrite(written, path, colorize_mask(tile.numpy(), self.colormap))


def _grey(volume: torch.Tensor, at: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """The three views of a grey uint8 volume ``[D, H, W]`` through ``at``, as RGB
    ``[3, *size, 3]`` uint8."""
    slices = volume_slices(volume, at, size).numpy()
    return np.ascontiguousarray(np.repeat(slices[..., None], 3, axis=-1))


def _volume_panel(
    volume: torch.Tensor, cam: torch.Tensor, region: torch.Tensor | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One class's panel of a volume: the original script's panel (image | overlay | ground
    truth) of the axial, coronal and sagittal slices through the map's peak, stacked with white
    gaps.

    Args:
        volume: ``[D, H, W]`` uint8 grey.
        cam: ``[D, H, W]`` the class's map in [0, 1].
        region: ``[D, H, W]`` bool, the class's ground truth, or ``None``.
        size: ``(h, w)`` each slice is shown at.

    Returns:
        ``(panel [rows, cols, 3], overlays [3, *size, 3])`` RGB uint8.
    """
    peak = peak_voxel(cam)
    images = _grey(volume, peak, size)
    maps = volume_slices(cam, peak, size).numpy()
    truth = volume_slices(region, peak, size, labels=True).numpy() if region is not None else None
    rows, overlays = [], []
    for v in range(len(VIEWS)):
        masks = truth[v : v + 1] if truth is not None else None
        panels, overlay = blog_panels(images[v], maps[v : v + 1], masks)
        rows.append(panels[0])
        overlays.append(overlay[0])
    gap = np.full((SEPARATOR, rows[0].shape[1], 3), 255, dtype=np.uint8)
    panel = np.concatenate([rows[0], gap, rows[1], gap, rows[2]], axis=0)
    return panel, np.stack(overlays)


def nifti_bytes(cams: np.ndarray) -> bytes | None:
    """A volume's maps ``[L, K, D, H, W]`` as a gzipped NIfTI-1 file, or ``None`` without
    ``nibabel`` (optional: ``pip install nibabel``).

    The data is float32 ``[D, H, W, L, K]``: the voxel axes i, j, k are the ``.npy``'s
    ``D, H, W`` (as MONAI's ``LoadImage`` gives a NIfTI's axes), then layers and classes. The
    affine is the identity (voxel units): the audit reads ``.npy`` volumes, which carry none.
    """
    try:
        import nibabel
    except ImportError:
        return None
    data = np.ascontiguousarray(np.moveaxis(cams, (0, 1), (3, 4)), dtype=np.float32)
    image = nibabel.Nifti1Image(data, np.eye(4))
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def default_render_threads() -> int:
    """Half the CPU cores this process may use, at least 2 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(2, (cores or 2) // 2))


def _imwrite(
    written: dict[Path, int], path: Path, rgb: np.ndarray, params: Sequence[int] = ()
) -> None:
    """Encode an RGB image by ``path``'s extension, write it atomically and record its size
    in ``written``."""
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))
    if not ok:
        raise OSError(f"cv2 could not encode {path.name} as {path.suffix} (image {rgb.shape}).")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encoded.tobytes()
    write_atomic(path, data)
    written[path] = len(data)
