"""Drawing the callback's grids: overlays composed as tensor operations against tile-by-tile OpenCV.

The default run's grids (``configs/synthetic.yaml``: d4 + e4, 3 classes, 8 probe images of
128², ground truth and prediction columns), drawn from maps of that shape in one process:

- ``draw_grids``: what the callback runs (:mod:`segcam_lightning.overlays`: every layer's and
  class's overlays composed at once on the maps' device, the input, ground-truth and prediction
  tiles once, one copy to the CPU, then titles, notes and layout per grid);
- ``per tile``: how the grids were drawn before, each tile of each grid with OpenCV
  (``to_uint8_image``, ``colorize_mask``, ``overlay_cam``), then the same layout.

Both must give the same pixels (checked); the script prints the least time of ``--repeats`` and
the ratio. With ``--device cuda`` the maps start on the GPU, as the callback's do there.

    python benchmarks/bench_drawing.py
"""

from __future__ import annotations

import argparse
import platform
import time
import types

import numpy as np
import torch

from segcam_lightning.callbacks.display import (
    COLORMAPS,
    IGNORED_COLOR,
    DisplaySpec,
    GridLabels,
    draw_grids,
)
from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.render import (
    GridTiles,
    colorize_mask,
    overlay_cam,
    tiled_grid,
    to_uint8_image,
)


def per_tile(shown, masks, preds, cams, labels, spec) -> list[np.ndarray]:
    """The grids drawn tile by tile with OpenCV on the CPU (no absent-class notes: the random
    maps' images hold every class)."""
    shown, masks, preds, cams = (t.cpu() for t in (shown, masks, preds, cams))
    colormap = [*BLOG_COLORMAP, IGNORED_COLOR]
    colours = COLORMAPS[spec.colormap]
    grids = []
    for i in range(len(labels.layers)):
        for k, name in enumerate(labels.names):
            images = [to_uint8_image(image) for image in shown]
            tiles = GridTiles(
                np.stack(images),
                np.stack(
                    [
                        overlay_cam(im, cams[b, i, k], spec.alpha, colours)
                        for b, im in enumerate(images)
                    ]
                )[:, None],
                np.stack([colorize_mask(m, colormap) for m in masks]),
                np.stack([colorize_mask(p, colormap) for p in preds]),
            )
            notes = [[""] for _ in images]
            grid = tiled_grid(tiles, [name], colormap, notes=notes, legend=list(labels.legend))
            grids.append(grid)
    return grids


def least_seconds(draw, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        draw()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, layers, k, size = 8, 2, 3, 128
    shown = torch.rand(n, 3, size, size)
    cams = torch.rand(n, layers, k, size, size, device=device)
    masks = torch.randint(0, k, (n, size, size))
    preds = torch.randint(0, k, (n, size, size), device=device)
    names = ["soil", "narrow_leaf", "round_leaf"]
    labels = GridLabels(
        [("d4.conv.conv.5",), ("e4.conv.conv.5",)], [0, 1, 2], names, names, "multiclass", k, None
    )
    spec = DisplaySpec()
    trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(colormap=BLOG_COLORMAP))

    def composed():
        return [g for _, g in draw_grids(trainer, spec, shown, masks, preds, cams, labels)]

    def tiles():
        return per_tile(shown, masks, preds, cams, labels, spec)

    for a, b in zip(composed(), tiles(), strict=True):
        assert np.array_equal(a, b), "the composed grids differ from the tile-by-tile ones"
    new = least_seconds(composed, args.repeats, device)
    old = least_seconds(tiles, args.repeats, device)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, maps on {device}"
    )
    print(f"{layers * k} grids of {n} images {size}², the same pixels")
    print(f"per tile (OpenCV):  {old * 1e3:.1f} ms")
    print(f"draw_grids:         {new * 1e3:.1f} ms")
    print(f"draw_grids is {old / new:.1f}x faster")


if __name__ == "__main__":
    main()
