"""GradCAMCallback in real (tiny) training runs: what it logs, and that it changes nothing."""

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from segcam_lightning.callbacks import DisplaySpec, GradCAMCallback, ProbeSpec, ShortcutMonitor
from segcam_lightning.callbacks.gradcam import MOVED
from segcam_lightning.cam import Readout
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.module import SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("soil", "narrow_leaf", "round_leaf")
LAYERS = ("d4.conv.conv.5", "e4.conv.conv.5")
SIZE = 32


def make_run(tmp_path, callbacks=(), logger=True, seed=0, **trainer_kwargs):
    L.seed_everything(seed)
    data = SegmentationDataModule(image_size=SIZE, batch_size=4, num_train=16, num_val=8)
    model = SegmentationModule(num_classes=3, base_width=4, class_names=data.class_names)
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer = L.Trainer(**{**options, **trainer_kwargs})
    return trainer, model, data


def read_events(trainer):
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_fit_logs_a_grid_per_layer_and_class_at_every_epoch(tmp_path):
    callback = GradCAMCallback(layers=list(LAYERS), strict=True, probe=ProbeSpec(num_images=3))
    trainer, model, data = make_run(tmp_path, [callback], max_epochs=3)
    trainer.fit(model, datamodule=data)
    events = read_events(trainer)
    # 4 training batches per epoch; Lightning logs a validation's scalars at the index of the
    # epoch's last training batch, and the images go to the same step.
    steps = [s.step for s in events.Scalars("val/mIoU")]
    assert steps == [3, 7, 11]
    expected = {f"cam/{layer}/{name}" for layer in LAYERS for name in CLASSES}
    assert set(events.Tags()["images"]) == expected
    title = max(16, min(32, SIZE // 6))
    for tag in expected:
        images = events.Images(tag)
        assert [image.step for image in images] == steps
        decoded = cv2.imdecode(np.frombuffer(images[-1].encoded_image_string, np.uint8), 1)
        # rows: title, 3 probes and the colour key (a line or more: the three names do not
        # fit beside the colour bar of 32 px tiles), 4 px apart; columns: input, truth,
        # prediction, overlay.
        assert decoded.shape[1:] == (4 * SIZE + 3 * 4, 3)
        assert decoded.shape[0] >= title + 3 * SIZE + 3 * 4 + title
    for layer in LAYERS:
        for name in CLASSES:
            for kind in ("energy_inside", "pointing_game"):
                values = events.Scalars(f"cam_alignment/{layer}/{name}/{kind}")
                assert [v.step for v in values] == steps, (layer, name, kind)
                assert all(0.0 <= v.value <= 1.0 for v in values)


def test_training_is_bitwise_identical_with_and_without_callback(tmp_path):
    def train(callbacks, folder):
        trainer, model, data = make_run(tmp_path / folder, callbacks, max_epochs=3)
        trainer.fit(model, datamodule=data)
        return model, trainer.optimizers[0]

    plain_model, plain_opt = train([], "plain")
    callback = GradCAMCallback(layers=list(LAYERS), strict=True)
    cam_model, cam_opt = train([callback], "cam")
    assert callback.last_cams is not None
    plain_state, cam_state = plain_model.state_dict(), cam_model.state_dict()
    assert plain_state.keys() == cam_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(value, cam_state[key]), key
    plain_opt_state, cam_opt_state = plain_opt.state_dict(), cam_opt.state_dict()
    assert plain_opt_state["param_groups"] == cam_opt_state["param_groups"]
    assert plain_opt_state["state"].keys() == cam_opt_state["state"].keys()
    for index, state in plain_opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, cam_opt_state["state"][index][key]), (index, key)
    for param in cam_model.parameters():
        assert param.grad is None or torch.isfinite(param.grad).all()


def test_validate_in_inference_mode_logs_cams(tmp_path):
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback])  # Trainer(inference_mode=True)
    trainer.validate(model, datamodule=data, verbose=False)
    events = read_events(trainer)
    # The default layer is the last one before the output head.
    assert {f"cam/d4.conv.conv.5/{name}" for name in CLASSES} == set(events.Tags()["images"])
    assert not callback.probe.images.is_inference()


