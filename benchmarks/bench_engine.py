"""Time the CAM engine against one forward pass, the blog post's loop and a K-pass baseline.

For each U-Net width and layer set (e1, e4, b, d4 and all four together), with B images of
size² and K classes, everything is measured in one run (median of ``--repeats``) and printed as
ratios to one plain forward pass (eval mode, ``torch.no_grad``):

- ``engine``: ``CAMEngine(model, layers)(x)`` (Grad-CAM, softmax-mean target,
  ``grad_mode="auto"``: the ``retain_graph`` loop on the CPU, and at ``d4``, behind the 1×1
  head, the head path without per-class passes), and ``batched``: the same with
  ``grad_mode="batched"`` (one ``is_grads_batched=True`` call for all K classes);
- ``floor``: one forward without graph plus K ``autograd.grad`` calls w.r.t. the activations,
  timed alone (the graph built from the earliest layer on, no CAM maths): the floor of any
  engine that takes one backward pass per class. With the softmax-mean target the engine takes
  K - 1 (the classes' gradients sum to zero, see ``CAMEngine``), so it can go below it;
- ``kpass``: pytorch-grad-cam's scheme, per class: forward with graph, ``zero_grad``, full
  ``backward`` of the batch-summed target (parameter gradients included), CAM maths on CPU;
- ``blog``: the blog post's loop, per image and class: forward, ``zero_grad``, ``backward``, CAM
  (all layers of a set hooked in the same pass, which is kinder to the blog's loop than it was);
- ``pgc``: pytorch-grad-cam itself, when importable (skipped otherwise);
- on CUDA, the peak memory the engine and the K-pass baseline allocate beyond the model.

Goals checked at the end (K=3): at ``d4`` engine ≤ 1.2× forward and ≥ 8× faster than kpass;
at every layer ≥ 2.5× faster than kpass; all four layers ≤ 1.2× the earliest layer alone.

``--scaling`` prints how the cost grows instead: for every K in ``--scaling-classes`` and input
size in ``--scaling-sizes`` (U-Net width ``--widths[0]``, B = ``--batch``), then for a 3-D U-Net
on one-channel volumes of side ``--scaling-volumes`` (K = 3), the engine at ``d4`` (``auto``,
i.e. the head path, ``loop`` and ``batched``) and ``e4`` (``loop`` and ``batched``) and the
K-pass baseline at ``d4``, as ratios to one forward; on CUDA
with the peak memory each allocates beyond one forward. Goals: K = 19 at ``d4`` ≤ 1.5× one
forward and ≥ 10× faster than the K-pass baseline; 3-D at ``d4`` ≤ 1.3× one forward.

Usage::

    python benchmarks/bench_engine.py --device cpu --widths 32 64 --batch 8 --size 256
    python benchmarks/bench_engine.py --scaling --widths 32 --batch 4
    python benchmarks/bench_engine.py --quick   # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from segcam_lightning.cam import CAMEngine, find_layer
from segcam_lightning.models import UNet

LAYER_SETS: dict[str, list[str]] = {
    "e1": ["e1.conv.conv.5"],
    "e4": ["e4.conv.conv.5"],
    "b": ["b.conv.5"],
    "d4": ["d4.conv.conv.5"],
    "all4": ["e1.conv.conv.5", "e4.conv.conv.5", "b.conv.5", "d4.conv.conv.5"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True
) -> float:
    if warmup:
        fn()  # warm-up (allocator, kernels, oneDNN primitives)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


@contextmanager
def capture(modules: list[nn.Module]):
    """pytorch-grad-cam's ActivationsAndGradients: forward hooks + tensor hooks for grads."""
    acts: list[torch.Tensor] = []
    grads: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            acts.append(out.detach())
            out.register_hook(lambda g: grads.__setitem__(index, g.detach()))

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield acts, grads
    finally:
        for h in handles:
            h.remove()


