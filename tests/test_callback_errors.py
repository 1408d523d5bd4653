"""GradCAMCallback(errors=True): missed-pixel grids and confusion shares, read back from
TensorBoard and compared with the engine and a direct count on the probe."""

import math

import pytest
import torch
from test_callback import make_run, read_events

import segcam_lightning.callbacks.gradcam as gradcam
from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.targets import FalseNegatives
from segcam_lightning.errors import ConfigurationError

LAYERS = ["e4.conv.conv.5", "d4.conv.conv.5"]
LAYER = LAYERS[-1]
NAMES = ("soil", "narrow_leaf", "round_leaf")


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """Two epochs with errors=True; the maps handed to the grids at each step."""
    drawn = []
    draw_grids = gradcam.draw_grids

    def keep(trainer, spec, shown, masks, preds, cams, labels):
        drawn.append((labels.layers, cams.clone()))
        return draw_grids(trainer, spec, shown, masks, preds, cams, labels)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(gradcam, "draw_grids", keep)
    try:
        probe = ProbeSpec(num_images=4)
        callback = GradCAMCallback(LAYERS, errors=True, strict=True, probe=probe)
        trainer, model, data = make_run(tmp_path_factory.mktemp("errors"), [callback])
        trainer.fit(model, datamodule=data)
    finally:
        monkeypatch.undo()
    return trainer, model, callback, drawn


def test_missed_pixel_grids_are_logged_beside_the_class_grids(watched):
    trainer, _, _, _ = watched
    events = read_events(trainer)
    steps = [s.step for s in events.Scalars("val/mIoU")]
    tags = set(events.Tags()["images"])
    shown = {f"cam/{layer}/{n}" for layer in LAYERS for n in NAMES}
    assert tags == shown | {f"cam/errors/{layer}/{n}" for layer in LAYERS for n in NAMES}
    for layer in LAYERS:
        for name in NAMES:
            assert [i.step for i in events.Images(f"cam/errors/{layer}/{name}")] == steps


def test_the_missed_maps_are_the_engines_false_negatives(watched):
    """The last step's maps (the final weights: validation runs after the last training batch)
    against a CAMEngine of our own with the contrastive FalseNegatives target; float32 maps of
    the same computation, to 1e-5 of each map's peak (1)."""
    _, model, callback, drawn = watched
    layers, cams = drawn[-1]
    assert layers == [("errors", layer) for layer in LAYERS]
    engine = CAMEngine(model.net, LAYERS, target=FalseNegatives(contrastive=True))
    expected = engine(callback.probe.images, masks=callback.probe.masks).cams
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=0)
    # Some class is missed and has a map (a head-path layer of a model this young may give
    # all-zero contrastive maps, its weights favouring the wrong class everywhere).
    assert (expected.flatten(3).amax(-1) > 0).any()


def test_confusion_shares_are_the_direct_counts(watched):
    trainer, model, callback, _ = watched
    images, masks = callback.probe.images, callback.probe.masks
    model.net.eval()
    with torch.no_grad():
        preds = model.net(images).argmax(1)
    events = read_events(trainer)
    last = events.Scalars("val/mIoU")[-1].step
    for t, true in enumerate(NAMES):
        total = int((masks == t).sum())
        for p, name in enumerate(NAMES):
            if p == t:
                continue
            values = events.Scalars(f"cam_errors/{true}_as_{name}")
            assert values[-1].step == last
            expected = int(((masks == t) & (preds == p)).sum()) / total
            assert math.isclose(values[-1].value, expected, abs_tol=1e-6)  # float32 in TB


def test_errors_need_the_probes_masks(tmp_path):
    callback = GradCAMCallback(
        [LAYER],
        errors=True,
        probe=ProbeSpec(num_images=2, batch_adapter=lambda batch: (batch["image"], None)),
    )
    trainer, model, data = make_run(tmp_path, [callback], max_epochs=1)
    with pytest.raises(ConfigurationError, match="`errors=True` reads each class's ground truth"):
        trainer.fit(model, datamodule=data)
