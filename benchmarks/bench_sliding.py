"""Time and peak memory of sliding-window CAMs against sliding-window inference alone.

A 3-D U-Net (``--width``, K = ``--classes``, one input channel, random weights) on one volume of
side ``--size``, windows of ``--roi`` with ``--overlap`` (Gaussian blending), CAMs of all classes
at the last decoder layer (``d4.conv.conv.5``, Grad-CAM, softmax-mean target). Every measurement
runs in its own subprocess (each imports torch, the package and MONAI first), so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, everything the process held: torch, the model,
the volume, the outputs) is its own:

- ``swi``: MONAI's ``sliding_window_inference`` under ``torch.no_grad`` (the logits alone; a
  plain loop over the same windows when MONAI is not installed);
- ``patch``: ``sliding_window_cams(..., weights="patch")`` (each window's CAMs, blended);
- ``whole``: ``sliding_window_cams(..., weights="whole")`` (the stitched score's Grad-CAM: a
  logits pass, then a maps pass);
- ``engine``: ``CAMEngine`` on the whole volume at once, for comparison. Its peak is first
  estimated from a run at half the side (peak above the baseline × 8); above
  ``--memory-fraction`` of the machine's RAM it is not run, and a run is killed when its RSS
  passes that fraction (polled every 0.1 s), so it cannot take the machine down.

Each child first runs one window through the model (oneDNN's set-up), then the measured call
once (``--repeats`` for the median). Printed: seconds, peak RSS, ratios to ``swi`` and the goals
(``patch`` ≤ 1.5× ``swi``'s time and ≤ 2× its peak RSS), with the machine and its load.

Usage::

    python benchmarks/bench_sliding.py --size 256 --roi 96 --overlap 0.5 --width 16
    python benchmarks/bench_sliding.py --size 64 --roi 32 --width 8   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

MODES = ("swi", "patch", "whole", "engine")
LAYER = "d4.conv.conv.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="side of the cubic volume")
    parser.add_argument("--roi", type=int, default=96, help="side of the cubic window")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=16, help="U-Net base width")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--memory-fraction", type=float, default=0.7)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- Child: one measurement ------------------------------------------------------------------


def rss_mb() -> float:
    """This process's peak RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch

    from segcam_lightning.cam import CAMEngine
    from segcam_lightning.cam.sliding import sliding_window_cams
    from segcam_lightning.models import UNet

    torch.set_num_threads(args.threads)
    # Every child imports MONAI (when installed) before its baseline, so each process holds
    # the same libraries and the import is part of no measurement.
    with contextlib.suppress(ImportError):
        import monai.inferers  # noqa: F401
    torch.manual_seed(0)
    net = UNet(args.classes, base_width=args.width, in_channels=1, dims=3).eval()
    x = torch.rand(1, 1, args.size, args.size, args.size)
    roi = (args.roi,) * 3
    with torch.no_grad():
        net(torch.rand(1, 1, *roi))  # oneDNN's set-up, the same in every child
    engine = CAMEngine(net, [LAYER])
    window = {"overlap": args.overlap, "mode": "gaussian", "sw_batch_size": args.sw_batch_size}

    def run() -> object:
        if args.child == "swi":
            return sliding_inference(net, x, roi, args)
        if args.child == "engine":
            return engine(x)
        return sliding_window_cams(engine, x, roi, weights=args.child, **window)

    base = rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        del out
    result = {"seconds": statistics.median(times), "peak_mb": rss_mb(), "base_mb": base}
    print(json.dumps(result), flush=True)


def sliding_inference(net, x, roi, args):
    import torch

    try:
        from monai.inferers import sliding_window_inference
    except ImportError:  # the same windows and blending, without the CAMs
        from segcam_lightning.cam.sliding import _Blend, _plan

        window = (roi, (args.overlap,) * 3, (0.125,) * 3)
        plan = _plan(x, window, "gaussian", args.sw_batch_size)
        blend = None
        with torch.no_grad():
            for windows in plan.batches():
                logits = net(plan.take(plan.x, windows))
                blend = blend or _Blend(plan, logits.shape[1], logits.dtype)
                blend.add(logits, windows)
        return blend.result()  # type: ignore[union-attr]
    with torch.no_grad():
        return sliding_window_inference(
            x, roi, args.sw_batch_size, net, overlap=args.overlap, mode="gaussian"
        )