def cam_on_cpu(
    acts: list[torch.Tensor], grads: dict[int, torch.Tensor], size: tuple[int, ...]
) -> list:
    """pytorch-grad-cam's maths: numpy on CPU, per-image min-max with +1e-7, resize (2-D or 3-D)."""
    out = []
    for i, a in enumerate(acts):
        a_np, g_np = a.cpu().float().numpy(), grads[i].cpu().float().numpy()
        spatial = tuple(range(2, a_np.ndim))
        w = g_np.mean(axis=spatial)
        cam = (w.reshape(*w.shape, *(1,) * len(spatial)) * a_np).sum(axis=1)
        cam = cam.clip(min=0)
        per_image = tuple(range(1, cam.ndim))
        cam = cam - cam.min(axis=per_image, keepdims=True)
        cam = cam / (1e-7 + cam.max(axis=per_image, keepdims=True))
        # pytorch-grad-cam resizes with cv2; torch's interpolation on the CPU stands in here.
        mode = "bilinear" if len(size) == 2 else "trilinear"
        out.append(F.interpolate(torch.from_numpy(cam)[:, None], size, mode=mode))
    return out


def kpass_baseline(model: nn.Module, x: torch.Tensor, modules: list[nn.Module], k: int) -> None:
    for c in range(k):
        with capture(modules) as (acts, grads):
            model.zero_grad()
            out = model(x)
            loss = out.softmax(dim=1)[:, c].flatten(1).mean(dim=1).sum()
            loss.backward()
        cam_on_cpu(acts, grads, tuple(x.shape[2:]))


def blog_loop(model: nn.Module, x: torch.Tensor, modules: list[nn.Module], k: int) -> None:
    for b in range(x.shape[0]):
        for c in range(k):
            with capture(modules) as (acts, grads):
                model.zero_grad()
                out = model(x[b : b + 1])
                F.softmax(out, dim=1)[0, c].mean().backward()
            for i, a in enumerate(acts):
                w = grads[i].mean(dim=(2, 3), keepdim=True)
                cam = F.relu((w * a).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
                (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)


def floor_fn(model: nn.Module, x: torch.Tensor, modules: list[nn.Module], k: int):
    """Returns a callable timing only the K activation-gradient passes, and the forward."""
    state: dict[str, object] = {}

    def prepare() -> None:
        acts: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:
                torch.set_grad_enabled(True)
                out = out.detach().requires_grad_(True)
            acts.append(out)
            return out

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            for h in handles:
                h.remove()
        with torch.enable_grad():
            scores = logits.softmax(dim=1).mean(dim=(2, 3)).sum(dim=0).unbind()
        state.update(acts=acts, scores=scores)

    def backward_only() -> None:
        for c in range(k):
            torch.autograd.grad(state["scores"][c], state["acts"], retain_graph=c < k - 1)

    return prepare, backward_only


def pytorch_grad_cam_fn(model: nn.Module, x: torch.Tensor, modules: list[nn.Module], k: int):
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
    except ImportError:
        return None

    class Target:
        def __init__(self, c: int) -> None:
            self.c = c

        def __call__(self, out: torch.Tensor) -> torch.Tensor:
            return out.softmax(dim=0)[self.c].mean()

    def run() -> None:
        with PGCGradCAM(model=model, target_layers=modules) as cam:
            for c in range(k):
                cam(input_tensor=x, targets=[Target(c)] * x.shape[0])

    return run


def bench_width(args: argparse.Namespace, width: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = UNet(num_classes=args.classes, base_width=width).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    k = args.classes

    def forward() -> None:
        with torch.no_grad():
            model(x)

    mem_fwd = peak_extra_mb(forward, device)
    rows = []
    for set_name in args.sets:
        layers = LAYER_SETS[set_name]
        # Re-measured for every row, so a change in machine load between rows cannot skew the
        # ratios of one row against another.
        t_fwd = median_time(forward, args.repeats, device)
        modules = [find_layer(model, name) for name in layers]

        def kpass(modules: list[nn.Module] = modules) -> None:
            kpass_baseline(model, x, modules, k)

        def blog(modules: list[nn.Module] = modules) -> None:
            blog_loop(model, x, modules, k)

        engines = {
            mode: CAMEngine(model, layers, "gradcam", grad_mode=mode)
            for mode in ("auto", "batched")
        }
        row: dict[str, object] = {"width": width, "layers": set_name}
        for mode, engine in engines.items():
            row[mode] = median_time(lambda e=engine: e(x), args.repeats, device) / t_fwd
        prepare, backward_only = floor_fn(model, x, modules, k)
        t_bwd = []
        for _ in range(args.repeats):
            prepare()
            sync(device)
            start = time.perf_counter()
            backward_only()
            sync(device)
            t_bwd.append(time.perf_counter() - start)
        row["floor"] = 1.0 + statistics.median(t_bwd) / t_fwd
        # With one repeat the slow baselines skip their warm-up (the engine's calls before them
        # have warmed up the same kernels): the wide model stays benchmarkable on a laptop CPU.
        warm = args.repeats > 1
        row["kpass"] = median_time(kpass, args.repeats, device, warm) / t_fwd
        row["blog"] = (
            median_time(blog, args.blog_repeats, device, warm) / t_fwd
            if not args.skip_blog
            else float("nan")
        )
        pgc = pytorch_grad_cam_fn(model, x, modules, k)
        row["pgc"] = float("nan")
        if pgc is not None:
            row["pgc"] = median_time(pgc, args.repeats, device, warm) / t_fwd
        mem_engine = peak_extra_mb(lambda e=engines["auto"]: e(x), device)
        mem_kpass = peak_extra_mb(kpass, device)
        row["mem"] = (mem_fwd, mem_engine, mem_kpass)
        model.zero_grad(set_to_none=True)
        rows.append(row)
        print(f"  measured width {width} {set_name}: forward {t_fwd * 1e3:.0f} ms", flush=True)
    return rows


def paired_all4_over_e1(args: argparse.Namespace, width: int, device: torch.device) -> float:
    """All four layers over e1 alone, the two engines timed alternately (median of each).

    Interleaving keeps a change in machine load from landing on one side only: this ratio is
    close to 1 and a few percent of drift between two table rows would decide the goal.
    """
    torch.manual_seed(0)
    model = UNet(num_classes=args.classes, base_width=width).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    engines = {name: CAMEngine(model, LAYER_SETS[name]) for name in ("e1", "all4")}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(x)  # warm-up
    for _ in range(max(args.repeats, 3)):
        for name, engine in engines.items():
            sync(device)
            start = time.perf_counter()
            engine(x)
            sync(device)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["all4"]) / statistics.median(times["e1"])
    print(f"  width {width}: all four / e1 alone, interleaved: {ratio:.2f}", flush=True)
    return ratio


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"512x1024"`` → ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N or HxW, e.g. 512x1024, got {text!r}"
        ) from None
    return height, width


