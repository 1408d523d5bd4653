"""Overhead of GradCAMCallback on the default training run, measured in one process.

Runs ``fit`` on ``configs/synthetic.yaml`` as shipped (callback on: d4 + e4, 8 probe images, every
epoch) and on the same config with the callback removed, alternating the order over
``--repeats`` rounds, and prints the wall-time ratio (with / without) of each round and the
median. Each fit starts from the same seed, so both do the same training work.

    python benchmarks/bench_callback.py                  # the full default run, twice
    python benchmarks/bench_callback.py --max-epochs 2   # shorter
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segcam_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "synthetic.yaml"


def fit_seconds(with_callback: bool, max_epochs: int | None, workdir: Path) -> tuple[float, float]:
    args = ["--config", str(CONFIG), "--trainer.enable_progress_bar=false"]
    args += [
        f"--trainer.default_root_dir={workdir}",
        f"--trainer.logger.init_args.save_dir={workdir}",
    ]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")  # the cosine schedule follows it
    cli = build_cli(args, run=False)
    if not with_callback:
        cli.trainer.callbacks = [
            c for c in cli.trainer.callbacks if type(c).__name__ != "GradCAMCallback"
        ]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return time.perf_counter() - start, float(cli.trainer.callback_metrics["val/mIoU"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (without, with)")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads:"
        f" {torch.get_num_threads()}, torch {torch.__version__}"
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            seconds = {}
            for with_callback in order:
                workdir = Path(tmp) / f"r{round_}-{int(with_callback)}"
                seconds[with_callback], miou = fit_seconds(with_callback, args.max_epochs, workdir)
                label = "with callback   " if with_callback else "without callback"
                print(
                    f"round {round_}: {label} {seconds[with_callback]:8.1f} s  val/mIoU {miou:.3f}"
                )
            ratios.append(seconds[True] / seconds[False])
            print(f"round {round_}: ratio {ratios[-1]:.3f}")
    print(f"median ratio (with / without): {statistics.median(ratios):.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
