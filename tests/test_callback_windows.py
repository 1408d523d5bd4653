"""GradCAMCallback with ``ProbeSpec(window=SlidingWindow(...))``: whole probe volumes explained
through sliding windows, the grids' maps equal to :func:`sliding_window_cams` on the probe;
LightningCLI fills the window as a nested mapping."""

import pytest
import torch
from test_callback_projects import fit, read_events

import segcam_lightning.callbacks.gradcam as gradcam
from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.cam import CAMEngine, sliding_window_cams
from segcam_lightning.cam.windows import SlidingWindow
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.module import SegmentationModule

LAYER = "d4.conv.conv.5"
SIDE = 32  # the probe's volumes, twice the 16³ window

pytestmark = pytest.mark.usefixtures("one_thread")


def volumes_run():
    data = SegmentationDataModule(
        data="synthetic3d", image_size=SIDE, batch_size=2, num_train=2, num_val=2
    )
    torch.manual_seed(1)
    module = SegmentationModule(
        num_classes=3, base_width=2, in_channels=1, dims=3, class_names=data.class_names
    )
    return data, module


def test_the_grids_show_the_stitched_maps_of_the_probe(tmp_path, monkeypatch):
    drawn = []
    draw_grids = gradcam.draw_grids

    def keep(trainer, spec, shown, masks, preds, cams, labels):
        drawn.append(cams.clone())
        return draw_grids(trainer, spec, shown, masks, preds, cams, labels)

    monkeypatch.setattr(gradcam, "draw_grids", keep)
    window = SlidingWindow(roi_size=16, overlap=0.5, mode="gaussian")
    probe = ProbeSpec(num_images=2, window=window)
    callback = GradCAMCallback(layers=[LAYER], probe=probe, strict=True)
    data, module = volumes_run()
    trainer = fit(tmp_path, module, data, callback)
    assert len(drawn) == 1 and drawn[0].shape == (2, 1, 3, SIDE, SIDE, SIDE)
    engine = CAMEngine(module.net, [LAYER])
    images = callback.probe.images
    expected = sliding_window_cams(engine, images, 16, overlap=0.5, mode="gaussian").cams
    torch.testing.assert_close(drawn[0], expected, atol=1e-5, rtol=0)
    assert expected.amax() == 1  # maps to compare, not zeros
    whole = engine(images).cams
    assert (whole - expected).abs().amax() > 0.05  # the windows' maps, not the whole volumes'
    assert len(read_events(trainer).Tags()["images"]) == 3


def test_a_window_that_cannot_fit_the_probe_is_refused_at_setup(tmp_path):
    probe = ProbeSpec(num_images=2, window=SlidingWindow(roi_size=(16, 16)))
    callback = GradCAMCallback(layers=[LAYER], probe=probe, strict=True)
    data, module = volumes_run()
    with pytest.raises(ConfigurationError, match="one side or 3"):
        fit(tmp_path, module, data, callback)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({"roi_size": 0}, "roi_size"),
        ({"roi_size": 16, "overlap": 1.0}, r"overlap. in \[0, 1\)"),
        ({"roi_size": 16, "mode": "linear"}, "mode"),
        ({"roi_size": 16, "weights": "all"}, "weights"),
        ({"roi_size": 16, "sw_batch_size": 0}, "sw_batch_size"),
    ],
)
def test_window_settings_are_checked_when_made(window, message):
    with pytest.raises(ValueError, match=message):
        ProbeSpec(window=window)


def test_lightning_cli_fills_the_window_as_a_nested_mapping():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--probe", type=ProbeSpec)
    config = parser.parse_args(
        ["--probe", '{"num_images": 2, "window": {"roi_size": [16, 16, 8], "mode": "gaussian"}}']
    )
    probe = parser.instantiate_classes(config).probe
    assert probe.window == SlidingWindow(roi_size=(16, 16, 8), mode="gaussian")


def test_the_missed_pixel_maps_use_the_same_windows(tmp_path, monkeypatch):
    """errors=True with a window: the errors grids' maps are the missed-pixel target's
    sliding_window_cams on the probe, not a whole-volume pass."""
    from segcam_lightning.cam.targets import FalseNegatives

    drawn = []
    draw_grids = gradcam.draw_grids

    def keep(trainer, spec, shown, masks, preds, cams, labels):
        drawn.append((labels.layers, cams.clone()))
        return draw_grids(trainer, spec, shown, masks, preds, cams, labels)

    monkeypatch.setattr(gradcam, "draw_grids", keep)
    window = SlidingWindow(roi_size=16, overlap=0.5)
    probe = ProbeSpec(num_images=2, window=window)
    callback = GradCAMCallback(layers=[LAYER], probe=probe, strict=True, errors=True)
    data, module = volumes_run()
    fit(tmp_path, module, data, callback)
    (layers, missed) = drawn[-1]
    assert layers == [("errors", LAYER)]
    engine = CAMEngine(module.net, [LAYER], target=FalseNegatives(contrastive=True))
    images, masks = callback.probe.images, callback.probe.masks
    expected = sliding_window_cams(engine, images, 16, overlap=0.5, masks=masks).cams
    torch.testing.assert_close(missed, expected, atol=1e-5, rtol=0)
    assert expected.amax() == 1  # some class is missed somewhere: maps to compare
