"""Audit throughput (explain.py) as a ratio to plain inference, on the same images, in one run.

Both loops read the same images through the audit's own DataLoader (same dataset, batch size and
workers), so **data loading is included in both**:

- ``inference``: the model's forward + each pixel's class (``predicted_classes``, the argmax the
  audit uses) + the predictions copied to the CPU, under ``torch.inference_mode()``;
- ``audit``: :func:`segcam_lightning.audit.audit_local`, i.e. what ``explain.py`` does per image:
  the engine (Grad-CAM at ``d4.conv.conv.5``, softmax-mean target, every class), the metrics,
  and the blog's panels (plus report tiles for the first ``--report-images``, default 8) rendered
  and written as JPEG/PNG by the render threads, timed until the last file is on disk. On a GPU
  the threads render a batch while the next is explained; on the CPU each batch's files are
  written before the next engine call (PyTorch already uses every core there).

On the CPU a second, paired figure is printed: batch by batch, the same batch is predicted and
audited (engine, metrics, files) back to back, alternating which goes first, and the ratio is the
sum of the inference times over the sum of the audit times (data loading excluded from both, which
can only lower the ratio). Consecutive timings share the machine's state, so on a shared machine
this is much steadier than whole rounds, whose ratios vary by about +-0.15 on the 2-core VM of
benchmarks/RESULTS.md.

Checkpoint loading and the end-of-run files (``metrics.csv``, ``summary.json``,
``report.html``; once per run, not per image) are timed separately and shown, not in the ratio.
The model is a blog-format ``.pth`` of a randomly initialised U-Net (speed does not depend on
the weights). Rounds alternate the order; the ratio is audit images/s over inference images/s
(goal ≥ 0.9).

Usage::

    python benchmarks/bench_explain.py                      # 64 images, 128², width 16, CPU/GPU
    python benchmarks/bench_explain.py --size 256 --width 64 --num 256 --batch-size 16 --device cuda
    python benchmarks/bench_explain.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from segcam_lightning.audit import AuditSettings
from segcam_lightning.audit.batches import explain_batch
from segcam_lightning.audit.data import make_loader
from segcam_lightning.audit.plan import prepare
from segcam_lightning.audit.report import finish
from segcam_lightning.audit.run import audit_local, make_writer
from segcam_lightning.cam.functional import predicted_classes
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.models import UNet
from segcam_lightning.render import opencv_threads


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(model, batch, device: torch.device) -> None:
    """Plain inference of one batch: forward, each pixel's class, predictions to the CPU."""
    with torch.inference_mode():
        x = batch["image"].to(device, non_blocking=True).float().div_(255.0)
        predicted_classes(model.net(model.prepare_input(x))).cpu()


def inference_seconds(plan, settings: AuditSettings) -> float:
    """Forward + per-pixel class + predictions to the CPU over the audit's DataLoader."""
    model = plan.models[0]
    loader = make_loader(plan.dataset, settings.source, pin=plan.device.type == "cuda")
    sync(plan.device)
    start = time.perf_counter()
    with opencv_threads(1):  # the audit's setting, see make_loader
        for batch in loader:
            predict(model, batch, plan.device)
    sync(plan.device)
    return time.perf_counter() - start


def paired_seconds(plan, settings: AuditSettings) -> tuple[float, float]:
    """Per batch, inference then audit (or audit then inference, alternating): summed seconds.

    CPU only: there the writer has written a batch's files when ``submit`` returns.
    """
    model = plan.models[0]
    writer = make_writer(plan)
    seconds = {"inference": 0.0, "audit": 0.0}

    def audit(batch):
        writer.submit(explain_batch(plan.models, batch, plan.classes, plan.device))

    with opencv_threads(1):
        writer.open()
        try:
            for i, batch in enumerate(make_loader(plan.dataset, settings.source, pin=False)):
                inference = partial(predict, model, device=plan.device)
                steps = (("inference", inference), ("audit", audit))
                for name, step in steps if i % 2 == 0 else steps[::-1]:
                    start = time.perf_counter()
                    step(batch)
                    seconds[name] += time.perf_counter() - start
        finally:
            writer.close()
    return seconds["inference"], seconds["audit"]


