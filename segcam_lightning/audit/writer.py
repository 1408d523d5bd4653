"""Panels and report tiles rendered in a thread pool; metric rows collected per process."""

from __future__ import annotations

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

from segcam_lightning.audit.batches import BatchResult
from segcam_lightning.audit.paths import OutputLayout
from segcam_lightning.audit.settings import JPEG_PARAMS, VALUE_NAMES
from segcam_lightning.render import colorize_mask, seed_panels


@dataclass
class LocalResult:
    """What one process audited: metric rows, skipped items, counts (plain data, picklable)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    report_images: list[tuple[int, str]] = field(default_factory=list)
    processed: int = 0
    files: int = 0
    rank: int = 0
    seconds: float = 0.0


class OutputWriter:
    """Renders panels and report tiles in a thread pool and collects the metric rows.

    Each image is one job (its panels and tiles for every checkpoint, layer and class), so the
    threads share a batch evenly. With ``overlap`` (a GPU computes the CAMs), a batch renders
    while the next one is explained; without it (the CPU computes them with every core), the
    batch's files are written before :meth:`submit` returns: render threads running beside
    PyTorch's own threads would stall its parallel kernels (measured: the audit then spent ~9 ms
    per 128² image on rendering that takes 2.6 ms on one thread; see benchmarks/RESULTS.md).

    Args:
        layout: where files go.
        layer_names: the ``L`` layer names.
        classes: the ``K`` class ids.
        class_names: all class names (indexed by class id).
        colormap: BGR colours for masks and predictions, at least one per class.
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
        self._class_ids = np.asarray(self.classes).reshape(-1, 1, 1)
        self.class_names = list(class_names)
        self.colormap = [tuple(c) for c in colormap]
        self.report_limit = report_images
        self.threads = threads
        self.overlap = overlap
        self.result = LocalResult()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[int]] = deque()
        self._seen: set[int] = set()
        self._start = 0.0

    def open(self, rank: int = 0) -> None:
        """Create the panel folders and start the thread pool."""
        for folder in self.layout.panel_dirs(self.classes):
            folder.mkdir(parents=True, exist_ok=True)
        self.result = LocalResult(rank=rank)
        self._seen = set()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="audit-render")
        self._start = time.perf_counter()

    def submit(self, batch: BatchResult, owns: Callable[[int], bool] | None = None) -> None:
        """Queue a batch's files and record its rows; items ``owns`` rejects, or already seen,
        are dropped (a distributed sampler may hand an image to two ranks)."""
        if self._pool is None:
            raise RuntimeError("OutputWriter.submit() called before open().")
        for item in batch.skipped:
            if self._take(item["index"], owns):
                self.result.skipped.append(item)
        keep = [self._take(i, owns) for i in batch.indices]
        if not all(keep):
            batch = batch.select(keep)
        if not batch.indices:
            return
        self.result.processed += len(batch.indices)
        self.result.rows.extend(self._rows(batch))
        self.result.report_images.extend(
            (i, n) for i, n in zip(batch.indices, batch.names, strict=True) if i < self.report_limit
        )
        for b in range(len(batch.indices)):
            self._queue(self._write_image, batch, b)
        if not self.overlap:
            self._wait(0)

    def close(self) -> LocalResult:
        """Wait for every file, stop the pool and return this process's :class:`LocalResult`."""
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

    def _queue(self, fn: Callable[..., int], *args: Any) -> None:
        # Bounded: a few images per thread in flight, so memory stays flat on any dataset size.
        self._wait(8 * self.threads - 1)
        self._pending.append(self._pool.submit(fn, *args))  # type: ignore[union-attr]

    def _wait(self, most: int) -> None:
        """Collect finished jobs until at most ``most`` are pending."""
        while len(self._pending) > most:
            self.result.files += self._pending.popleft().result()

    def _rows(self, batch: BatchResult) -> Iterable[dict[str, Any]]:
        for m, model in enumerate(batch.models):
            label = self.layout.models[m]
            for b, (index, name) in enumerate(zip(batch.indices, batch.names, strict=True)):
                for layer, layer_name in enumerate(self.layer_names):
                    for k, class_idx in enumerate(self.classes):
                        row = {
                            "checkpoint": label,
                            "layer": layer_name,
                            "index": index,
                            "image": name,
                            "class": class_idx,
                            "class_name": self.class_names[class_idx],
                        }
                        for value_name in VALUE_NAMES:
                            row[value_name] = float(model.values[value_name][b, layer, k])
                        yield row

    def _write_image(self, batch: BatchResult, b: int) -> int:
        """Image ``b``'s panels for every checkpoint, layer and class, and its report tiles."""
        index, name, image = batch.indices[b], batch.names[b], batch.images[b]
        mask = batch.masks[b] if batch.masks is not None else None
        in_report = index < self.report_limit
        regions = mask[None] == self._class_ids if mask is not None else None  # [K, H, W]
        written = 0
        if in_report:
            _imwrite(self.layout.input_tile(name), image, JPEG_PARAMS)
            written += 1
            if mask is not None:
                _imwrite(self.layout.truth_tile(name), colorize_mask(mask, self.colormap))
                written += 1
        for m, model in enumerate(batch.models):
            if in_report:
                pred = colorize_mask(model.preds[b], self.colormap)
                _imwrite(self.layout.prediction_tile(name, m), pred)
                written += 1
            for layer in range(len(self.layer_names)):
                panels, overlays = seed_panels(image, model.cams[b, layer], regions)
                for k, class_idx in enumerate(self.classes):
                    _imwrite(self.layout.panel(m, layer, class_idx, name), panels[k], JPEG_PARAMS)
                    written += 1
                    if in_report:
                        tile = self.layout.overlay_tile(name, m, layer, class_idx)
                        _imwrite(tile, overlays[k], JPEG_PARAMS)
                        written += 1
        return written


def default_render_threads() -> int:
    """Half the CPU cores this process may use, at least 2 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(2, (cores or 2) // 2))


def _imwrite(path: Path, rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params)):
        raise OSError(f"cv2 could not write {path}; check that the folder is writable.")
