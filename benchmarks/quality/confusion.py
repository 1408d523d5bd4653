"""Explaining a confusion, measured on planted data (issue 25).

Trains a U-Net on ``segcam_lightning.data.cue.CueConfusion``: ``marked`` and ``plain`` discs that
differ only in a small dark dot (the cue), faint on some discs, so the model sometimes takes a
marked disc for a plain one. Then, on held-out images where it does, it compares two maps of
the same images at each layer:

- the **confusion map**: ``Confusion(true_class=marked, contrastive=True)``, channel ``plain``:
  over the marked pixels predicted plain, plain's logit minus marked's — what made the model
  choose plain there;
- its **reverse**: marked's logit minus plain's over the same pixels — what still spoke for
  the right class there (a callable target);
- the **class map**: ``gt_region`` of ``marked``: marked's logit over its ground truth — where
  the class is;

each with Grad-CAM (one weight per channel: a map lights every pixel whose features favour the
score, inside the region or not) and LayerCAM (each position weighted by its own gradient).

For each it reports the share of the map's energy on the cue of the confused discs (the dots,
dilated by 2 px for the maps' upsampling) and inside those discs, next to the cue's share of
the image (chance). Then it writes the test images as a folder and audits the checkpoint with
``explain.py --explain-errors`` (the report of docs/which-map.md's screenshot).

Usage::

    python benchmarks/quality/confusion.py --out runs/confusion

Prints a Markdown table and writes ``<out>/confusion.json``, ``<out>/net.pt``, ``<out>/data``
and ``<out>/audit`` (the report).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.targets import Confusion
from segcam_lightning.data.colormap import mask_to_color
from segcam_lightning.data.cue import CUE_CLASS_NAMES, CUE_COLORMAP, MARKED, PLAIN, CueConfusion
from segcam_lightning.models import UNet

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("e4.conv.conv.5", "d4.conv.conv.5")
METHODS = ("gradcam", "layercam")


def _reverse(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Marked's logit minus plain's over the marked pixels the model predicts plain, as the
    score of the ``marked`` channel (the others score 0)."""
    region = ((masks == MARKED) & (logits.argmax(1) == PLAIN)).to(logits.dtype)
    margin = (logits[:, MARKED] - logits[:, PLAIN]) * region
    scores = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    scores[:, MARKED] = margin.flatten(1).sum(1)
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8, help="U-Net base width")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--min-pixels", type=int, default=20, help="confused pixels per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/confusion"))
    parser.add_argument(
        "--reuse", action="store_true", help="measure <out>/net.pt instead of training again"
    )
    return parser.parse_args(argv)


def stack(data: CueConfusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(len(data))]
    return tuple(torch.stack([s[k] for s in items]) for k in ("image", "mask", "cue"))