def audit_seconds(plan, settings: AuditSettings) -> tuple[float, float, object]:
    sync(plan.device)
    start = time.perf_counter()
    result = audit_local(plan, settings.source, settings.run)
    sync(plan.device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    finish(plan, settings, [result], seconds, seconds)
    return seconds, time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64, help="images (default 64)")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--width", type=int, default=16, help="U-Net base width (default 16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--render-threads", type=int, default=None, help="default: explain.py's")
    parser.add_argument(
        "--report-images",
        type=int,
        default=8,
        help="images that also get report tiles (default 8: a large audit's report shows a "
        "sample, its panels cover every image)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--repeats",
        type=int,
        default=8,
        help="rounds, alternating which loop runs first (default 8: on a shared machine single "
        "rounds vary by +-0.1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's); 1 keeps CPU timings stable on a shared machine",
    )
    parser.add_argument("--quick", action="store_true", help="16 images, 64², width 8, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.num, args.size, args.width, args.batch_size, args.repeats = 16, 64, 8, 4, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_synthetic_dataset(tmp / "data", args.num, args.size)
        torch.manual_seed(0)
        net = UNet(3, base_width=args.width)
        torch.save({"epoch": 0, "model_state_dict": net.state_dict()}, tmp / "model.pth")
        settings = AuditSettings.from_options(
            checkpoints=(tmp / "model.pth",),
            data=str(data),
            out=tmp / "out",
            size=args.size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            render_threads=args.render_threads,
            report_images=args.report_images,
            device=args.device,
            progress=False,
            overwrite=True,
        )
        plan = prepare(settings)
        print(
            f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, device {plan.device}"
            + (
                f" ({torch.cuda.get_device_name(plan.device)})"
                if plan.device.type == "cuda"
                else ""
            )
        )
        print(
            f"{args.num} images {args.size}², U-Net width {args.width}, batch {args.batch_size}, "
            f"{args.num_workers} workers, {plan.render_threads} render "
            f"threads, report tiles for "
            f"{min(args.report_images, args.num)} images; audit: gradcam at d4.conv.conv.5, "
            f"{len(plan.classes)} classes; data loading included in both"
        )
        inference_seconds(plan, settings)  # warm-up: allocator, kernels, page cache
        print(f"{'round':>5} {'inference img/s':>16} {'audit img/s':>12} {'ratio':>6} {'files':>6}")
        ratios, report = [], []
        for round_ in range(args.repeats):
            order = ("inference", "audit") if round_ % 2 == 0 else ("audit", "inference")
            seconds, files = {}, 0
            for kind in order:
                if kind == "inference":
                    seconds[kind] = inference_seconds(plan, settings)
                else:
                    seconds[kind], finish_s, result = audit_seconds(plan, settings)
                    report.append(finish_s)
                    files = result.files
            rates = {k: args.num / v for k, v in seconds.items()}
            ratios.append(rates["audit"] / rates["inference"])
            print(
                f"{round_:>5} {rates['inference']:>16.1f} {rates['audit']:>12.1f} "
                f"{ratios[-1]:>6.2f} {files:>6}"
            )
        if plan.device.type == "cpu":
            paired = [paired_seconds(plan, settings) for _ in range(max(1, args.repeats // 2))]
            inference, audit = (sum(p[i] for p in paired) for i in (0, 1))
            batches = len(paired) * -(-args.num // args.batch_size)
            print(
                f"paired, batch by batch ({batches} batches, loading excluded): inference "
                f"{1e3 * inference / batches:.1f} ms, audit {1e3 * audit / batches:.1f} ms per "
                f"batch, ratio {inference / audit:.2f}"
            )
        print(
            f"median ratio audit / inference: {statistics.median(ratios):.2f} (goal >= 0.9; "
            f"rounds {min(ratios):.2f}-{max(ratios):.2f}); "
            f"once per run: checkpoint loading {plan.load_seconds:.2f} s, metrics.csv + "
            f"summary.json + report.html {statistics.median(report):.2f} s"
        )


if __name__ == "__main__":
    main()