def test_bf16_mixed_precision(tmp_path):
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback], precision="bf16-mixed", max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert callback.last_cams.dtype == torch.float32
    assert torch.isfinite(callback.last_cams).all()
    assert len(read_events(trainer).Images(f"cam/d4.conv.conv.5/{CLASSES[1]}")) == 1


def failing_run(tmp_path, strict, monkeypatch):
    """A run whose CAM step fails at every validation end (after a successful setup)."""

    def fail(self, trainer, pl_module):
        raise RuntimeError("the CAM step broke")

    monkeypatch.setattr(GradCAMCallback, "log_cams", fail)
    return make_run(tmp_path, [GradCAMCallback(strict=strict)])


def test_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    trainer, model, data = failing_run(tmp_path, strict=False, monkeypatch=monkeypatch)
    with pytest.warns(UserWarning, match="GradCAMCallback failed at step 4") as record:
        trainer.fit(model, datamodule=data)
    assert sum("GradCAMCallback failed" in str(w.message) for w in record) == 1
    assert trainer.global_step == 8
    assert trainer.state.finished


def test_failure_raises_when_strict(tmp_path, monkeypatch):
    trainer, model, data = failing_run(tmp_path, strict=True, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="the CAM step broke"):
        trainer.fit(model, datamodule=data)


class UnusedLayer(nn.Module):
    """A layer that never runs in the forward."""

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    ("layer", "error", "match"),
    [
        ("unused", RuntimeError, "at setup: Layer\\(s\\) \\['unused'\\] did not run"),
        ("net.e1", ValueError, "at setup: Layer 'net.e1' \\(encoder_block\\) returned tuple"),
    ],
)
def test_layers_that_cannot_give_cams_fail_at_setup(tmp_path, layer, error, match):
    trainer, model, data = make_run(tmp_path, [GradCAMCallback(layers=[layer])])
    model.unused = UnusedLayer()
    with pytest.raises(error, match=match):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0


