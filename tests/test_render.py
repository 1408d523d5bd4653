"""Rendering: the blog's overlay and panel, and the labelled grid."""

import cv2
import numpy as np
import pytest
import torch

from segcam_lightning.data.colormap import BLOG_COLORMAP
from segcam_lightning.render import (
    blog_panel,
    blog_panels,
    cam_grid,
    colorize_cam,
    colorize_mask,
    display_images,
    hstack_with_separators,
    opencv_threads,
    overlay_cam,
    peak_voxel,
    to_uint8_image,
    volume_grid,
    volume_slices,
)


def test_overlay_is_the_blogs_blend():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    cam = rng.random((16, 20)).astype(np.float32)
    # The blog post, in BGR: addWeighted(image, 0.4, applyColorMap(uint8(255 * cam), JET), 0.6, 0).
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)
    expected = cv2.cvtColor(cv2.addWeighted(bgr, 0.4, heat, 0.6, 0), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(overlay_cam(rgb, torch.from_numpy(cam)), expected)


def test_blog_panel_layout():
    image = np.zeros((8, 6, 3), np.uint8)
    mask = np.zeros((8, 6), bool)
    mask[2:4] = True
    panel = blog_panel(image, image, mask)
    assert panel.shape == (8, 6 * 3 + 2 * 10, 3)
    assert (panel[:, 6:16] == 255).all()  # white separator
    assert (panel[2:4, -6:] == 255).all() and (panel[:2, -6:] == 0).all()


def test_mask_colours_follow_bgr_colormap():
    rgb = colorize_mask(torch.tensor([[0, 1, 2]]), BLOG_COLORMAP)
    assert rgb[0].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # black, red, green


def test_to_uint8_image():
    image = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)
    assert to_uint8_image(image).tolist() == [[[0, 128, 255]]]


