"""PNG encoding of the callback's grids: the package's encoder against TensorBoard's own.

Draws the grids of the default run (``configs/synthetic.yaml``: d4 + e4, 3 classes, 8 probe
images) after one short epoch, then times, in one process, the encoder ``add_image`` uses
(``torch.utils.tensorboard.summary.image``: PIL) and :func:`segcam_lightning.render.encode_png`
on the same grids, prints the ratio and the bytes, and checks that both decode to the drawn
pixels.

    python benchmarks/bench_encoding.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import cv2
import numpy as np
from torch.utils.tensorboard.summary import image as tensorboard_image

from segcam_lightning.callbacks import gradcam
from segcam_lightning.cli import build_cli
from segcam_lightning.render import encode_png


def default_grids() -> list[np.ndarray]:
    """The grids one validation of the default config draws."""
    grids: list[np.ndarray] = []
    write = gradcam.write_images

    def keep(trainer, images, step, tensorboard):
        if tensorboard:
            grids[:] = [image for _, image in images]
        write(trainer, images, step, tensorboard)

    gradcam.write_images = keep
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", "configs/synthetic.yaml", "--trainer.enable_progress_bar=false"]
        args += [f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}"]
        args += ["--trainer.max_epochs=1", "--data.num_train=64"]
        cli = build_cli(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    gradcam.write_images = write
    return grids


def seconds(encode, grids: list[np.ndarray], repeats: int) -> float:
    """The least time of ``repeats`` passes encoding every grid."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for grid in grids:
            encode(grid)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    grids = default_grids()

    def tensorboard(grid):
        summary = tensorboard_image("grid", grid, dataformats="HWC")
        return summary.value[0].image.encoded_image_string

    for name, encode in (("add_image (PIL)", tensorboard), ("encode_png", encode_png)):
        for grid in grids:
            decoded = cv2.imdecode(np.frombuffer(encode(grid), np.uint8), cv2.IMREAD_COLOR)
            assert np.array_equal(decoded[..., ::-1], grid), f"{name} changed the pixels"
    old = seconds(tensorboard, grids, args.repeats)
    new = seconds(encode_png, grids, args.repeats)
    old_bytes = sum(len(tensorboard(g)) for g in grids)
    new_bytes = sum(len(encode_png(g)) for g in grids)
    print(f"{len(grids)} grids of {grids[0].shape[1]}x{grids[0].shape[0]} px, the same pixels")
    print(f"add_image (PIL): {old * 1e3:.1f} ms, {old_bytes / 1e6:.2f} MB")
    print(f"encode_png:      {new * 1e3:.1f} ms, {new_bytes / 1e6:.2f} MB")
    print(f"encode_png is {old / new:.1f}x faster for {new_bytes / old_bytes - 1:+.1%} bytes")


if __name__ == "__main__":
    main()