def test_wrong_layer_fails_at_setup_with_suggestions(tmp_path):
    trainer, model, data = make_run(tmp_path, [GradCAMCallback(layers=["d4.conv.conv.6"])])
    with pytest.raises(ValueError, match=r"Did you mean: .*'net.d4.conv.conv.5'"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0


def test_two_callbacks_on_one_layer_need_tags(tmp_path):
    """Without tags their scalars would share keys (Lightning averages them): refused at setup.
    With tags each logs under its own, and the PNG path of other loggers nests the tag."""
    twins = [
        GradCAMCallback(layers=[LAYERS[0]]),
        GradCAMCallback(layers=[LAYERS[0]], method="hirescam"),
    ]
    trainer, model, data = make_run(tmp_path / "untagged", twins)
    with pytest.raises(ValueError, match=r"two callbacks log layer\(s\) \['d4.conv.conv.5'\]"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0
    tagged = [
        GradCAMCallback(layers=[LAYERS[0]], strict=True, tag="grad", probe=ProbeSpec(num_images=2)),
        GradCAMCallback(
            layers=[LAYERS[0]],
            strict=True,
            method="hirescam",
            tag="hires",
            probe=ProbeSpec(num_images=2),
        ),
    ]
    trainer, model, data = make_run(tmp_path / "tagged", tagged, max_epochs=1)
    trainer.fit(model, datamodule=data)
    events = read_events(trainer)
    assert set(events.Tags()["images"]) == {
        f"cam/{tag}/{LAYERS[0]}/{name}" for tag in ("grad", "hires") for name in CLASSES
    }
    values = {
        tag: events.Scalars(f"cam_alignment/{tag}/{LAYERS[0]}/narrow_leaf/energy_inside")[-1]
        for tag in ("grad", "hires")
    }
    assert values["grad"].value != values["hires"].value  # two methods, two measurements
    assert tagged[0].state_key != tagged[1].state_key
    # Other loggers: the tag is one more folder.
    logger = CSVLogger(tmp_path, name="csv")
    callback = GradCAMCallback(strict=True, tag="grad", probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path / "csv", [callback], logger=logger, max_epochs=1)
    trainer.fit(model, datamodule=data)
    files = sorted(Path(logger.log_dir, "cam").rglob("*.png"))
    assert [str(p.relative_to(Path(logger.log_dir, "cam"))) for p in files] == [
        f"step_0000003/grad/d4.conv.conv.5/{name}.png" for name in sorted(CLASSES)
    ]


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_argument_names_say_where_they_went(name):
    with pytest.raises(TypeError, match=rf"GradCAMCallback\(`{name}`=...\) has moved: pass "):
        GradCAMCallback(**{name: 1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):
        GradCAMCallback(layer="d4")


def test_the_monitor_shares_the_probe_and_runs_the_objects_alone_test(tmp_path, caplog):
    """GradCAMCallback and ShortcutMonitor with default probes read one probe (the same
    object); the monitor logs ``cam_context/<class>/kept_alone``. The monitor runs the test
    alone too; two monitors running it are refused at setup."""
    callback = GradCAMCallback(layers=[LAYERS[0]], strict=True)
    monitor = ShortcutMonitor()
    trainer, model, data = make_run(tmp_path / "both", [callback, monitor], max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert monitor.probe is callback.probe
    tags = {t for t in read_events(trainer).Tags()["scalars"] if t.startswith("cam_context/")}
    # Logged for the classes the one-epoch model predicts on the probe.
    assert tags and tags <= {f"cam_context/{name}/kept_alone" for name in CLASSES}
    alone = ShortcutMonitor()
    trainer, model, data = make_run(tmp_path / "alone", [alone], max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert tags == {t for t in read_events(trainer).Tags()["scalars"] if "cam_context/" in t}
    twins = [ShortcutMonitor(), ShortcutMonitor(maps=False)]
    trainer, model, data = make_run(tmp_path / "twins", twins)
    with pytest.raises(ValueError, match="two monitors run the objects-alone test"):
        trainer.fit(model, datamodule=data)
    with pytest.raises(ValueError, match="Expected `maps` to be True, False or a list"):
        ShortcutMonitor(maps="d4")


def test_the_objects_alone_test_reads_the_cam_steps_logits_and_skips_the_background(
    tmp_path, monkeypatch
):
    """With a GradCAMCallback on the same probe, before or after it in the list, the test takes
    the CAM step's logits of the untouched images instead of a forward pass of its own, and
    runs no pass for the background (soil: most of every image), whose share it never logs:
    the shares are those of the monitor alone. When the CAM step fails, the test runs anyway."""
    from segcam_lightning.callbacks import shortcut

    untouched, tested = [], []
    eager, alone = shortcut.eager_logits, shortcut.objects_alone

    def counted_eager(*args, **kwargs):
        untouched.append(1)
        return eager(*args, **kwargs)

    def recorded_alone(model, images, masks, classes, **kwargs):
        tested.append(list(classes))
        return alone(model, images, masks, classes, **kwargs)

    monkeypatch.setattr(shortcut, "eager_logits", counted_eager)
    monkeypatch.setattr(shortcut, "objects_alone", recorded_alone)
    kept, passes = {}, {}
    for name in ("alone", "before", "after", "failing"):
        untouched.clear()
        monitor = ShortcutMonitor(probe=ProbeSpec(num_images=4))
        callback = GradCAMCallback(layers=[LAYERS[0]], probe=ProbeSpec(num_images=4))
        callbacks = {"alone": [monitor], "after": [callback, monitor]}.get(name)
        if name == "failing":
            monkeypatch.setattr(GradCAMCallback, "log_cams", lambda *a: 1 / 0)
        trainer, model, data = make_run(tmp_path / name, callbacks or [monitor, callback])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the failing step's warning
            trainer.fit(model, datamodule=data)
        kept[name], passes[name] = monitor.last_kept, len(untouched)
        logged = {t for t in read_events(trainer).Tags()["scalars"] if "cam_context/" in t}
        assert "cam_context/soil/kept_alone" not in logged
    # One pass at setup (reading the model), then one per validation when alone.
    assert passes == {"alone": 3, "before": 1, "after": 1, "failing": 3}
    # A CAM step every other epoch: the validations between read no earlier step's logits.
    monkeypatch.undo()
    monkeypatch.setattr(shortcut, "eager_logits", counted_eager)
    for name, every in (("alone3", None), ("every_other", 2)):
        untouched.clear()
        monitor = ShortcutMonitor(probe=ProbeSpec(num_images=4))
        callbacks = [monitor]
        if every:
            probe = ProbeSpec(num_images=4)
            callbacks.append(GradCAMCallback([LAYERS[0]], probe=probe, every_n_epochs=every))
        trainer, model, data = make_run(tmp_path / name, callbacks, max_epochs=3)
        trainer.fit(model, datamodule=data)
        kept[name], passes[name] = monitor.last_kept, len(untouched)
    assert passes["alone3"] == 4 and passes["every_other"] == 3  # the second epoch's came
    assert torch.equal(kept["every_other"].nan_to_num(-1), kept["alone3"].nan_to_num(-1))
    soil = CLASSES.index("soil")
    assert tested and all(soil not in classes for classes in tested)
    assert kept["alone"][:, soil].isnan().all() and not kept["alone"].isnan().all()
    for name in ("before", "after", "failing"):
        assert torch.equal(kept[name].isnan(), kept["alone"].isnan())
        assert torch.equal(kept[name].nan_to_num(-1), kept["alone"].nan_to_num(-1))


def test_a_callback_without_monitor_says_how_to_add_one(tmp_path, caplog):
    callback = GradCAMCallback(layers=[LAYERS[0]], strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback], max_epochs=2)
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        trainer.fit(model, datamodule=data)
    told = [r.getMessage() for r in caplog.records if "ShortcutMonitor" in r.getMessage()]
    assert told == [
        "GradCAMCallback: no ShortcutMonitor watches these maps; add `ShortcutMonitor()` "
        "(segcam_lightning.callbacks) to the Trainer's callbacks for the shortcut warnings "
        "(docs/callback.md)."
    ]


def test_no_logger_warns(tmp_path):
    trainer, model, data = make_run(tmp_path, [GradCAMCallback()], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(model, datamodule=data)


def test_other_loggers_get_png_files(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback], logger=logger)
    trainer.fit(model, datamodule=data)
    files = sorted(Path(logger.log_dir, "cam").rglob("*.png"))
    expected = [
        f"step_{step:07d}/d4.conv.conv.5/{name}.png" for step in (3, 7) for name in sorted(CLASSES)
    ]
    assert [str(p.relative_to(Path(logger.log_dir, "cam"))) for p in files] == expected


def checkpointed_run(tmp_path, num_probe=3):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=num_probe))
    trainer, model, data = make_run(
        tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=data)
    return first, tmp_path / "ckpt" / "last.ckpt"


def resume(tmp_path, callback, checkpoint, data_seed=0):
    # The checkpoint holds ModelCheckpoint's state too: the resumed run has one to give it to,
    # writing only last.ckpt (save_top_k=0) into the folder it resumes from.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer, model, data = make_run(
        tmp_path, [callback, saver], max_epochs=2, enable_checkpointing=True
    )
    data.hparams.seed = data_seed
    trainer.fit(model, datamodule=data, ckpt_path=checkpoint)


def test_resume_reads_the_same_probe_and_the_checkpoint_holds_no_tensors(tmp_path, recwarn):
    first, checkpoint = checkpointed_run(tmp_path)
    state = torch.load(checkpoint, weights_only=True)["callbacks"][first.state_key]
    assert set(state) == {"indices", "sha256", "settings"}
    assert state["indices"] == first.probe.indices.tolist()
    resumed = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=3))
    resume(tmp_path, resumed, checkpoint)
    assert torch.equal(resumed.probe.images, first.probe.images)
    assert not [w for w in recwarn if "GradCAMCallback" in str(w.message)]