def test_grid_has_a_title_row_and_a_row_per_image():
    images, cams = torch.rand(2, 3, 32, 40), torch.rand(2, 3, 32, 40)
    masks = torch.randint(0, 3, (2, 32, 40))
    grid = cam_grid(images, cams, ["a", "b", "c"], BLOG_COLORMAP, masks=masks, preds=masks, gap=4)
    columns = 6  # input, ground truth, prediction, 3 overlays
    assert grid.shape[1] == columns * 40 + (columns - 1) * 4
    bar = max(16, min(32, 40 // 6))
    assert grid.shape[0] == bar + 2 * 32 + 4 + 4 + bar  # title, 2 rows, footer
    assert grid.dtype == np.uint8


def test_grid_footer_keys_the_class_colours_and_the_cam_colours():
    images, cams = torch.rand(1, 3, 64, 96), torch.rand(1, 1, 64, 96)
    masks = torch.zeros(1, 64, 96, dtype=torch.long)
    plain = cam_grid(images, cams, ["a"], BLOG_COLORMAP, masks=masks, preds=masks)
    keyed = cam_grid(
        images, cams, ["a"], BLOG_COLORMAP, masks=masks, preds=masks, legend=["x", "y", "z"]
    )
    bar = max(16, min(32, 96 // 6))
    footer = keyed[-bar:]
    # The colour bar runs from JET's blue (0) to its red (1) under the last column.
    bar_row = footer[bar // 2, 3 * (96 + 4) :]
    saturation = bar_row.max(axis=-1).astype(int) - bar_row.min(axis=-1)
    coloured = bar_row[saturation > 60]  # the bar, not the gray digits beside it
    assert coloured[0, 2] > coloured[0, 0] and coloured[-1, 0] > coloured[-1, 2]
    # The key draws each label's colour (BLOG_COLORMAP[1] is dark red, RGB 128, 0, 0).
    assert ((footer[:, : 3 * 96] == (128, 0, 0)).all(axis=-1)).any()
    assert not ((plain[-bar:, : 3 * 96] == (128, 0, 0)).all(axis=-1)).any()


#: Six BGR colours no anti-aliased black text or grey swatch border can produce.
KEY_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0)]


@pytest.mark.parametrize(
    "legend",
    [
        [f"class_{k}" for k in range(4)],  # the case: class_3 was dropped at 64 px
        [f"a_rather_long_class_name_{k}" for k in range(6)],
        ["short", "x" * 200],  # wider than a line on its own
    ],
)
def test_the_key_wraps_to_show_every_class_and_stays_inside_the_grid(legend):
    side, gap = 64, 4
    images, cams = torch.rand(2, 3, side, side), torch.rand(2, 1, side, side)
    masks = torch.zeros(2, side, side, dtype=torch.long)
    name = "a_very_long_class_name_for_a_title"
    grid = cam_grid(
        images, cams, [name], KEY_COLOURS, masks=masks, preds=masks, gap=gap, legend=legend
    )
    bar = max(16, min(32, side // 6))
    footer = grid[bar + 2 * (side + gap) :]  # title, then each row and the gap after it
    bar_left = grid.shape[1] - side  # the CAM colour bar lies under the last column
    key = footer[:, : bar_left - 2]
    for colour in KEY_COLOURS[: len(legend)]:
        filled = (key == colour[::-1]).all(axis=-1).sum()
        assert filled >= 5 * 5, (colour, filled)  # a swatch of at least 6 px, border aside
    # The key stays left of the colour bar, and no text runs past the grid's edges.
    assert (footer[:, bar_left - 3 : bar_left] == 255).all()
    for band in (grid[:bar], footer):
        assert (band[:, [0, -1]] == 255).all()
    assert (grid[-1] == 255).all()
    if len(legend) > 4:  # six long names do not fit one line of a 64 px grid's key
        assert footer.shape[0] > bar


def test_grid_notes_mark_tiles():
    images, cams = torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    marked = cam_grid(images, cams, ["a"], BLOG_COLORMAP, notes=[["absent"]])
    clean = cam_grid(images, cams, ["a"], BLOG_COLORMAP, notes=[[""]])
    bar = max(16, min(32, 64 // 6))
    tile = (slice(bar, bar + 64), slice(64 + 4, 2 * 64 + 4))
    assert (marked[tile] != clean[tile]).any()
    assert (marked[:, :64] == clean[:, :64]).all()


def test_grid_rejects_mismatched_names():
    with pytest.raises(ValueError, match="one class name per CAM channel"):
        cam_grid(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), ["a"], BLOG_COLORMAP)


def test_opencv_threads_is_restored_even_after_an_error():
    before = cv2.getNumThreads()
    with pytest.raises(RuntimeError, match="inside"), opencv_threads(1):
        assert cv2.getNumThreads() == 1
        raise RuntimeError("inside")
    assert cv2.getNumThreads() == before


@pytest.mark.parametrize("colormap", [cv2.COLORMAP_JET, cv2.COLORMAP_VIRIDIS, cv2.COLORMAP_TURBO])
def test_colorize_cam_is_opencvs_colour_map_in_rgb(colormap):
    cam = np.random.default_rng(0).random((17, 23)).astype(np.float32)
    cam[0, :3] = (0.0, 1.0, 1.5)  # the ends and a value above 1
    scaled = np.clip(cam * 255.0, 0, 255).astype(np.uint8)
    expected = cv2.cvtColor(cv2.applyColorMap(scaled, colormap), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(colorize_cam(cam, colormap), expected)
    np.testing.assert_array_equal(colorize_cam(torch.from_numpy(cam), colormap), expected)


@pytest.mark.parametrize("with_masks", [True, False])
def test_blog_panels_equal_one_panel_at_a_time(with_masks):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    cams = rng.random((4, 12, 9)).astype(np.float32)
    masks = rng.random((4, 12, 9)) > 0.5 if with_masks else None
    panels, overlays = blog_panels(image, cams, masks)
    for k in range(4):
        overlay = overlay_cam(image, cams[k])
        np.testing.assert_array_equal(overlays[k], overlay)
        expected = (
            blog_panel(image, overlay, masks[k])
            if with_masks
            else hstack_with_separators([image, overlay])
        )
        np.testing.assert_array_equal(panels[k], expected)


def test_colorize_cam_takes_a_bgr_table_as_opencv_does():
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_HOT)
    cam = np.random.default_rng(2).random((9, 7)).astype(np.float32)
    expected = colorize_cam(cam, cv2.COLORMAP_HOT)
    np.testing.assert_array_equal(colorize_cam(cam, table), expected)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_normalised_images_display_as_the_originals():
    # uint8 -> [0, 1] -> ImageNet-normalised -> displayed: within one grey level of the original
    # (float32 round trip error ~1e-7, far below the 1/255 of a grey level).
    rng = np.random.default_rng(0)
    raw = torch.from_numpy(rng.integers(0, 256, (2, 3, 12, 10)).astype(np.float32) / 255)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    normalised = (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    shown = display_images(normalised, IMAGENET_MEAN, IMAGENET_STD)
    assert shown.shape == (2, 3, 12, 10)
    difference = np.abs(
        to_uint8_image(shown[0]).astype(int) - to_uint8_image(raw[0]).astype(int)
    ).max()
    assert difference <= 1


def test_display_bgr_gray_and_unnamed_normalisation():
    rgb = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(display_images(rgb.flip(1), channel_order="bgr"), rgb)
    torch.testing.assert_close(display_images(rgb), rgb)
    gray = display_images(torch.rand(2, 1, 4, 4))
    assert gray.shape == (2, 3, 4, 4) and torch.equal(gray[:, 0], gray[:, 2])
    # Normalised by a transform nobody named: stretched per image to the full range, not clipped.
    stretched = display_images(torch.randn(2, 3, 4, 4) * 3)
    assert stretched.amin() == 0 and stretched.amax() == 1
    with pytest.raises(ValueError, match="one per input channel"):
        display_images(rgb, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="non-zero"):
        display_images(rgb, mean=0.5, std=0.0)
    with pytest.raises(ValueError, match="'rgb' or 'bgr'"):
        display_images(rgb, channel_order="hsv")


def test_volume_slices_cut_through_the_voxel():
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    views = volume_slices(volume, (1, 2, 3), size=(6, 6), labels=True)
    assert views.shape == (3, 6, 6)

    def nearest(n):  # nearest-exact source rows of n rows stretched to 6: the pixel centres
        return ((torch.arange(6) + 0.5) * n / 6).floor().long()

    assert torch.equal(views[0], volume[1][nearest(5)])  # axial [H, W] at depth 1
    assert torch.equal(views[1], volume[:, 2, :][nearest(4)])  # coronal [D, W] at row 2
    assert torch.equal(views[2], volume[:, :, 3][nearest(4)][:, nearest(5)])  # sagittal [D, H]


def test_peak_voxel_and_volume_grid():
    cam = torch.zeros(8, 8, 8)
    cam[2, 5, 7] = 1.0
    assert peak_voxel(cam) == (2, 5, 7)
    assert peak_voxel(torch.zeros(8, 8, 8)) == (4, 4, 4)
    volumes, cams = torch.rand(2, 3, 8, 8, 8), torch.stack([cam, cam.flip(0)])
    masks = torch.randint(0, 3, (2, 8, 8, 8))
    grid = volume_grid(volumes, cams, "a", BLOG_COLORMAP, masks=masks, preds=masks)
    # 8-voxel slices are shown 12 times larger: the smallest multiple of 8 reaching 96 px.
    tile = 96
    bar = max(16, min(32, tile // 6))
    # Three views per volume, title and footer: 6 rows of tiles, 4 px apart.
    assert grid.shape == (bar + 6 * tile + 6 * 4 + bar, 4 * tile + 3 * 4, 3)
    # Labels are resized by nearest neighbour: the GT column holds only the colormap's colours.
    gt = grid[bar : bar + tile, tile + 4 : 2 * tile + 4].reshape(-1, 3)
    colours = {tuple(int(c) for c in colour[::-1]) for colour in BLOG_COLORMAP}
    assert {tuple(int(c) for c in px) for px in gt} <= colours
