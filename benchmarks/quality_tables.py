"""Measure the tables of benchmarks/quality/RESULTS.md: which CAM to believe on the default run.

Sub-commands (each prints Markdown tables and writes ``<out>/<name>.json``):

- ``train``: trains ``configs/shortcut.yaml`` twice in parallel (one thread each), on the clean
  data (``--data.shortcut=null``: the default run, configs/synthetic.yaml's training with more
  callbacks) and on the planted shortcut, same seed and epochs; collects the callbacks'
  shortcut warnings. Then runs ``shortcut`` on the two last checkpoints.
- ``localisation``: energy inside GT and pointing game per class for every method × target ×
  layer, test IoU, chance (the class's area).
- ``sanity``: the randomisation test (cascade to each layer and full, variance-preserving,
  several seeds) for every method × target; ``--init`` compares re-initialisations for
  Grad-CAM at d4 (signal scale per block, ρ, all-zero maps).
- ``faithfulness``: deletion / insertion AUC over random order per class for every method ×
  target × layer (``--fill mean|blur``).
- ``shortcut``: clean vs shortcut checkpoints, energy inside per layer and method.
- ``report``: the compact tables of benchmarks/quality/RESULTS.md from the JSON files above.

Usage::

    python benchmarks/quality_tables.py train --out runs/quality          # ~40 min on 2 cores
    CKPT=runs/quality/clean/lightning_logs/version_0/checkpoints/last.ckpt
    python benchmarks/quality_tables.py localisation --checkpoint $CKPT --out runs/quality
    python benchmarks/quality_tables.py sanity --checkpoint $CKPT --out runs/quality
    python benchmarks/quality_tables.py sanity --checkpoint $CKPT --init --out runs/quality
    python benchmarks/quality_tables.py faithfulness --checkpoint $CKPT --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from segcam_lightning.cam.functional import predicted_classes
from segcam_lightning.cam.methods import METHOD_NAMES, ScoreCAM
from segcam_lightning.data.synthetic import (
    SPLIT_OFFSETS,
    SYNTHETIC_CLASS_NAMES,
    SyntheticSegmentation,
)
from segcam_lightning.metrics import cam_energy_inside, pointing_game_hits
from segcam_lightning.models import UNet
from segcam_lightning.quality import (
    cascade_stages,
    deletion_insertion,
    method_maps,
    randomized_copy,
    sanity_check,
)

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("e1.conv.conv.5", "e4.conv.conv.5", "b.conv.5", "d4.conv.conv.5")
SHORTCUT_LAYERS = ("e1.conv.conv.5", "e2.conv.conv.5", "e3.conv.conv.5", "e4.conv.conv.5")
SHORTCUT_LAYERS += ("b.conv.5",)
SHORTCUT_LAYERS += ("d2.conv.conv.5", "d3.conv.conv.5", "d4.conv.conv.5")
TARGETS = ("softmax_mean", "logit_region", "gt_region")
PLANTS = (1, 2)
SHORT = {f"e{i}.conv.conv.5": f"e{i}" for i in range(1, 5)} | {"b.conv.5": "b"}
SHORT |= {f"d{i}.conv.conv.5": f"d{i}" for i in range(1, 5)}


def method_list(names: Sequence[str] | None) -> list[str]:
    """The methods asked for, or every method once (``gradcampp`` is an alias)."""
    return list(names) if names else list(METHOD_NAMES)


def engine_method(name: str, scorecam_channels: int) -> object:
    """Score-CAM with a channel cap (its cost is one forward per channel); others by name."""
    return ScoreCAM(max_channels=scorecam_channels) if name == "scorecam" else name


def maps_of(net, layers, method, target, images, masks, args) -> dict:
    """Every class's maps of one method and target, keyed ``(method label, layer)``."""
    options = (engine_method(method, args.scorecam_channels), target, images, masks)
    maps, *_ = method_maps(net, layers, *options, None, args.batch_size, {})
    return maps


def targets_for(method: str) -> tuple[str, ...]:
    # Eigen-CAM ignores the target (one map for every class): one target is enough.
    return ("softmax_mean",) if method == "eigencam" else TARGETS


