"""Overhead of GradCAMCallback and ShortcutMonitor on the default training run, in one process.

Runs ``fit`` on ``configs/synthetic.yaml`` as shipped (GradCAMCallback on d4 + e4 and
ShortcutMonitor, 8 probe images, every epoch) and on the same config with both removed,
alternating the order over ``--repeats`` rounds, and prints the wall-time ratio (with /
without) of each round and the median. Each fit starts from the same seed, so both do the same
training work. It also times the callbacks' work on the training thread (every ``log_cams``
call: CAMs, gather, scalars, the map watch, drawing the grids; every
objects-alone test of the monitor) and prints it as a share of that fit: a
figure that does not move with the machine's run-to-run noise, which on a shared VM can exceed
the callbacks' cost. The picture worker's time (encoding and writing the grids, beside training)
is printed too.

    python benchmarks/bench_callback.py                  # the full default run, twice
    python benchmarks/bench_callback.py --max-epochs 2   # shorter
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from segcam_lightning.callbacks import gradcam
from segcam_lightning.cli import build_cli

#: The grids' encoding and writing, which GradCAMCallback hands to its picture worker.
WRITE = gradcam.write_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "synthetic.yaml"


def fit_seconds(
    with_callback: bool, max_epochs: int | None, workdir: Path
) -> tuple[float, float, float, float]:
    """``(fit seconds, val/mIoU, seconds of the callbacks' work on the training thread, seconds
    of the picture worker's)``."""
    args = ["--config", str(CONFIG), "--trainer.enable_progress_bar=false"]
    args += [
        f"--trainer.default_root_dir={workdir}",
        f"--trainer.logger.init_args.save_dir={workdir}",
    ]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")  # the cosine schedule follows it
    cli = build_cli(args, run=False)
    ours = ("GradCAMCallback", "ShortcutMonitor")
    if not with_callback:
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ not in ours]
    inside, worker = [0.0], [0.0]
    gradcam.write_images = _timed(WRITE, worker)  # what the picture worker runs
    for callback in cli.trainer.callbacks:
        if type(callback).__name__ == "GradCAMCallback":
            callback.log_cams = _timed(callback.log_cams, inside)
        if type(callback).__name__ == "ShortcutMonitor":  # the objects-alone test, which
            # runs in its own hook or, waiting for a GradCAMCallback's logits, in that one's
            callback.test_objects_alone = _timed(callback.test_objects_alone, inside)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    return seconds, float(cli.trainer.callback_metrics["val/mIoU"]), inside[0], worker[0]


def _timed(method, total: list[float]):
    """``method``, adding its seconds to ``total`` unless another timed call encloses it (the
    objects-alone test may run inside ``log_cams``, waiting for its logits)."""

    def timed(*args, **kwargs):
        if getattr(_running, "depth", 0):
            return method(*args, **kwargs)
        _running.depth = 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _running.depth = 0
            total[0] += time.perf_counter() - start

    return timed


_running = threading.local()  # whether a timed call runs on this thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (without, with)")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads:"
        f" {torch.get_num_threads()}, torch {torch.__version__}"
    )
    ratios, shares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            seconds = {}
            for with_callback in order:
                workdir = Path(tmp) / f"r{round_}-{int(with_callback)}"
                seconds[with_callback], miou, inside, worker = fit_seconds(
                    with_callback, args.max_epochs, workdir
                )
                label = "with callback   " if with_callback else "without callback"
                print(
                    f"round {round_}: {label} {seconds[with_callback]:8.1f} s  val/mIoU {miou:.3f}"
                )
                if with_callback:
                    shares.append(inside / seconds[True])
                    print(
                        f"round {round_}: on the training thread {inside:.1f} s "
                        f"({shares[-1]:.1%}); on the picture worker {worker:.1f} s"
                    )
            ratios.append(seconds[True] / seconds[False])
            print(f"round {round_}: ratio {ratios[-1]:.3f}")
    print(f"median ratio (with / without): {statistics.median(ratios):.3f}  (goal <= 1.02)")
    print(
        f"median time of the callbacks on the training thread: {statistics.median(shares):.1%} "
        "of the fit (goal <= 1%)"
    )


if __name__ == "__main__":
    main()
