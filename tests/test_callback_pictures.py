"""The callback's pictures are encoded and written off the training thread.

The worker changes no picture (the same bytes as drawn on the training thread), a failure in it
reaches the user, and Ctrl-C keeps every grid of the validations before it.
"""

import signal
import threading

import cv2
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback
from test_callback import make_run, read_events

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec, display, gradcam
from segcam_lightning.callbacks.worker import PictureWorker


def grids(events):
    return {
        (tag, image.step): image.encoded_image_string
        for tag in events.Tags()["images"]
        for image in events.Images(tag)
    }


def test_the_worker_changes_no_picture(tmp_path, monkeypatch):
    runs = {}
    for name in ("worker", "inline"):
        if name == "inline":  # every job run at once, on the training thread
            monkeypatch.setattr(PictureWorker, "submit", lambda self, job: job())
        callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=3))
        trainer, model, data = make_run(tmp_path / name, [callback], max_epochs=2)
        trainer.fit(model, datamodule=data)
        runs[name] = grids(read_events(trainer))
    assert len(runs["worker"]) == 3 * 2  # 3 classes at d4, 2 validations
    assert runs["worker"] == runs["inline"]


def test_the_grids_in_tensorboard_are_the_drawn_pixels_as_add_image_wrote_them(
    tmp_path, monkeypatch
):
    # The grids are PNG-encoded by the package (render.encode_png: faster settings than
    # TensorBoard's PIL encoder), so both must decode to the very pixels drawn.
    drawn = {}
    write = gradcam.write_images

    def keep(trainer, images, step, tensorboard):
        drawn.update({(("cam", *tag), step): image for tag, image in images})
        write(trainer, images, step, tensorboard)

    monkeypatch.setattr(gradcam, "write_images", keep)
    runs = {}
    for name in ("package", "add_image"):
        if name == "add_image":  # the writer's own add_image, as before the change
            monkeypatch.setattr(
                display,
                "add_png",
                lambda writer, tag, image, step: writer.add_image(
                    tag, image, global_step=step, dataformats="HWC"
                ),
            )
        callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=3))
        trainer, model, data = make_run(tmp_path / name, [callback], max_epochs=2)
        trainer.fit(model, datamodule=data)
        runs[name] = grids(read_events(trainer))
    assert runs["package"].keys() == runs["add_image"].keys() and len(runs["package"]) == 6
    for (tag, step), png in runs["package"].items():
        rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        before = runs["add_image"][tag, step]
        rgb_before = cv2.imdecode(np.frombuffer(before, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert np.array_equal(rgb, drawn[tuple(tag.split("/")), step])
        assert np.array_equal(rgb, rgb_before)  # the same grids in both runs


def test_a_failure_in_the_worker_reaches_the_user(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    # The runs log to TensorBoard only, whose images the worker writes.
    monkeypatch.setattr("segcam_lightning.callbacks.display.write_image", broken)
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path / "strict", [callback], max_epochs=2)
    with pytest.raises(RuntimeError, match=r"the picture worker failed: OSError\('disk full'\)"):
        trainer.fit(model, datamodule=data)
    # Without strict: one warning, with the worker's traceback, and training goes on.
    callback = GradCAMCallback(probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path / "lenient", [callback], max_epochs=3)
    with pytest.warns(UserWarning, match="GradCAMCallback failed at step") as record:
        trainer.fit(model, datamodule=data)
    failures = [w for w in record if "GradCAMCallback failed" in str(w.message)]
    assert len(failures) == 1 and "disk full" in str(failures[0].message)
    assert trainer.current_epoch == 3


class Interrupt(Callback):
    """Ctrl-C in the third epoch, after two validations."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_every_grid_logged_before_it(tmp_path):
    callback = GradCAMCallback(strict=True, probe=ProbeSpec(num_images=2))
    trainer, model, data = make_run(tmp_path, [callback, Interrupt()], max_epochs=4)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            trainer.fit(model, datamodule=data)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C on shutdown
    steps = {step for _, step in grids(read_events(trainer))}
    assert steps == {3, 7}  # both validations before the interrupt, every class


def test_the_worker_runs_jobs_in_order_waits_when_full_and_says_so_once():
    done, told = [], []
    release = threading.Event()
    worker = PictureWorker(max_pending=1, on_full=lambda: told.append(True))
    worker.submit(lambda: (release.wait(10), done.append(0)))
    threading.Timer(0.2, release.set).start()
    for i in range(1, 5):  # the queue holds one: the training thread waits, said once
        worker.submit(lambda i=i: done.append(i))
    worker.flush()
    worker.close()
    assert done == [0, 1, 2, 3, 4]
    assert told == [True]
