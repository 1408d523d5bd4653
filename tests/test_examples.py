"""The example project under examples/: it trains with the callback, and explain.py audits it."""

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "examples" / "binary_plants" / "project.py"


@pytest.fixture(scope="module")
def project():
    spec = importlib.util.spec_from_file_location("binary_plants_project", PROJECT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    root = tmp_path_factory.mktemp("plants")
    trainer = project.train(
        root, max_epochs=1, limit_train_batches=3, image_size=32, accelerator="cpu"
    )
    return trainer


def test_example_trains_with_the_callback_and_tensorboard_shows_its_cams(trained):
    events = EventAccumulator(trained.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    # One sigmoid channel: the CAM of the foreground class, named by the datamodule.
    assert sorted(events.Tags()["images"]) == ["cam/down2/plant", "cam/fuse2/plant"]
    assert "cam_alignment/fuse2/plant/energy_inside" in events.Tags()["scalars"]
    assert (Path(trained.logger.log_dir) / "checkpoints" / "last.ckpt").is_file()
