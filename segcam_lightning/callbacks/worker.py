"""A background worker for the pictures: training does not wait for grids to be encoded and written.

:class:`PictureWorker` runs jobs (encoding a step's grids, handing them to the loggers) one
after another on a daemon thread, in the order they came. Its queue is bounded: a
slow disk slows the worker, and when the queue is full the training thread waits (said once),
so memory never grows without bound and nothing is dropped. The first failure of a job is kept
and raised on the training thread by the next :meth:`~PictureWorker.submit` (after queueing its
job) or :meth:`~PictureWorker.flush`; the jobs after it still run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable

__all__ = ["PictureWorker"]

_STOP = object()


class PictureWorker:
    """Runs picture jobs on one background thread, in order.

    Args:
        max_pending: jobs that may wait in the queue; a further :meth:`submit` blocks until the
            worker takes one.
        on_full: called once, the first time :meth:`submit` has to wait.
        nice: the thread's scheduling niceness on Linux (higher yields the CPU to training).
    """

    def __init__(
        self,
        max_pending: int = 2,
        on_full: Callable[[], None] | None = None,
        nice: int = 10,
    ) -> None:
        self._nice = nice
        self._jobs: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._on_full = on_full
        self._told = False
        self._error: BaseException | None = None
        self._error_text = ""
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``, then raise a failure of an earlier job, if any (``job`` is queued
        either way: nothing is dropped)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="segcam-pictures", daemon=True)
            self._thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            if not self._told and self._on_full is not None:
                self._told = True
                self._on_full()
            self._jobs.put(job)
        self.raise_failure()

    def flush(self) -> None:
        """Wait until every queued job has run; raise the first failure, if any."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.join()
        self.raise_failure()

    def close(self) -> None:
        """Run what is queued, then stop the thread (a later :meth:`submit` starts another)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._thread = None

    def raise_failure(self) -> None:
        """Raise the first failure of a job (once), with the worker's traceback in its message."""
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(
                f"the picture worker failed: {error!r}\n{self._error_text}"
            ) from error

    def _run(self) -> None:
        if sys.platform.startswith("linux"):  # this thread only: training keeps the cores
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                job()  # type: ignore[operator]
            except BaseException as error:  # raised on the training thread
                if self._error is None:  # the first failure; later jobs still run
                    self._error, self._error_text = error, traceback.format_exc()
            finally:
                self._jobs.task_done()