def test_resume_with_other_probe_settings_says_which_probe_wins(tmp_path):
    first, checkpoint = checkpointed_run(tmp_path)
    old = first.probe.indices.tolist()
    resumed = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    indices = ", ".join(map(str, old))
    message = rf"This run's probe is used.*pass `probe=ProbeSpec\(indices=\[{indices}\]\)`"
    with pytest.warns(UserWarning, match=message):
        resume(tmp_path, resumed, checkpoint)
    assert len(resumed.probe.indices) == 2


def test_resume_warns_when_the_probe_images_changed(tmp_path):
    first, checkpoint = checkpointed_run(tmp_path)
    resumed = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=3))
    with pytest.warns(UserWarning, match="content hash differs"):
        resume(tmp_path, resumed, checkpoint, data_seed=7)  # another validation set
    assert torch.equal(resumed.probe.indices, first.probe.indices)


def test_probe_is_drawn_with_its_own_generator(tmp_path):
    expected = sorted(torch.randperm(8, generator=torch.Generator().manual_seed(3))[:4].tolist())
    for seed in (0, 1):  # the global seed does not matter
        callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=4, seed=3))
        trainer, model, data = make_run(tmp_path / str(seed), [callback], seed=seed, max_epochs=1)
        trainer.fit(model, datamodule=data)
        assert callback.probe.indices.tolist() == expected