def load_net(checkpoint: str | Path) -> UNet:
    """The U-Net of a train.py checkpoint (weights only)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = state.get("hyper_parameters", {})
    net = UNet(hparams.get("num_classes", 3), hparams.get("base_width", 16))
    weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    net.load_state_dict({k: v for k, v in weights.items() if k in net.state_dict()})
    return net.eval()


def test_images(num: int, size: int, shortcut: str | None = None) -> tuple[torch.Tensor, ...]:
    """The held-out synthetic test images (SegmentationDataModule's test split, data seed 0)."""
    data = SyntheticSegmentation(num, size, SPLIT_OFFSETS["test"], shortcut=shortcut)
    samples = [data[i] for i in range(num)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


def class_iou(net: UNet, images: torch.Tensor, masks: torch.Tensor) -> list[float]:
    with torch.no_grad():
        preds = torch.cat(
            [predicted_classes(net(images[i : i + 16])) for i in range(0, len(images), 16)]
        )
    out = []
    for k in range(len(SYNTHETIC_CLASS_NAMES)):
        inter = ((preds == k) & (masks == k)).sum().item()
        union = ((preds == k) | (masks == k)).sum().item()
        out.append(inter / union if union else float("nan"))
    return out


def chance(masks: torch.Tensor) -> list[float]:
    """Each class's mean area share over the images that hold it."""
    out = []
    for k in range(len(SYNTHETIC_CLASS_NAMES)):
        share = (masks == k).flatten(1).float().mean(1)
        out.append(float(share[share > 0].mean()))
    return out


def header(*columns: str) -> None:
    """A Markdown table's header and rule."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def fmt(value: float, digits: int = 2) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def save(out: Path, name: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"\nwrote {path}")


# ---------------------------------------------------------------------- localisation


def localisation(args: argparse.Namespace) -> None:
    net = load_net(args.checkpoint)
    images, masks = test_images(args.images, args.size)
    iou, area = class_iou(net, images, masks), chance(masks)
    print(f"test IoU {[round(v, 3) for v in iou]}, chance (area) {[round(v, 3) for v in area]}")
    rows = []
    for method in method_list(args.methods):
        for target in targets_for(method):
            started = time.perf_counter()
            maps = maps_of(net, LAYERS, method, target, images, masks, args)
            for (label, layer), cams in maps.items():
                energy, present = cam_energy_inside(cams, masks, [0, 1, 2])
                hits, _ = pointing_game_hits(cams, masks, [0, 1, 2])
                count = present.sum(0).clamp_min(1)
                rows.append(
                    {
                        "method": label,
                        "target": target,
                        "layer": layer,
                        "energy": ((energy * present).sum(0) / count).tolist(),
                        "pointing": ((hits & present).sum(0) / count).tolist(),
                    }
                )
            print(f"  {method}/{target}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| method | target | layer | energy soil / narrow / round | pointing narrow / round |")
    print("|---|---|---|---|---|")
    for r in rows:
        energy = " / ".join(
            fmt(e) + ("*" if e < area[k] else "") for k, e in enumerate(r["energy"])
        )
        pointing = " / ".join(fmt(r["pointing"][k]) for k in PLANTS)
        layer = SHORT.get(r["layer"], r["layer"])
        print(f"| {r['method']} | {r['target']} | {layer} | {energy} | {pointing} |")
    save(
        Path(args.out),
        "localisation",
        {
            "checkpoint": str(args.checkpoint),
            "images": args.images,
            "iou": iou,
            "chance": area,
            "rows": rows,
        },
    )


# ---------------------------------------------------------------------- sanity


def sanity(args: argparse.Namespace) -> None:
    net = load_net(args.checkpoint)
    images, masks = test_images(args.images, args.size)
    if args.init:
        return compare_inits(args, net, images, masks)
    reports = []
    for method in method_list(args.methods):
        seeds = args.seeds if method != "scorecam" else args.seeds[:1]
        started = time.perf_counter()
        report = sanity_check(
            net,
            images,
            masks,
            LAYERS,
            [engine_method(method, args.scorecam_channels)],
            targets_for(method),
            seeds,
            class_names=SYNTHETIC_CLASS_NAMES,
            batch_size=args.batch_size,
        )
        print(f"  {method}: {time.perf_counter() - started:.0f} s", flush=True)
        reports.append(report.to_dict())
        print_sanity(report.rows)
    save(Path(args.out), "sanity", {"checkpoint": str(args.checkpoint), "reports": reports})


def print_sanity(rows) -> None:
    header(
        "method",
        "target",
        "layer",
        "class",
        "randomised",
        "ρ̃ abs",
        "SSIM",
        "energy trained → random",
        "all-zero",
        "verdict",
    )
    for r in rows:
        if not r.verdict or r.class_index == 0:
            continue
        print(
            f"| {r.method} | {r.target} | {SHORT.get(r.layer, r.layer)} | {r.class_name} | "
            f"{r.randomized} | {fmt(r.rho_abs_median)} | {fmt(r.ssim_median)} | "
            f"{fmt(r.energy_trained)} → {fmt(r.energy_randomized)} | "
            f"{fmt(r.zero_randomized)} | {r.verdict} |"
        )


def block_scales(net: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """RMS of each block's output, relative to the input's (eval mode, no graph)."""
    scales: dict[str, float] = {}

    def record(name: str, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        scales.setdefault(name, float(tensor.square().mean().sqrt()))

    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name, module in net.named_children()
    ]
    try:
        with torch.no_grad():
            net.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    rms = float(images.square().mean().sqrt())
    return {k: v / rms for k, v in scales.items()}


def compare_inits(args, net, images, masks) -> None:
    """Grad-CAM at d4: variance-preserving vs PyTorch-default re-initialisation."""
    stages = cascade_stages(net, images)
    rows, scales = [], {"trained": block_scales(net, images[:8])}
    for init in ("variance_preserving", "pytorch_default"):
        for depth, label in ((1, "head"), (2, "head+d4"), (len(stages), "full")):
            clone = randomized_copy(net, stages[:depth], 0, init)
            scales[f"{init}/{label}"] = block_scales(clone, images[:8])
        report = sanity_check(
            net,
            images,
            masks,
            ["d4.conv.conv.5"],
            ["gradcam"],
            ["softmax_mean"],
            args.seeds,
            class_names=SYNTHETIC_CLASS_NAMES,
            cascade="all",
            initializer=init,
            batch_size=args.batch_size,
        )
        rows += [dict(r.to_dict(), initializer=init) for r in report.rows]
    header(
        "initializer",
        "randomised",
        "class",
        "ρ̃ abs (per seed)",
        "energy trained → random",
        "all-zero maps",
    )
    for r in rows:
        if r["class_index"] == 0 or r["depth"] not in (1, 2, 10):
            continue
        seeds = ", ".join(fmt(v) for v in r["per_seed_rho_abs_median"])
        print(
            f"| {r['initializer']} | {r['randomized']} | {r['class_name']} | "
            f"{fmt(r['rho_abs_median'])} ({seeds}) | {fmt(r['energy_trained'])} → "
            f"{fmt(r['energy_randomized'])} | {fmt(r['zero_randomized'])} |"
        )
    print("\nRMS of each block's output / input's:")
    blocks = list(scales["trained"])
    print("| model | " + " | ".join(blocks) + " |")
    print("|---|" + "---|" * len(blocks))
    for name, values in scales.items():
        print(
            f"| {name} | " + " | ".join(f"{values.get(b, float('nan')):.3g}" for b in blocks) + " |"
        )
    save(
        Path(args.out),
        "sanity_init",
        {"checkpoint": str(args.checkpoint), "rows": rows, "scales": scales},
    )


# ---------------------------------------------------------------------- faithfulness


def faithfulness(args: argparse.Namespace) -> None:
    net = load_net(args.checkpoint)
    images, masks = test_images(args.images, args.size)
    layers = args.layers or LAYERS
    rows = []
    for method in method_list(args.methods):
        for target in targets_for(method) if not args.targets else args.targets:
            started = time.perf_counter()
            maps = maps_of(net, layers, method, target, images, masks, args)
            for (label, layer), cams in maps.items():
                result = deletion_insertion(
                    net,
                    images,
                    cams[:, list(PLANTS)],
                    masks,
                    list(PLANTS),
                    class_names=SYNTHETIC_CLASS_NAMES,
                    steps=args.steps,
                    fill=args.fill,
                    batch_size=args.batch_size,
                    labels={"method": label, "target": target, "layer": layer},
                )
                rows += [r.to_dict() for r in result]
            print(f"  {method}/{target}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"\nfill {args.fill}, {args.steps} steps, {args.images} images")
    header(
        "method",
        "target",
        "layer",
        "deletion / random narrow, round",
        "GT first / random narrow, round",
        "insertion / random narrow, round",
    )
    keyed = {}
    for r in rows:
        keyed.setdefault((r["method"], r["target"], r["layer"]), {})[
            (r["curve"], r["class_index"])
        ] = r
    for (method, target, layer), cell in keyed.items():
        deletion = ", ".join(fmt(cell[("deletion", k)]["ratio"]) for k in PLANTS)
        gt = ", ".join(
            fmt(cell[("deletion", k)]["auc_gt_first"] / cell[("deletion", k)]["auc_random"])
            for k in PLANTS
        )
        insertion = ", ".join(fmt(cell[("insertion", k)]["ratio"]) for k in PLANTS)
        print(
            f"| {method} | {target} | {SHORT.get(layer, layer)} | {deletion} | {gt} | {insertion} |"
        )
    save(
        Path(args.out),
        f"faithfulness_{args.fill}",
        {
            "checkpoint": str(args.checkpoint),
            "images": args.images,
            "steps": args.steps,
            "fill": args.fill,
            "rows": rows,
        },
    )


# ---------------------------------------------------------------------- shortcut


def shortcut(args: argparse.Namespace) -> None:
    """Clean vs shortcut: IoU and energy inside per class, layer and method (counted images:
    the class in the ground truth and predicted, as the callback counts them)."""
    results = {}
    for name, checkpoint, planted in (
        ("clean", args.clean, None),
        ("shortcut", args.shortcut, "soil"),
    ):
        net = load_net(checkpoint)
        images, masks = test_images(args.images, args.size, planted)
        iou = class_iou(net, images, masks)
        rows = []
        for method, target in (
            ("gradcam", "softmax_mean"),
            ("gradcam", "logit_region"),
            ("gradcam", "logit_margin"),
            ("hirescam", "logit_region"),
            ("layercam", "logit_region"),
            ("gradcam++", "softmax_mean"),
        ):
            maps, *_ = method_maps(
                net, SHORTCUT_LAYERS, method, target, images, masks, None, args.batch_size, {}
            )
            with torch.no_grad():
                preds = torch.cat(
                    [predicted_classes(net(images[i : i + 16])) for i in range(0, len(images), 16)]
                )
            predicted = torch.stack([(preds == k).flatten(1).any(1) for k in range(3)], 1)
            for (label, layer), cams in maps.items():
                energy, in_gt = cam_energy_inside(cams, masks, [0, 1, 2])
                counted = in_gt & predicted
                mean = (energy * counted).sum(0) / counted.sum(0).clamp_min(1)
                rows.append(
                    {
                        "method": label,
                        "target": target,
                        "layer": layer,
                        "energy": mean.tolist(),
                        "counted": counted.sum(0).tolist(),
                    }
                )
        results[name] = {"checkpoint": str(checkpoint), "iou": iou, "rows": rows}
    print(
        f"\ntest IoU clean {[round(v, 3) for v in results['clean']['iou']]}, "
        f"shortcut {[round(v, 3) for v in results['shortcut']['iou']]}"
    )
    print("| method | target | layer | narrow clean → shortcut (change) | round clean → shortcut |")
    print("|---|---|---|---|---|")
    for a, b in zip(results["clean"]["rows"], results["shortcut"]["rows"], strict=True):
        n0, n1, r0, r1 = a["energy"][1], b["energy"][1], a["energy"][2], b["energy"][2]
        print(
            f"| {a['method']} | {a['target']} | {SHORT[a['layer']]} | {fmt(n0)} → {fmt(n1)} "
            f"({(n1 - n0) / max(n0, 1e-9):+.0%}) | {fmt(r0)} → {fmt(r1)} |"
        )
    save(Path(args.out), "shortcut", results)


# The maps' warning names a layer; the objects-alone test's names none.
WARNING = re.compile(r"class '(\w+)' (?:at layer '([\w.]+)' )?may be learned from a shortcut")


def train(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    runs = {"clean": ["--data.shortcut=null"], "shortcut": []}
    procs = {}
    for name, extra in runs.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(ROOT / "configs/shortcut.yaml"),
            f"--trainer.max_epochs={args.epochs}",
            f"--seed_everything={args.seed}",
            *extra,
        ]
        log = (folder / "train.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs[name] = (
            subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
        )
        print("started", " ".join(cmd), "in", folder, flush=True)
    warnings = {}
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} training failed: see {out / name / 'train.log'}")
        log.close()
        text = (out / name / "train.log").read_text(errors="replace")
        found = {(cls, layer or "objects alone") for cls, layer in WARNING.findall(text)}
        warnings[name] = sorted(found)
        print(f"{name}: shortcut warnings {warnings[name]}")
    save(out, "shortcut_warnings", warnings)
    args.clean = out / "clean/lightning_logs/version_0/checkpoints/last.ckpt"
    args.shortcut = out / "shortcut/lightning_logs/version_0/checkpoints/last.ckpt"
    shortcut(args)


def report(args: argparse.Namespace) -> None:
    """Compact Markdown tables (benchmarks/quality/RESULTS.md) from the JSON files the other
    commands wrote."""
    for path in args.files:
        payload = json.loads(Path(path).read_text())
        name = Path(path).stem
        print(f"\n<!-- {path} -->")
        if name == "localisation":
            report_localisation(payload)
        elif name == "sanity":
            report_sanity([row for r in payload["reports"] for row in r["rows"]])
        elif name.startswith("faithfulness"):
            report_faithfulness(payload)


def pair(values: Sequence[float | None], marks: Sequence[bool] = (False, False)) -> str:
    return " / ".join(
        ("–" if v is None else f"{v:.2f}") + ("*" if m else "")
        for v, m in zip(values, marks, strict=True)
    )


def report_localisation(payload: dict) -> None:
    area = payload["chance"]
    print(f"test IoU {pair(payload['iou'][1:])} (narrow / round), chance {pair(area[1:])}")
    columns = (*LAYERS, "input")  # guided backprop's maps belong to no layer
    header("method", "target", *(f"{SHORT.get(c, c)} energy (pointing)" for c in columns))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in payload["rows"]:
        energy = [r["energy"][k] for k in PLANTS]
        below = [e < area[k] for e, k in zip(energy, PLANTS, strict=True)]
        text = f"{pair(energy, below)} ({pair([r['pointing'][k] for k in PLANTS])})"
        cells.setdefault((r["method"], r["target"]), {})[r["layer"]] = text
    for (method, target), by_layer in cells.items():
        cells_text = [by_layer.get(column, "") for column in columns]
        print(f"| {method} | {target} | " + " | ".join(cells_text) + " |")


def report_sanity(rows: list[dict]) -> None:
    header(
        "method",
        "target",
        "layer",
        "randomised",
        "median abs ρ",
        "SSIM",
        "energy trained → random",
        "all-zero random",
        "verdict",
    )
    # Two rows per map: the cascade down to the layer's own block, and the whole network.
    first: dict[tuple, int] = {}
    for r in rows:
        if r["verdict"]:
            key = (r["method"], r["target"], r["layer"])
            first[key] = min(first.get(key, r["depth"]), r["depth"])
    keyed: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        shown = r["randomized"] == "full" or r["depth"] == first.get(
            (r["method"], r["target"], r["layer"])
        )
        if r["verdict"] and shown and r["class_index"] in PLANTS:
            key = (r["method"], r["target"], r["layer"], r["randomized"])
            keyed.setdefault(key, {})[r["class_index"]] = r
    for (method, target, layer, randomized), by_class in keyed.items():
        got = [by_class.get(k, {}) for k in PLANTS]
        trained = pair([g.get("energy_trained") for g in got])
        random = pair([g.get("energy_randomized") for g in got])
        verdicts = " / ".join(g.get("verdict", "–") for g in got)
        print(
            f"| {method} | {target} | {SHORT.get(layer, layer)} | {randomized} | "
            f"{pair([g.get('rho_abs_median') for g in got])} | "
            f"{pair([g.get('ssim_median') for g in got])} | {trained} → {random} | "
            f"{pair([g.get('zero_randomized') for g in got])} | {verdicts} |"
        )


def above_floor(row: dict) -> float | None:
    """A deletion row's ratio with the fully filled image's score taken out of both areas,
    from its mean curves (as ``FaithfulnessRow.ratio_above_floor``; older files lack it)."""
    if not row.get("curve_random"):
        return row.get("ratio_above_floor")
    floor = row["curve_random"][-1]
    above = row["auc_random"] - floor
    return (row["auc_map"] - floor) / above if above > 0.05 * row["auc_random"] else None


def report_faithfulness(payload: dict) -> None:
    print(f"fill {payload['fill']}, {payload['steps']} steps, {payload['images']} images")
    header(
        "method",
        "target",
        "layer",
        "deletion / random",
        "above floor",
        "GT first / random",
        "insertion / random",
    )
    keyed: dict[tuple, dict] = {}
    for r in payload["rows"]:
        keyed.setdefault((r["method"], r["target"], r["layer"]), {})[
            (r["curve"], r["class_index"])
        ] = r
    for (method, target, layer), cell in keyed.items():
        deletion = [cell[("deletion", k)] for k in PLANTS]
        gt = [d["auc_gt_first"] / d["auc_random"] for d in deletion]
        print(
            f"| {method} | {target} | {SHORT.get(layer, layer)} | "
            f"{pair([d['ratio'] for d in deletion])} | "
            f"{pair([above_floor(d) for d in deletion])} | {pair(gt)} | "
            f"{pair([cell[('insertion', k)]['ratio'] for k in PLANTS])} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/quality", help="folder of the JSON results")
    common.add_argument("--size", type=int, default=128)
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--methods", nargs="*", help="default: every method")
    common.add_argument(
        "--scorecam-channels",
        type=int,
        default=16,
        help="Score-CAM's channel cap (one forward per channel)",
    )
    p = sub.add_parser("train", parents=[common])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=42, help="seed_everything of both runs")
    p.add_argument("--images", type=int, default=64)
    p.set_defaults(run=train)
    p = sub.add_parser("localisation", parents=[common])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=64)
    p.set_defaults(run=localisation)
    p = sub.add_parser("sanity", parents=[common])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--init", action="store_true", help="compare re-initialisations (Grad-CAM, d4)")
    p.set_defaults(run=sanity)
    p = sub.add_parser("faithfulness", parents=[common])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--fill", choices=["mean", "blur"], default="mean")
    p.add_argument("--layers", nargs="*")
    p.add_argument("--targets", nargs="*")
    p.set_defaults(run=faithfulness)
    p = sub.add_parser("shortcut", parents=[common])
    p.add_argument("--clean", required=True)
    p.add_argument("--shortcut", required=True)
    p.add_argument("--images", type=int, default=64)
    p.set_defaults(run=shortcut)
    p = sub.add_parser("report", help="compact tables from the JSON files of the others")
    p.add_argument("files", nargs="+", help="localisation.json, sanity.json, faithfulness_*.json")
    p.set_defaults(run=report)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    args.run(args)


if __name__ == "__main__":
    main()