# --- Parent: the children, the guard, the table ----------------------------------------------


def mem_total_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def vm_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(args: argparse.Namespace, mode: str, size: int, limit_mb: float) -> dict:
    """One measurement in a subprocess; killed when its RSS passes ``limit_mb``."""
    argv = [sys.executable, __file__, "--child", mode, "--size", str(size), "--roi", str(args.roi)]
    argv += ["--overlap", str(args.overlap), "--width", str(args.width)]
    argv += ["--classes", str(args.classes), "--sw-batch-size", str(args.sw_batch_size)]
    argv += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    seen = 0.0
    while proc.poll() is None:
        seen = max(seen, vm_rss_mb(proc.pid))
        if seen > limit_mb:
            proc.kill()
            proc.wait()
            return {"failed": f"killed at {seen:.0f} MB RSS (limit {limit_mb:.0f} MB)"}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        return {"failed": last}
    return json.loads(out.strip().splitlines()[-1])


def measure_engine(args: argparse.Namespace, limit_mb: float) -> dict:
    """The whole-volume engine, after an estimate of its peak from half the side."""
    half = args.size // 2
    if half >= 32 and half % 16 == 0:
        small = run_child(args, "engine", half, limit_mb)
        if "failed" not in small:
            scale = (args.size / half) ** 3
            estimate = small["base_mb"] + (small["peak_mb"] - small["base_mb"]) * scale
            if estimate > limit_mb:
                return {"failed": f"not run: estimated peak {estimate:.0f} MB > {limit_mb:.0f} MB"}
            result = run_child(args, "engine", args.size, limit_mb)
            result["estimate_mb"] = estimate
            return result
    return run_child(args, "engine", args.size, limit_mb)


def describe_machine() -> str:
    import torch

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, "
        f"{os.cpu_count()} cores, {mem_total_mb() / 1024:.1f} GiB RAM, torch {torch.__version__}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    limit_mb = args.memory_fraction * mem_total_mb()
    print(f"start: {describe_machine()}")
    print(
        f"3-D U-Net width {args.width}, K = {args.classes}, volume {args.size}³, roi {args.roi}³, "
        f"overlap {args.overlap}, gaussian, sw_batch_size {args.sw_batch_size}, "
        f"{args.threads} torch thread(s), layer {LAYER}, Grad-CAM, softmax_mean"
    )
    results = {}
    for mode in args.modes:
        results[mode] = (
            measure_engine(args, limit_mb)
            if mode == "engine"
            else run_child(args, mode, args.size, limit_mb)
        )
        print(f"  {mode}: {results[mode]}", flush=True)
    print(f"end: {describe_machine()}")
    report(results)


def report(results: dict) -> None:
    base = results.get("swi", {})
    print(f"{'mode':8} {'seconds':>9} {'peak MB':>9} {'x swi time':>11} {'x swi peak':>11}")
    for mode, r in results.items():
        if "failed" in r:
            print(f"{mode:8} {r['failed']}")
            continue
        t = r["seconds"] / base["seconds"] if "seconds" in base else float("nan")
        m = r["peak_mb"] / base["peak_mb"] if "peak_mb" in base else float("nan")
        print(f"{mode:8} {r['seconds']:9.1f} {r['peak_mb']:9.0f} {t:11.2f} {m:11.2f}")
    patch = results.get("patch", {})
    if "seconds" in patch and "seconds" in base:
        t, m = patch["seconds"] / base["seconds"], patch["peak_mb"] / base["peak_mb"]
        print(f"goal patch time <= 1.5x swi: {t:.2f} {'PASS' if t <= 1.5 else 'FAIL'}")
        print(f"goal patch peak <= 2x swi:   {m:.2f} {'PASS' if m <= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