def test_no_leaks_over_many_epochs(tmp_path):
    callback = GradCAMCallback(log_alignment=False, strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, datamodule=data)
    model.log = lambda *args, **kwargs: None  # outside a loop: the objects-alone scalars
    counts = []
    for _ in range(4):
        callback.log_cams(trainer, model)
        callback.flush_pictures()  # the grids are drawn on the picture worker
        counts.append(_live_tensors())
    assert counts[-1] == counts[1], counts
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    probe = callback.probe
    assert all(t.device.type == "cpu" for t in (probe.indices, probe.images, probe.masks))


def _live_tensors():
    gc.collect()
    # isinstance() on every live object also touches torch.distributed's deprecated `reduce_op`
    # alias, which warns when asked for its class.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "non-empty list of layer names"),
        ({"method": "gradcan"}, "`method` to be one of"),
        ({"method": "Grad-CAM++"}, None),  # the engine's aliases are accepted
        ({"target": "nope"}, "`target` to be one of"),
        ({"display": {"normalize": "max"}}, "`normalize` to be one of"),
        ({"display": {"colormap": "rainbowz"}}, "`colormap` to be one of"),
        ({"classes": [-1]}, "non-empty list of class indices"),
        ({"readout": {"kind": "softmax"}}, "`kind` to be one of"),
        ({"readout": {"threshold": 1.0}}, "`threshold` to be a float in \\(0, 1\\)"),
        ({"display": {"channel_order": "hsv"}}, "`channel_order` to be one of"),
        ({"probe": {"dataloader_idx": -1}}, "`dataloader_idx` to be a non-negative int"),
        ({"probe": {"indices": []}}, "non-empty list of validation-set indices"),
        ({"probe": {"num_images": 0}}, "`num_images` to be an int of at least 1"),
        ({"every_n_epochs": 0}, "`every_n_epochs` to be at least 1"),
        ({"display": {"alpha": 1.5}}, "`alpha` in \\[0, 1\\]"),
        ({"tag": "a/b"}, "`tag` to be None or a short name"),
        ({"tag": ""}, "`tag` to be None or a short name"),
    ],
)
def test_argument_errors(kwargs, match):
    groups = {"probe": ProbeSpec, "display": DisplaySpec, "readout": Readout}
    built = lambda: GradCAMCallback(  # noqa: E731  (the groups raise when they are built)
        **{k: groups[k](**v) if k in groups else v for k, v in kwargs.items()}
    )
    if match is None:
        built()
        return
    with pytest.raises(ValueError, match=match):
        built()
    with pytest.raises(TypeError, match="Expected `probe` to be a ProbeSpec or None"):
        GradCAMCallback(probe={"num_images": 2})


