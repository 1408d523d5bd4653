"""The example project under examples/: it trains with the callback, and explain.py audits its
checkpoint through --module and its network's state dict through --model."""

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

import cv2
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segcam_lightning.audit import main

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
        root,
        max_epochs=1,
        limit_train_batches=3,
        image_size=32,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    return trainer


def test_example_trains_with_the_callback_and_tensorboard_shows_its_cams(trained):
    events = EventAccumulator(trained.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    # One sigmoid channel: the CAM of the foreground class, named by the datamodule.
    assert sorted(events.Tags()["images"]) == ["cam/down2/plant", "cam/fuse2/plant"]
    assert "cam_alignment/fuse2/plant/energy_inside" in events.Tags()["scalars"]
    assert (Path(trained.logger.log_dir) / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------- explain.py audits the example's own model

MODULE = "examples/binary_plants/project.py:PlantSegmenter"
MODEL = "examples/binary_plants/project.py:build_model"
NUM_IMAGES = 4


def explain(*args, out=None):
    """explain.py in this process, from the repository root (the specs are relative to it)."""
    extra = ["--out", str(out), "--quiet", "--num-workers", "0"] if out is not None else []
    return main([*map(str, args), *extra])


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def plants_data(project, tmp_path_factory):
    """write_data's folder in the blog's format: 32 px images, black/white binary masks."""
    root = tmp_path_factory.mktemp("plants_data") / "plants"
    return project.write_data(root, num=NUM_IMAGES, image_size=32)


@pytest.fixture(scope="module")
def last_ckpt(trained):
    return Path(trained.logger.log_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def net_weights(trained):
    """The bare state dict of the trained network (``self.model``) that train() saves."""
    path = Path(trained.logger.log_dir) / "plants_net.pt"
    network = trained.lightning_module.model
    assert torch.load(path, weights_only=True).keys() == network.state_dict().keys()
    return path


def read_rows(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_explain_audits_the_example_through_module_and_model_alike(
    project, trained, last_ckpt, net_weights, plants_data, tmp_path, at_root
):
    by_module, by_model = tmp_path / "module", tmp_path / "model"
    data = ["--data", plants_data, "--layers", "fuse2"]
    assert explain("--module", MODULE, "--checkpoint", last_ckpt, *data, out=by_module) == 0
    # The bare state dict carries no data module: size, normalisation and names are given.
    mean, std = project.IMAGENET_MEAN, project.IMAGENET_STD
    given = ["--size", 32, "--image-mean", *mean, "--image-std", *std, "--class-names", "soil"]
    args = ["--model", MODEL, "--checkpoint", net_weights, *data, *given, "plant"]
    assert explain(*args, out=by_model) == 0
    for out in (by_module, by_model):
        panels = sorted(p.name for p in (out / "gradcam" / "0").iterdir())
        assert panels == [f"{i:04d}.jpg" for i in range(NUM_IMAGES)]
        assert {"report.html", "summary.json", "metrics.csv"} <= {p.name for p in out.iterdir()}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["settings"]["output_kind"] == "binary"
        assert summary["checkpoints"][0]["input"].startswith("RGB, normalised: mean [0.485")
        rows = read_rows(out)
        # One class, the foreground, named by the data module's second class name.
        assert [(r["class"], r["class_name"]) for r in rows] == [("0", "plant")] * NUM_IMAGES
        assert all(r["energy_inside"] and r["pointing_game"] and r["iou"] for r in rows)
        assert "0: soil" in (out / "report.html").read_text(encoding="utf-8")
    # Same weights, same settings: the same CAMs, predictions and metrics.
    drop = ("checkpoint",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_rows(by_module)] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_rows(by_model)
    ]
    # The network was fed normalised images: its predicted area is the model's own.
    net = trained.lightning_module.model.eval()
    for row in read_rows(by_module):
        rgb = cv2.imread(str(plants_data / row["source"]))[..., ::-1].copy()
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255).sub(
            torch.tensor(mean).view(1, 3, 1, 1)
        ) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            area = (net(x) > 0).float().mean().item()
        assert float(row["pred_area"]) == pytest.approx(area, abs=1e-6)


def test_list_layers_for_the_module_and_the_factory(last_ckpt, net_weights, capsys, at_root):
    for args in (
        ["--module", MODULE, "--checkpoint", last_ckpt],
        ["--model", MODEL, "--checkpoint", net_weights, "--size", 32],
        ["--model", MODEL, "--checkpoint", last_ckpt],  # a Lightning .ckpt's 'model.' weights
    ):
        assert explain(*args, "--list-layers") == 0
        listing = capsys.readouterr().out
        assert "SmallSegNet by examples/binary_plants/project.py:" in listing
        assert "output shapes for a 1x3x32x32 input" in listing
        assert re.search(r"\n  fuse2 +Sequential +\[1, 16, 32, 32\]\n", listing), listing
        assert re.search(r"\n  fuse2\.2 +ReLU +\[1, 16, 32, 32\]  <- default\n", listing)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--module", "examples/binary_plants/project.py"], r"expected package\.module:Name or"),
        (["--module", "examples/binary_plants/nothing.py:X"], r"the file does not exist"),
        (
            ["--module", "examples/binary_plants/project.py:PlantSegmentor"],
            r"has no attribute 'PlantSegmentor' \(did you mean PlantSegmenter\?",
        ),
        (["--module", "no_such_package.models:Net"], r"no module named 'no_such_package'"),
        (["--module", MODEL], r"is the function build_model; expected a LightningModule subclass"),
        (["--model", MODULE], r"is a LightningModule; pass it as --module"),
        (
            ["--model", MODEL, "--model-kwargs", '{"depth": 3}'],
            r"calling it with depth=3 raised TypeError: .* It takes "
            r"build_model\(width: int = 16\); pass its arguments as --model-kwargs",
        ),
        (
            ["--model", MODEL, "--model-kwargs", '{"width": 8}'],
            r"does not hold the weights of the SmallSegNet that .*:build_model builds: of its 32 "
            r"tensors \(after removing the prefix 'model\.'\), 26 with other shapes \(\[stem\.0\."
            r"weight: expected \[8, 3, 3, 3\], found \[16, 3, 3, 3\]",
        ),
        (["--module", MODULE, "--model", MODEL], r"--module and --model are alternatives"),
    ],
)
def test_own_code_errors_are_one_line_and_exit_2(
    last_ckpt, plants_data, tmp_path, capsys, at_root, args, message
):
    out = tmp_path / "out"
    assert explain(*args, "--checkpoint", last_ckpt, "--data", plants_data, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_module_refuses_hyperparameters_that_name_code(last_ckpt, tmp_path, capsys, at_root):
    sys.modules.pop("this", None)  # `import this` prints the Zen of Python once per process
    content = torch.load(last_ckpt, weights_only=True)
    content["hyper_parameters"]["extra"] = {"class_path": "this.Nothing"}
    torch.save(content, tmp_path / "named.ckpt")
    list_layers = ["--module", MODULE, "--list-layers", "--checkpoint"]
    assert explain(*list_layers, tmp_path / "named.ckpt") == 2
    err = capsys.readouterr().err
    assert "name code to import or instantiate ([extra: a dict naming the class 'this" in err, err
    assert "this" not in sys.modules
    # A state dict is not a Lightning checkpoint: --model is the way.
    torch.save(content["state_dict"], tmp_path / "weights.pt")
    assert explain(*list_layers, tmp_path / "weights.pt") == 2
    assert "Pass --model pkg.mod:factory" in capsys.readouterr().err