def train(args: argparse.Namespace) -> UNet:
    torch.manual_seed(args.seed)
    images, masks, _ = stack(CueConfusion(args.num_train, args.size, args.seed))
    net = UNet(3, base_width=args.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        batch = torch.randint(0, len(images), (16,), generator=generator)
        loss = F.cross_entropy(net(images[batch]), masks[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def confused_discs(masks: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Per image, the marked discs with at least one pixel predicted plain ``[N, H, W]``."""
    out = torch.zeros_like(masks, dtype=torch.bool)
    for i in range(len(masks)):
        marked = (masks[i] == MARKED).numpy().astype(np.uint8)
        count, components = cv2.connectedComponents(marked, connectivity=4)
        wrong = ((masks[i] == MARKED) & (preds[i] == PLAIN)).numpy()
        for c in range(1, count):
            disc = components == c
            if (wrong & disc).any():
                out[i] |= torch.from_numpy(disc)
    return out


def shares(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The share of each map's energy ``[N, H, W]`` inside ``region``; NaN for an empty map."""
    total = maps.flatten(1).sum(1)
    inside = (maps * region).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), float("nan"))


def measure(net: UNet, args: argparse.Namespace) -> dict:
    images, masks, cue = stack(CueConfusion(args.num_test, args.size, args.seed + 2))
    with torch.no_grad():
        preds = net(images).argmax(1)
    matrix = np.zeros((3, 3), np.int64)
    np.add.at(matrix, (masks.flatten().numpy(), preds.flatten().numpy()), 1)
    wrong = ((masks == MARKED) & (preds == PLAIN)).flatten(1).sum(1)
    keep = wrong >= args.min_pixels
    x, y, discs = images[keep], masks[keep], confused_discs(masks[keep], preds[keep])
    kernel = np.ones((5, 5), np.uint8)
    cue_region = torch.stack(
        [torch.from_numpy(cv2.dilate(c.numpy().astype(np.uint8), kernel) > 0) for c in cue[keep]]
    )
    cue_region &= discs
    targets = {
        "confusion: plain − marked over the confused pixels": (
            Confusion(MARKED, contrastive=True),
            PLAIN,
        ),
        "reverse: marked − plain over the confused pixels": (_reverse, MARKED),
        "class map: gt_region of marked": ("gt_region", MARKED),
    }
    rows = []
    for name, (target, channel) in targets.items():
        for method in METHODS:
            engine = CAMEngine(net, list(LAYERS), method, target)
            cams = engine(x, classes=[channel], masks=y).cams[:, :, 0]  # [N, L, H, W]
            for layer_index, layer in enumerate(LAYERS):
                maps = cams[:, layer_index]
                on_cue, in_disc = shares(maps, cue_region), shares(maps, discs)
                rows.append(
                    {
                        "map": name,
                        "method": method,
                        "layer": layer,
                        "images": int(on_cue.isfinite().sum()),
                        "energy_on_cue_median": float(on_cue.nanmedian()),
                        "energy_in_confused_discs_median": float(in_disc.nanmedian()),
                    }
                )
    chance = cue_region.flatten(1).float().mean(1)
    return {
        "confusion_matrix": matrix.tolist(),
        "marked_taken_for_plain": float(matrix[MARKED, PLAIN] / matrix[MARKED].sum()),
        "images_confused": int(keep.sum()),
        "cue_share_of_image_median": float(chance.median()),
        "rows": rows,
    }


def write_folder(root: Path, args: argparse.Namespace) -> None:
    data = CueConfusion(args.num_test, args.size, args.seed + 2)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(len(data)):
        sample = data[i]
        rgb = sample["image"].permute(1, 2, 0).mul(255).round().byte().numpy()
        cv2.imwrite(str(root / "images" / f"{sample['name']}.png"), rgb[..., ::-1])
        colour = mask_to_color(sample["mask"].numpy(), CUE_COLORMAP)
        cv2.imwrite(str(root / "masks" / f"{sample['name']}.png"), colour)


def audit(args: argparse.Namespace) -> None:
    command = [
        sys.executable,
        str(ROOT / "explain.py"),
        "--checkpoint",
        str(args.out / "net.pt"),
        "--data",
        str(args.out / "data"),
        "--channel-order",
        "rgb",
        "--size",
        str(args.size),
        "--colormap",
        json.dumps([list(c) for c in CUE_COLORMAP]),
        "--class-names",
        *CUE_CLASS_NAMES,
        "--layers",
        *LAYERS,
        "--explain-errors",
        "--explain-errors-images",
        "3",
        "--report-images",
        "0",
        "--out",
        str(args.out / "audit"),
        "--overwrite",
        "--quiet",
    ]
    print("$", " ".join(command[1:]))
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.reuse:
        net = UNet(3, base_width=args.width)
        net.load_state_dict(torch.load(args.out / "net.pt", weights_only=True))
        net.eval()
    else:
        net = train(args)
        torch.save(net.state_dict(), args.out / "net.pt")
    trained = time.perf_counter() - start
    result = measure(net, args)
    result.update(settings=vars(args) | {"out": str(args.out)}, train_seconds=trained)
    (args.out / "confusion.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'loaded' if args.reuse else 'trained'} {args.steps} steps in {trained:.0f} s; "
        "marked taken for plain: "
        f"{result['marked_taken_for_plain']:.1%} of marked pixels; {result['images_confused']} "
        f"test image(s) with >= {args.min_pixels} such pixels; the cue's median share of an "
        f"image (chance): {result['cue_share_of_image_median']:.3f}\n"
    )
    print(
        "| map | method | layer | images | energy on the cue (median) | inside the confused "
        "discs (median) |"
    )
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(
            f"| {row['map']} | {row['method']} | {row['layer']} | {row['images']} | "
            f"{row['energy_on_cue_median']:.3f} | {row['energy_in_confused_discs_median']:.3f} |"
        )
    write_folder(args.out / "data", args)
    audit(args)


if __name__ == "__main__":
    main()