def test_classes_past_the_model_fail_at_setup(tmp_path):
    trainer, model, data = make_run(tmp_path, [GradCAMCallback(classes=[5])])
    with pytest.raises(ValueError, match="reach past the model's 3 output channel"):
        trainer.fit(model, datamodule=data)


def test_ddp_two_processes_match_one_process(tmp_path):
    script = ROOT / "tests" / "ddp_cam_run.py"
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        subprocess.run(
            [sys.executable, str(script), str(out), str(devices)],
            check=True,
            timeout=600,
            cwd=tmp_path,
            capture_output=True,
        )
        outputs[devices] = torch.load(out / "cams.pt", weights_only=True)
        events = EventAccumulator(str(out / "tb" / "version_0"), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            # Written once per logged step: validate() at step 0, then each of the 2 epochs.
            steps = [image.step for image in events.Images(tag)]
            assert len(steps) == len(set(steps)) == 3, (devices, tag, steps)
    one, two = outputs[1], outputs[2]
    assert torch.equal(one["images"], two["images"])
    assert torch.allclose(one["cams"], two["cams"], atol=1e-5)
    # The monitor's objects-alone test, sharded and gathered alike (lockstep forwards).
    assert torch.equal(one["tested"], two["tested"]) and one["tested"].numel() > 0
    assert torch.allclose(one["kept"], two["kept"], atol=1e-5, equal_nan=True)


def test_a_failing_objects_alone_test_is_reported_once_or_raised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the test broke")

    monkeypatch.setattr("segcam_lightning.callbacks.shortcut.objects_alone", broken)
    monitor = ShortcutMonitor(probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path / "lenient", [monitor], max_epochs=2)
    with pytest.warns(UserWarning, match="the objects-alone test failed at step") as record:
        trainer.fit(model, datamodule=data)
    assert len([w for w in record if "objects-alone test failed" in str(w.message)]) == 1
    assert trainer.current_epoch == 2
    strict = ShortcutMonitor(probe=ProbeSpec(num_images=2), strict=True)
    trainer, model, data = make_run(tmp_path / "strict", [strict], max_epochs=2)
    with pytest.raises(RuntimeError, match="the test broke"):
        trainer.fit(model, datamodule=data)
    # Waiting for a lenient GradCAMCallback's logits, the test fails as its own: raised when
    # strict, else its one warning and none of the callback's.
    for strict in (True, False):
        monitor = ShortcutMonitor(probe=ProbeSpec(num_images=2), strict=strict)
        callback = GradCAMCallback(layers=[LAYERS[0]], probe=ProbeSpec(num_images=2))
        trainer, model, data = make_run(tmp_path / f"waiting{strict}", [monitor, callback])
        if strict:
            with pytest.raises(RuntimeError, match="the test broke"):
                trainer.fit(model, datamodule=data)
            continue
        with pytest.warns(UserWarning) as record:
            trainer.fit(model, datamodule=data)
        messages = [str(w.message) for w in record]
        assert len([m for m in messages if "objects-alone test failed" in m]) == 1
        assert not [m for m in messages if "GradCAMCallback failed" in m]