def bench_scaling(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Engine and K-pass cost over one forward as the class count and the input grow, then a
    3-D U-Net on one-channel volumes."""
    cases = [(size, k) for size in args.scaling_sizes for k in args.scaling_classes]
    cases += [((side,) * 3, 3) for side in args.scaling_volumes]
    rows = []
    for size, k in cases:
        rows.append(scaling_row(args, device, size, k))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def scaling_row(
    args: argparse.Namespace, device: torch.device, size: tuple[int, ...], k: int
) -> dict[str, object]:
    """One row of the scaling table: a U-Net of ``len(size)`` spatial dims and K classes."""
    torch.manual_seed(0)
    dims, channels = len(size), (3 if len(size) == 2 else 1)
    model = UNet(k, base_width=args.widths[0], in_channels=channels, dims=dims).to(device).eval()
    x = torch.rand(args.batch, channels, *size, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def kpass() -> None:
        kpass_baseline(model, x, [find_layer(model, "d4.conv.conv.5")], k)

    mem_fwd = peak_extra_mb(forward, device)
    t_fwd = median_time(forward, args.repeats, device)
    row: dict[str, object] = {"size": size, "k": k, "forward_s": t_fwd}
    modes = ("loop",) if args.no_batched else ("loop", "batched")
    for name, layer in (("d4", "d4.conv.conv.5"), ("e4", "e4.conv.conv.5")):
        row[f"{name}_batched"] = float("nan")
        # At d4 "auto" takes the head path (no per-class pass, see CAMEngine); at e4 it is the
        # loop on the CPU, so only d4 measures it apart.
        for mode in ("auto", *modes) if name == "d4" else modes:
            engine = CAMEngine(model, [layer], "gradcam", grad_mode=mode)
            row[f"{name}_{mode}"] = median_time(lambda e=engine: e(x), args.repeats, device) / t_fwd
    # The baseline costs K forward + backward passes: one timed run after the engine's warm-up
    # is enough where it takes minutes.
    kpass_repeats = args.repeats if k * math.prod(size) <= 8 * 256 * 256 else 1
    row["kpass"] = median_time(kpass, kpass_repeats, device, warmup=kpass_repeats > 1) / t_fwd
    if device.type == "cuda":
        engine = CAMEngine(model, ["d4.conv.conv.5"], "gradcam")
        row["mem"] = (
            mem_fwd,
            peak_extra_mb(lambda: engine(x), device),
            peak_extra_mb(kpass, device),
        )
    model.zero_grad(set_to_none=True)
    print(f"  measured {_size(size)} K={k}: forward {t_fwd * 1e3:.0f} ms", flush=True)
    return row


def scaling_line(r: dict) -> str:
    cells = [
        f"{_size(r['size']):>9} {r['k']:>3} {r['forward_s'] * 1e3:8.0f} |",
        f"{r['d4_auto']:5.2f}",
        f"{r['d4_loop']:7.2f}",
        fmt(r["d4_batched"], 6),
        f"{r['e4_loop']:5.2f}",
        fmt(r["e4_batched"], 6),
        f"{r['kpass']:6.2f} |",
        f"{r['kpass'] / r['d4_auto']:7.1f}",
    ]
    return " ".join(cells)


SCALING_HEAD = "    input   K   fwd ms |    d4 d4 loop d4 bat    e4 e4 bat  kpass | x kpass"
TABLE_HEAD = "width layers | engine batched  floor  kpass    blog    pgc | x kpass  x blog"


def print_scaling(rows: list[dict], device: torch.device) -> None:
    print_rows(SCALING_HEAD, rows, scaling_line, ("d4", "kpass"), device)
    print("(engine and kpass times are ratios to one no-grad forward of the same batch;")
    print(" 'd4' = the default grad_mode='auto', which takes the head path there; 'loop' = one")
    print(" backward pass per class; 'bat' = grad_mode='batched'; 'x kpass' = speed-up of 'd4')")
    most = max(r["k"] for r in rows)
    for r in rows:
        if len(r["size"]) == 2 and r["k"] == most:
            ok = r["d4_auto"] <= 1.5 and r["kpass"] / r["d4_auto"] >= 10
            print(
                f"  {'PASS' if ok else 'FAIL'}  K={r['k']} {_size(r['size'])}: d4 "
                f"{r['d4_auto']:.2f}x forward <= 1.5 and {r['kpass'] / r['d4_auto']:.1f}x faster "
                "than kpass >= 10"
            )
        elif len(r["size"]) == 3:
            ok = r["d4_auto"] <= 1.3
            print(
                f"  {'PASS' if ok else 'FAIL'}  3-D K={r['k']} {_size(r['size'])}: d4 "
                f"{r['d4_auto']:.2f}x forward <= 1.3"
            )


def _size(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def fmt(value: float, width: int) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:{width}.2f}"  # NaN: not measured


def print_rows(
    head: str,
    rows: list[dict],
    line: Callable[[dict], str],
    memory: tuple[str, str],
    device: torch.device,
) -> None:
    """A table: ``head``, a rule, ``line(row)`` per row; on CUDA the peak memory columns
    (one forward, then ``memory``'s two, from each row's ``"mem"``)."""
    if device.type == "cuda":
        head += f" | {'MiB fwd':>8} {memory[0]:>8} {memory[1]:>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        text = line(r)
        if device.type == "cuda":
            fwd, eng, kp = r["mem"]
            text += f" | {fwd:8.1f} {eng:8.1f} {kp:8.1f}"
        print(text)


def table_line(r: dict) -> str:
    return (
        f"{r['width']:>5} {r['layers']:>6} | {r['auto']:6.2f} "
        f"{r['batched']:7.2f} {r['floor']:6.2f} {r['kpass']:6.2f} {fmt(r['blog'], 7)} "
        f"{fmt(r['pgc'], 6)} | {r['kpass'] / r['auto']:7.2f} {fmt(r['blog'] / r['auto'], 7)}"
    )


def print_table(rows: list[dict], device: torch.device) -> None:
    print_rows(TABLE_HEAD, rows, table_line, ("engine", "kpass"), device)
    print("(times are ratios to one no-grad forward; 'x kpass'/'x blog' are speed-ups)")
    if all(r["pgc"] != r["pgc"] for r in rows):
        print("(pytorch-grad-cam is not installed: its column is skipped)")


def check_goals(rows: list[dict], paired: dict[int, float]) -> None:
    print("\nGoals (K=3):")
    for width in sorted({r["width"] for r in rows}):
        by = {r["layers"]: r for r in rows if r["width"] == width}
        if set(by) != set(LAYER_SETS):
            print(f"  width {width:>3}: goals need every layer set (--sets)")
            continue
        d4 = by["d4"]
        checks = [
            (f"d4 engine {d4['auto']:.2f}x forward <= 1.2", d4["auto"] <= 1.2),
            (
                f"d4 {d4['kpass'] / d4['auto']:.1f}x faster than kpass >= 8",
                d4["kpass"] / d4["auto"] >= 8,
            ),
        ]
        for name in ("e1", "e4", "b", "d4", "all4"):
            speed = by[name]["kpass"] / by[name]["auto"]
            gap = by[name]["auto"] / by[name]["floor"]
            checks.append(
                (f"{name} {speed:.2f}x faster than kpass >= 2.5 ({gap:.2f}x floor)", speed >= 2.5)
            )
        ratio = paired[width]
        checks.append(
            (f"all four {ratio:.2f}x the earliest layer alone <= 1.2 (interleaved)", ratio <= 1.2)
        )
        for text, ok in checks:
            print(f"  width {width:>3}: {'PASS' if ok else 'FAIL'}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument(
        "--sets", nargs="+", choices=list(LAYER_SETS), default=list(LAYER_SETS), help="layer sets"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blog-repeats", type=int, default=1, help="the blog post's loop is slow")
    parser.add_argument("--skip-blog", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument(
        "--paired-only", action="store_true", help="only the interleaved all-four / e1 ratio"
    )
    parser.add_argument(
        "--scaling", action="store_true", help="cost as K and the input grow (see the docstring)"
    )
    parser.add_argument("--scaling-classes", type=int, nargs="+", default=[3, 8, 19])
    parser.add_argument(
        "--no-batched",
        action="store_true",
        help="--scaling without grad_mode='batched' (K gradients at once: too much memory at "
        "512x1024 on a CPU machine, where 'auto' never batches)",
    )
    parser.add_argument(
        "--scaling-volumes",
        type=int,
        nargs="*",
        default=[64],
        metavar="SIDE",
        help="cube sides of the 3-D rows (one-channel volumes, K=3); none to skip",
    )
    parser.add_argument(
        "--scaling-sizes",
        type=parse_size,
        nargs="+",
        default=[(256, 256), (512, 512), (512, 1024)],
        metavar="HxW",
    )
    args = parser.parse_args()
    if args.quick:
        args.widths, args.batch, args.size, args.repeats = [4], 2, 64, 2
        args.scaling_sizes, args.scaling_classes = [(64, 64), (64, 128)], [3, 8]
        args.scaling_volumes = [16]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"B={args.batch} size={args.size} K={args.classes} repeats={args.repeats}\n"
    )
    if args.scaling:
        rows = bench_scaling(args, device)
        print()
        print_scaling(rows, device)
        return
    if args.paired_only:
        for width in args.widths:
            paired_all4_over_e1(args, width, device)
        return
    rows = [row for width in args.widths for row in bench_width(args, width, device)]
    paired = {width: paired_all4_over_e1(args, width, device) for width in args.widths}
    print()
    print_table(rows, device)
    check_goals(rows, paired)


if __name__ == "__main__":
    main()
