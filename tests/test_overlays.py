"""Overlays composed as tensor operations give OpenCV's pixels: the grids and the audit's panels."""

import cv2
import numpy as np
import pytest
import torch

from segcam_lightning import overlays as O
from segcam_lightning.audit import AuditSettings
from segcam_lightning.audit.batches import explain_batch
from segcam_lightning.audit.data import make_loader
from segcam_lightning.audit.plan import prepare
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.models import UNet
from segcam_lightning.render import (
    blog_panels,
    cam_grid,
    colorize_mask,
    grid_tiles,
    overlay_cam,
    to_uint8_image,
)

ALPHAS = (0.4, 0.25, 0.5, 0.73)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_opencv_blends_each_pair_the_same_wherever_it_sits(alpha):
    # The blend table's premise: cv2.addWeighted of a pair of 8-bit values does not depend on
    # where the pair sits (SIMD lanes, row tails, odd widths). Random images of several shapes
    # against the table built from one flat call.
    rng = np.random.default_rng(0)
    table = O.blend_table(alpha)
    for shape in ((7, 13, 3), (64, 65, 3), (1, 1031, 3), (33, 8, 1)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        b = rng.integers(0, 256, shape, dtype=np.uint8)
        blended = cv2.addWeighted(a, alpha, b, 1.0 - alpha, 0).reshape(shape)
        looked_up = table[a.astype(np.int64) * 256 + b]
        np.testing.assert_array_equal(looked_up, blended)


@pytest.mark.parametrize(
    ("alpha", "colormap"),
    [(0.4, cv2.COLORMAP_JET), (0.25, cv2.COLORMAP_TURBO), (0.73, cv2.COLORMAP_VIRIDIS)],
)
def test_overlays_are_overlay_cam_of_every_map(alpha, colormap, monkeypatch):
    torch.manual_seed(0)
    images = O.uint8_images(torch.rand(3, 3, 20, 24))
    cams = torch.rand(3, 2, 4, 20, 24)
    cams[0, 0, 0] = 0.0  # the colour map's ends
    cams[0, 0, 1] = 1.0
    painter = O.Painter(alpha, colormap)
    got = painter.overlays(images, cams)
    assert got.shape == (3, 2, 4, 20, 24, 3) and got.dtype == torch.uint8
    for b in range(3):
        for i in range(2):
            for k in range(4):
                expected = overlay_cam(images[b].numpy(), cams[b, i, k], alpha, colormap)
                np.testing.assert_array_equal(got[b, i, k].numpy(), expected)
    # Fewer elements at once than one image's maps (chunks of maps), then than two images'
    # (chunks of images): the same pixels.
    for chunk in (20 * 24 * 3 * 3, 20 * 24 * 3 * 8 * 2 - 1):
        monkeypatch.setattr(O, "_CHUNK_ELEMENTS", chunk)
        assert torch.equal(painter.overlays(images, cams), got)


def test_grid_tiles_are_the_opencv_tiles():
    torch.manual_seed(1)
    images, cams = torch.rand(2, 3, 16, 12), torch.rand(2, 3, 16, 12)
    masks = torch.randint(0, 3, (2, 16, 12))
    tiles = grid_tiles(images, cams, BLOG_COLORMAP, masks, masks.flip(1), O.Painter())
    for b in range(2):
        image = to_uint8_image(images[b])
        np.testing.assert_array_equal(tiles.images[b], image)
        np.testing.assert_array_equal(tiles.masks[b], colorize_mask(masks[b], BLOG_COLORMAP))
        np.testing.assert_array_equal(
            tiles.preds[b], colorize_mask(masks[b].flip(0), BLOG_COLORMAP)
        )
        for k in range(3):
            np.testing.assert_array_equal(tiles.overlays[b, k], overlay_cam(image, cams[b, k]))
    grey = grid_tiles(images[:, :1], cams, BLOG_COLORMAP, None, None, O.Painter())
    assert grey.masks is None and grey.preds is None
    np.testing.assert_array_equal(grey.images[0], to_uint8_image(images[0, :1]))


def test_the_grids_overlay_tiles_are_overlay_cam():
    torch.manual_seed(2)
    images, cams = torch.rand(2, 3, 32, 40), torch.rand(2, 2, 32, 40)
    masks = torch.randint(0, 3, (2, 32, 40))
    gap = 4
    grid = cam_grid(images, cams, ["a", "b"], BLOG_COLORMAP, masks=masks, preds=masks, gap=gap)
    bar = max(16, min(32, 40 // 6))
    for b in range(2):
        top = bar + b * (32 + gap)
        for k in range(2):
            left = (3 + k) * (40 + gap)  # after input, ground truth and prediction
            tile = grid[top : top + 32, left : left + 40]
            np.testing.assert_array_equal(tile, overlay_cam(to_uint8_image(images[b]), cams[b, k]))


def test_label_colors_refuse_a_label_without_a_colour():
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        O.label_colors(torch.tensor([[0, 3]]), BLOG_COLORMAP)


def test_the_audits_overlays_are_the_blog_panels_blend(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", 4, 32)
    torch.manual_seed(0)
    torch.save({"model_state_dict": UNet(3, base_width=4).state_dict()}, tmp_path / "m.pth")
    settings = AuditSettings.from_options(
        checkpoints=(tmp_path / "m.pth",),
        data=str(data),
        out=tmp_path / "out",
        size=32,
        batch_size=4,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    plan = prepare(settings)
    batch = next(iter(make_loader(plan.dataset, settings.source, pin=False)))
    result = explain_batch(plan.models, batch, plan.classes, plan.device)
    (model,) = result.models
    assert model.overlays.shape == (*model.cams.shape, 3)
    for b in range(4):
        _, expected = blog_panels(result.images[b], model.cams[b, 0])
        np.testing.assert_array_equal(model.overlays[b, 0], expected)
