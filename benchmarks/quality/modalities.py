"""Which input channel drives a class, measured on planted data (issue 25).

Trains the U-Net (``SegmentationModule``) on ``segcam_lightning.data.planted``: ``C`` channels,
class ``k`` drawn only in channel ``k`` (channel 0 texture alone), so the right answer is known.
Then, on held-out test samples, it attributes every class to the input channels with
``segcam_lightning.cam.modalities.ModalityAttribution`` and prints, per object class, how often
the class's own channel ranks first: by gradient × input (baselines zero and mean) and by the
occlusion check, with the class's own share, for the predicted region (``logit_region``) and
the ground truth (``gt_region``). The acceptance of issue 25: at least 95 % of the audited
samples rank the own channel first, for every class, and the occlusion check agrees.

Usage::

    python benchmarks/quality/modalities.py --dims 2 --out runs/modalities      # images
    python benchmarks/quality/modalities.py --dims 3 --out runs/modalities      # volumes

Prints Markdown tables and writes ``<out>/modalities_<dims>d.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from segcam_lightning.cam.functional import predicted_classes
from segcam_lightning.cam.modalities import ModalityAttribution
from segcam_lightning.data.planted import PlantedDataModule
from segcam_lightning.module import SegmentationModule

#: (target, baseline, steps) measured: the default (integrated gradients, 16 steps, mean
#: baseline), plain gradient × input (1 step), both with the predicted region, and the default
#: on the ground truth. The occlusion check depends on the target only.
SETTINGS = (
    ("logit_region", "mean", 16),
    ("logit_region", "zero", 1),
    ("logit_region", "mean", 1),
    ("gt_region", "mean", 16),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--size", type=int, default=None, help="default 64 (2-D), 32 (3-D)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--width", type=int, default=8, help="U-Net base width")
    parser.add_argument("--epochs", type=int, default=None, help="default 6 (2-D), 8 (3-D)")
    parser.add_argument("--num-train", type=int, default=None, help="default 256 (2-D), 96 (3-D)")
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/modalities"))
    args = parser.parse_args(argv)
    two = args.dims == 2
    args.size = args.size or (64 if two else 32)
    args.epochs = args.epochs or (6 if two else 8)
    args.num_train = args.num_train or (256 if two else 96)
    return args


def train(args: argparse.Namespace) -> tuple[SegmentationModule, PlantedDataModule, float]:
    """The U-Net trained on the planted data; the data module and the seconds it took."""
    L.seed_everything(args.seed, verbose=False)
    data = PlantedDataModule(
        dims=args.dims,
        size=args.size,
        num_channels=args.channels,
        batch_size=args.batch_size,
        seed=args.seed,
        num_train=args.num_train,
        num_val=16,
        num_test=args.num_test,
    )
    model = SegmentationModule(
        num_classes=args.channels,
        base_width=args.width,
        in_channels=args.channels,
        dims=args.dims,
        class_names=data.class_names,
        lr=3e-3,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=args.out,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return model, data, time.perf_counter() - start


def test_set(data: PlantedDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    data.setup("test")
    samples = [data.datasets["test"][i] for i in range(len(data.datasets["test"]))]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


def iou(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, k: int) -> float:
    with torch.no_grad():
        preds = torch.cat(
            [predicted_classes(net(images[i : i + 8])) for i in range(0, len(images), 8)]
        )
    inter = ((preds == k) & (masks == k)).sum().item()
    union = ((preds == k) | (masks == k)).sum().item()
    return inter / union if union else float("nan")


def measure(net, images, masks, names, target: str, baseline: str, steps: int) -> list[dict]:
    """One row per object class: samples audited (its region not empty), the share of them
    ranking the own channel first (gradient, occlusion), the own channel's mean shares."""
    attribution = ModalityAttribution(net, target=target, baseline=baseline, steps=steps)
    parts = [attribution(images[i : i + 8], masks[i : i + 8]) for i in range(0, len(images), 8)]
    shares = torch.cat([p.shares for p in parts])
    occlusion = torch.cat([p.occlusion for p in parts])
    present = torch.cat([p.present for p in parts])
    rows = []
    for k in range(1, len(names)):
        held = present[:, k]
        n = int(held.sum())
        own, own_occ = shares[held, k, k], occlusion[held, k, k]
        rows.append(
            {
                "class": names[k],
                "target": target,
                "baseline": baseline,
                "steps": steps,
                "images": n,
                "first": (shares[held, k].argmax(-1) == k).float().mean().item() if n else None,
                "first_occlusion": (occlusion[held, k].argmax(-1) == k).float().mean().item()
                if n
                else None,
                "own_share": own.mean().item() if n else None,
                "own_share_min": own.min().item() if n else None,
                "own_occlusion": own_occ.mean().item() if n else None,
                "agree": (shares[held, k].argmax(-1) == occlusion[held, k].argmax(-1))
                .float()
                .mean()
                .item()
                if n
                else None,
            }
        )
    return rows


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(rows: list[dict], ious: dict[str, float]) -> str:
    lines = [
        "| class | target | baseline | steps | test IoU | samples | own channel first: gradient "
        "| occlusion | agree | own share: mean (min) | occlusion |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["class"], r["target"], r["baseline"], r["steps"], _cell(ious[r["class"]])]
        cells += [r["images"]]
        cells += [_cell(r[key]) for key in ("first", "first_occlusion", "agree")]
        cells += [f"{_cell(r['own_share'])} ({_cell(r['own_share_min'])})"]
        cells += [_cell(r["own_occlusion"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, data, seconds = train(args)
    net = model.net.eval()
    images, masks = test_set(data)
    names = data.class_names
    ious = {names[k]: iou(net, images, masks, k) for k in range(len(names))}
    start = time.perf_counter()
    rows = [row for t, b, n in SETTINGS for row in measure(net, images, masks, names, t, b, n)]
    audit = time.perf_counter() - start
    print(
        f"{args.dims}-D planted data, {args.channels} channels, side {args.size}, U-Net width "
        f"{args.width}, {args.epochs} epochs on {args.num_train} samples: trained in "
        f"{seconds:.0f} s; audited {len(images)} test samples x {len(SETTINGS)} settings in "
        f"{audit:.1f} s"
    )
    print(table(rows, ious))
    out = args.out / f"modalities_{args.dims}d.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out.write_text(json.dumps({"settings": settings, "iou": ious, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
