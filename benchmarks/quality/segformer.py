"""Which layer to trust on a transformer, measured (issue 23): a small SegFormer on the plants.

Builds a small ``SegformerForSemanticSegmentation`` from a ``SegformerConfig`` (random init, no
download), trains it on ``segcam_lightning.data.SyntheticSegmentation`` (the synthetic plants;
its logits are at 1/4 of the input's resolution, upsampled bilinearly for the loss), then
measures on held-out test images, per layer and CAM method, what docs/which-map.md measures
for the U-Net:

- energy inside the class's ground truth and the pointing game (means over the images that hold
  the class; ``*`` marks energy below chance, the class's mean area share);
- the randomisation test (``segcam_lightning.quality.sanity_check``): median |ρ| between the
  trained and the re-initialised model's maps, cascade from the head down to the layer's block
  (pass at <= 0.3) and the whole network (pass at <= 0.2);
- deletion (``deletion_insertion``, mean fill): AUC of the map's order over random order's
  (pass at <= 0.3).

The layers are the last block of each encoder stage (token layers ``[B, N, C]``; the engine
infers their grid from the input's shape), the decode head's ``linear_fuse`` (a 1×1 convolution
on the four stages' features, before batch norm) and its ``activation`` (after batch norm and
ReLU: what the 1×1 classifier reads). ``cascade_stages`` sees only two blocks in this model
(``decode_head`` and ``segformer``), so the cascade is given with ``stages=``: the head's parts
from the classifier down, then the encoder stages from the last (see :func:`cascade`); the
ReLU's test re-initialises down to ``linear_fuse`` (:data:`BLOCK_OF`).

Usage::

    python benchmarks/quality/segformer.py --out runs/segformer   # ~25 min on 2 busy cores
    python benchmarks/quality/segformer.py --tiny --out runs/segformer_tiny   # ~1 min, smoke run
    python benchmarks/quality/segformer.py --checkpoint runs/segformer/net.pt \
        --layers decode_head.linear_fuse decode_head.activation --out runs/segformer_head

(the last: measure a trained net again, no training). Prints Markdown tables and writes
``<out>/segformer.json`` and ``<out>/net.pt``. One thread by default (``--threads``): on a
loaded 2-core machine two threads made training 45× slower.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcam_lightning.data.synthetic import (
    SPLIT_OFFSETS,
    SYNTHETIC_CLASS_NAMES,
    SyntheticSegmentation,
)
from segcam_lightning.metrics import cam_energy_inside, pointing_game_hits
from segcam_lightning.quality import (
    deletion_insertion,
    layer_stages,
    method_maps,
    sanity_check,
)

PLANTS = (1, 2)
CLASSES = (0, 1, 2)
METHODS = ("gradcam", "hirescam", "layercam", "gradcam++")
TARGET = "softmax_mean"
RHO, FULL_RHO, DELETION = 0.3, 0.2, 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--size", type=int, default=128, help="image side (logits at size / 4)")
    add("--hidden", type=int, nargs=4, default=[16, 32, 64, 128], help="stage widths")
    add("--depths", type=int, nargs=4, default=[1, 1, 2, 1], help="blocks per stage")
    add("--heads", type=int, nargs=4, default=[1, 1, 2, 4], help="attention heads per stage")
    add("--decoder", type=int, default=64, help="decode head width")
    add("--steps", type=int, default=1000, help="training steps")
    add("--batch-size", type=int, default=16)
    add("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (cosine decay)")
    add("--num-train", type=int, default=512)
    add("--num-val", type=int, default=64)
    add("--num-test", type=int, default=64, help="test images for energy inside and pointing")
    add("--sanity-images", type=int, default=32, help="first test images, randomisation test")
    add("--deletion-images", type=int, default=16, help="first test images, deletion")
    add("--deletion-steps", type=int, default=16)
    add("--seeds", type=int, nargs="+", default=[0, 1], help="re-initialisation seeds")
    add("--methods", nargs="+", default=list(METHODS))
    add(
        "--localisation-targets",
        nargs="*",
        default=["logit_region"],
        help="other targets, energy inside and pointing only",
    )
    add("--seed", type=int, default=0, help="model init, batches and data seed")
    add("--threads", type=int, default=1)
    add("--tiny", action="store_true", help="a smoke run: 64², 20 steps, few images")
    add("--layers", nargs="+", help="default: layers_of(net), six layers")
    add("--checkpoint", type=Path, help="a net.pt this script wrote: measure it, no training")
    add("--out", type=Path, default=Path("runs/segformer"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.steps, args.num_train, args.num_val, args.num_test = 64, 20, 32, 8, 8
        args.sanity_images, args.deletion_images, args.deletion_steps = 4, 4, 4
        args.seeds = args.seeds[:1]
    return args


# ---------------------------------------------------------------------- model and data


def build_segformer(
    hidden: Sequence[int] = (16, 32, 64, 128),
    depths: Sequence[int] = (1, 1, 2, 1),
    heads: Sequence[int] = (1, 1, 2, 4),
    decoder: int = 64,
    num_labels: int = 3,
) -> nn.Module:
    """A randomly initialised ``SegformerForSemanticSegmentation`` from a config."""
    import transformers

    config = transformers.SegformerConfig(
        num_labels=num_labels,
        hidden_sizes=list(hidden),
        depths=list(depths),
        num_attention_heads=list(heads),
        decoder_hidden_size=decoder,
    )
    return transformers.SegformerForSemanticSegmentation(config)


def layers_of(net: nn.Module) -> list[str]:
    """The last block of each encoder stage, then the decode head's ``linear_fuse`` (a 1×1
    convolution, before batch norm) and its ``activation`` (after batch norm and ReLU: the
    features the 1×1 classifier reads)."""
    stages = net.segformer.stages
    blocks = [f"segformer.stages.{i}.blocks.{len(s.blocks) - 1}" for i, s in enumerate(stages)]
    return [*blocks, "decode_head.linear_fuse", "decode_head.activation"]


#: A layer whose own cascade step is another's: the ReLU holds no parameters, so its test
#: re-initialises down to the convolution that feeds it (as the U-Net's ``d4.conv.conv.5``,
#: a ReLU, is tested with its block ``d4`` re-initialised).
BLOCK_OF = {"decode_head.activation": "decode_head.linear_fuse"}


def cascade(net: nn.Module) -> list[str]:
    """The randomisation cascade, output side first: the head's parts, then each encoder stage
    from the last. Together they hold every parameter, so the last step is the whole network."""
    head = ["decode_head.classifier", "decode_head.activation", "decode_head.batch_norm"]
    head += ["decode_head.linear_fuse", "decode_head.linear_projections"]
    encoder = [f"segformer.stages.{i}" for i in reversed(range(len(net.segformer.stages)))]
    return head + encoder


def short(layer: str) -> str:
    """``segformer.stages.2.blocks.1`` → ``stage 3 block 2``; ``decode_head.linear_fuse`` →
    ``linear_fuse``."""
    parts = layer.split(".")
    if layer.startswith("segformer.stages.") and len(parts) == 5:
        return f"stage {int(parts[2]) + 1} block {int(parts[4]) + 1}"
    return parts[-1]


def split(num: int, size: int, split_name: str, seed: int) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, H, W]`` and label masks ``[N, H, W]`` of one split (data seed ``seed``,
    SegmentationDataModule's offsets)."""
    data = SyntheticSegmentation(num, size, seed + SPLIT_OFFSETS[split_name])
    samples = [data[i] for i in range(num)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


def logits_of(net: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    """Full-resolution logits (bilinear from 1/4), no graph."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            low = net(pixel_values=x).logits
            out.append(F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(out)


def class_iou(net: nn.Module, images: Tensor, masks: Tensor) -> list[float]:
    preds = logits_of(net.eval(), images).argmax(1)
    out = []
    for k in CLASSES:
        inter = ((preds == k) & (masks == k)).sum().item()
        union = ((preds == k) | (masks == k)).sum().item()
        out.append(inter / union if union else float("nan"))
    return out


def train(net: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, float, list[float]]:
    """AdamW with cosine decay, random flips; returns the net in eval mode, the seconds and
    the mean loss of each tenth of the steps."""
    images, masks = split(args.num_train, args.size, "train", args.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    losses, window = [], []
    net.train()
    started = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x, y = images[batch], masks[batch]
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        low = net(pixel_values=x).logits
        logits = F.interpolate(low, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0:
            losses.append(sum(window) / len(window))
            window = []
            print(f"  step {step + 1}: loss {losses[-1]:.3f}", flush=True)
    return net.eval(), time.perf_counter() - started, losses


# ---------------------------------------------------------------------- measuring


def _mean(values: Tensor, present: Tensor) -> list[float]:
    """Per class, the mean over the images that hold it (NaN where none does)."""
    count = present.sum(0)
    mean = (values.float() * present).sum(0) / count.clamp_min(1)
    return torch.where(count > 0, mean, float("nan")).tolist()


def chance(masks: Tensor) -> list[float]:
    """Each class's mean area share over the images that hold it."""
    out = []
    for k in CLASSES:
        share = (masks == k).flatten(1).float().mean(1)
        out.append(float(share[share > 0].mean()) if (share > 0).any() else float("nan"))
    return out


def localisation(
    net: nn.Module,
    layers: Sequence[str],
    method: str,
    target: str,
    images: Tensor,
    masks: Tensor,
    batch_size: int,
    rows: dict[tuple[str, str], dict],
) -> dict[tuple[str, str], Tensor]:
    """One method's maps at every layer (returned), with energy inside and pointing per class
    added to ``rows`` keyed ``(method, layer)``."""
    maps, *_ = method_maps(net, layers, method, target, images, masks, None, batch_size, {})
    for (label, layer), cams in maps.items():
        energy, present = cam_energy_inside(cams, masks, list(CLASSES))
        hits, _ = pointing_game_hits(cams, masks, list(CLASSES))
        rows[(label, layer)] = {
            "method": label,
            "target": target,
            "layer": layer,
            "energy": _mean(energy, present),
            "pointing": _mean(hits, present),
        }
    return maps


def measure(
    net: nn.Module,
    images: Tensor,
    masks: Tensor,
    *,
    layers: Sequence[str] | None = None,
    methods: Sequence[str] = METHODS,
    sanity_images: int = 32,
    deletion_images: int = 16,
    deletion_steps: int = 16,
    seeds: Sequence[int] = (0, 1),
    localisation_targets: Sequence[str] = (),
    batch_size: int = 16,
    log: bool = True,
) -> dict:
    """Every measurement of one trained SegFormer on held-out images and masks.

    Returns a JSON-ready dict: ``layers``, ``stages`` (the cascade), ``chance`` per class, the
    settings, ``timings`` and ``rows``, one per method and layer with per class
    (soil, narrow_leaf, round_leaf; NaN as ``None``) ``energy`` and ``pointing``, and for the plant
    classes ``rho_layer`` / ``verdict_layer`` (cascade down to the layer's block),
    ``rho_full`` / ``verdict_full`` (whole network) and ``deletion_ratio`` /
    ``verdict_deletion``, keyed by class name; ``localisation_rows``: energy and pointing
    alone for each of ``localisation_targets`` (the main rows use ``softmax_mean``).
    """
    net = net.eval()
    layers = list(layers) if layers is not None else layers_of(net)
    stages = cascade(net)
    names = SYNTHETIC_CLASS_NAMES
    timings: dict[str, float] = {}
    rows: dict[tuple[str, str], dict] = {}

    def note(name: str, started: float) -> None:
        timings[name] = time.perf_counter() - started
        if log:
            print(f"  {name}: {timings[name]:.0f} s", flush=True)

    extra: list[dict] = []
    for method in methods:
        started = time.perf_counter()
        maps = localisation(net, layers, method, TARGET, images, masks, batch_size, rows)
        for target in localisation_targets:
            found: dict[tuple[str, str], dict] = {}
            localisation(net, layers, method, target, images, masks, batch_size, found)
            extra += found.values()
        note(f"localisation {method}", started)

        started = time.perf_counter()
        # The layers BLOCK_OF names join, so that their cascade steps are run.
        own = {layer: BLOCK_OF.get(layer, layer) for layer in layers}
        checked = list(dict.fromkeys([*layers, *own.values()]))
        first = {layer: layer_stages(net, [own[layer]], stages)[own[layer]] for layer in layers}
        report = sanity_check(
            net,
            images[:sanity_images],
            masks[:sanity_images],
            checked,
            [method],
            [TARGET],
            seeds,
            class_names=names,
            stages=stages,
            batch_size=batch_size,
        )
        for r in report.verdicts():
            if r.class_index not in PLANTS:
                continue
            key = "full" if r.randomized == "full" else "layer"
            if (r.method, r.layer) not in rows:
                continue  # a layer only BLOCK_OF asked for
            row = rows[(r.method, r.layer)]
            if key == "layer":
                # Only the first step that reaches the layer's block.
                if r.depth <= first[r.layer]:
                    continue
                if row.get("depth_layer", math.inf) < r.depth:
                    continue
                if row.get("depth_layer", math.inf) > r.depth:
                    row.pop("rho_layer", None), row.pop("verdict_layer", None)
                row["depth_layer"] = r.depth
                row["randomized_layer"] = r.randomized
            row.setdefault(f"rho_{key}", {})[r.class_name] = r.rho_abs_median
            row.setdefault(f"verdict_{key}", {})[r.class_name] = r.verdict
        note(f"randomisation {method}", started)

        started = time.perf_counter()
        subset = slice(0, deletion_images)
        for (label, layer), cams in maps.items():
            result = deletion_insertion(
                net,
                images[subset],
                cams[subset][:, list(PLANTS)],
                masks[subset],
                list(PLANTS),
                class_names=names,
                steps=deletion_steps,
                fill="mean",
                batch_size=batch_size,
                labels={"method": label, "target": TARGET, "layer": layer},
            )
            row = rows[(label, layer)]
            for r in result:
                if r.curve == "deletion":
                    row.setdefault("deletion_ratio", {})[r.class_name] = r.ratio
                    row.setdefault("gt_first_ratio", {})[r.class_name] = (
                        r.auc_gt_first / r.auc_random if r.auc_random > 0 else float("nan")
                    )
                    row.setdefault("verdict_deletion", {})[r.class_name] = r.verdict
        note(f"deletion {method}", started)

    # The randomisation test of a full cascade step that is the layer's own is the full row.
    for row in rows.values():
        if "rho_layer" not in row and "rho_full" in row:
            row["rho_layer"], row["verdict_layer"] = row["rho_full"], row["verdict_full"]
            row["randomized_layer"] = "full"
    return _plain(
        {
            "layers": layers,
            "stages": stages,
            "target": TARGET,
            "chance": chance(masks),
            "images": len(images),
            "sanity_images": min(sanity_images, len(images)),
            "deletion_images": min(deletion_images, len(images)),
            "deletion_steps": deletion_steps,
            "seeds": list(seeds),
            "thresholds": {"rho_layer": RHO, "rho_full": FULL_RHO, "deletion": DELETION},
            "timings": timings,
            "rows": list(rows.values()),
            "localisation_rows": extra,
        }
    )


def _plain(value):
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------- printing


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def pair(values: dict | list | None, chance_of: Sequence[float] | None = None) -> str:
    """Narrow / round from a per-class list (``*`` below chance) or a dict by class name."""
    if values is None:
        return "–"
    if isinstance(values, dict):
        got = [values.get(SYNTHETIC_CLASS_NAMES[k]) for k in PLANTS]
        return " / ".join(v if isinstance(v, str) else fmt(v) for v in got)
    cells = []
    for k in PLANTS:
        v = values[k]
        below = chance_of is not None and v is not None and v < chance_of[k]
        cells.append(fmt(v) + ("*" if below else ""))
    return " / ".join(cells)


def table(result: dict) -> str:
    lines = [
        "| layer | method | energy inside | pointing | randomised to the layer: median abs ρ"
        " (verdict) | whole network | deletion / random |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {layer: i for i, layer in enumerate(result["layers"])}
    rows = sorted(result["rows"], key=lambda r: order.get(r["layer"], len(order)))
    for r in rows:
        layer_rho = f"{pair(r.get('rho_layer'))} ({pair(r.get('verdict_layer'))})"
        full_rho = f"{pair(r.get('rho_full'))} ({pair(r.get('verdict_full'))})"
        deletion = f"{pair(r.get('deletion_ratio'))} ({pair(r.get('verdict_deletion'))})"
        lines.append(
            f"| {short(r['layer'])} | {r['method']} | {pair(r['energy'], result['chance'])} | "
            f"{pair(r['pointing'])} | {layer_rho} | {full_rho} | {deletion} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    net = build_segformer(args.hidden, args.depths, args.heads, args.decoder)
    params = sum(p.numel() for p in net.parameters())
    print(f"SegFormer: {params} parameters, {args.size}²", flush=True)
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        net, seconds, losses = net.eval(), None, []
        print(f"loaded {args.checkpoint}: not trained", flush=True)
    else:
        net, seconds, losses = train(net, args)
        torch.save(net.state_dict(), args.out / "net.pt")
    val_iou = class_iou(net, *split(args.num_val, args.size, "val", args.seed))
    images, masks = split(args.num_test, args.size, "test", args.seed)
    test_iou = class_iou(net, images, masks)
    trained = f"trained {args.steps} steps in {seconds:.0f} s" if seconds else "loaded"
    print(
        f"{trained}; val IoU {[round(v, 3) for v in val_iou]} "
        f"(mIoU {sum(val_iou) / 3:.3f}); test IoU {[round(v, 3) for v in test_iou]}",
        flush=True,
    )
    started = time.perf_counter()
    result = measure(
        net,
        images,
        masks,
        layers=args.layers,
        methods=args.methods,
        sanity_images=args.sanity_images,
        deletion_images=args.deletion_images,
        deletion_steps=args.deletion_steps,
        seeds=args.seeds,
        localisation_targets=args.localisation_targets,
        batch_size=args.batch_size,
    )
    measured = time.perf_counter() - started
    result |= {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params,
        "train_seconds": seconds,
        "measure_seconds": measured,
        "losses": losses,
        "val_iou": val_iou,
        "val_miou": sum(val_iou) / 3,
        "test_iou": test_iou,
    }
    (args.out / "segformer.json").write_text(json.dumps(_plain(result), indent=1) + "\n")
    print(
        f"\nmeasured in {measured:.0f} s; {TARGET}; narrow / round; chance (area) "
        f"{pair(result['chance'])}; energy and pointing on {result['images']} test images, "
        f"randomisation on {result['sanity_images']} (seeds {result['seeds']}), deletion on "
        f"{result['deletion_images']} ({result['deletion_steps']} steps, mean fill)\n"
    )
    print(table(result))
    if result["localisation_rows"]:
        print("\n| layer | method | target | energy inside | pointing |\n|---|---|---|---|---|")
        for r in result["localisation_rows"]:
            energy = pair(r["energy"], result["chance"])
            print(
                f"| {short(r['layer'])} | {r['method']} | {r['target']} | {energy} | "
                f"{pair(r['pointing'])} |"
            )
    print(f"\nwrote {args.out / 'segformer.json'}")


if __name__ == "__main__":
    main()
