"""train.py's hardening: a checkpoint never makes it import code, and this package's
configuration errors are one line with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.cli import SegCamCLI, _is_own_class
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.module import SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
# A module that leaves a file behind when it is imported: the proof that it ran.
TELLTALE = """
from pathlib import Path

import torch

Path(__file__).with_name("IMPORTED").write_text("imported")


class Thing(torch.nn.Conv2d):
    def __init__(self):
        super().__init__(3, 3, 1)
"""
TINY = [
    "--config",
    str(ROOT / "configs/synthetic.yaml"),
    "--data.image_size=32",
    "--data.num_train=4",
    "--data.num_val=2",
    "--data.num_test=2",
    "--model.base_width=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
]


class _Parsed(Exception):
    """Raised where LightningCLI would instantiate: the test reads the merged config."""


class _ParseOnly(SegCamCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(args: list[str]):
    """The config ``train.py`` would instantiate from ``args``, nothing instantiated or run."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # as build_cli: the test runner's are not read
    try:
        with pytest.raises(_Parsed) as parsed:
            _ParseOnly(SegmentationModule, SegmentationDataModule, args=args)
    finally:
        sys.argv = argv
    return parsed.value.args[0]


def telltale(tmp_path: Path, name: str) -> Path:
    """Write module ``name`` into ``tmp_path``; returns the file its import would write."""
    (tmp_path / f"{name}.py").write_text(TELLTALE)
    return tmp_path / "IMPORTED"


def checkpoint(tmp_path: Path, hparams: dict) -> Path:
    path = tmp_path / "given.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, path)
    return path


@pytest.mark.parametrize(
    "hparams",
    [
        {"num_classes": 3, "net": {"class_path": "{name}.Thing"}},
        {"num_classes": 3, "net": "{name}.Thing"},  # jsonargparse's shorthand for a class path
        {
            "net": {
                "class_path": "segcam_lightning.module.SegmentationModule",
                "init_args": {"net": "{name}.Thing"},
            }
        },
        {"_class_path": "{name}.Thing", "num_classes": 3},
    ],
    ids=["class_path", "shorthand", "nested", "model_class_path"],
)
def test_a_checkpoint_naming_a_foreign_class_is_refused_before_import(
    tmp_path, monkeypatch, request, hparams
):
    name = f"telltale_{request.node.callspec.id}"
    marker = telltale(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    filled = eval(repr(hparams).replace("{name}", name))  # the module's name in every string
    ckpt = checkpoint(tmp_path, filled)
    with pytest.raises(ConfigurationError, match=rf"--ckpt_path .*{name}\.Thing"):
        parse(["fit", *TINY, f"--ckpt_path={ckpt}"])
    assert not marker.exists() and name not in sys.modules


def test_train_script_refuses_it_in_one_line_with_exit_2(tmp_path):
    marker = telltale(tmp_path, "telltale_script")
    ckpt = checkpoint(tmp_path, {"num_classes": 3, "net": {"class_path": "telltale_script.Thing"}})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("SEGCAM_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *TINY, f"--ckpt_path={ckpt}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert not marker.exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("train.py: error: --ckpt_path ")
    assert "--model.net=telltale_script.Thing" in line  # how to allow it


def test_a_class_named_on_the_command_line_is_allowed(tmp_path, monkeypatch):
    marker = telltale(tmp_path, "telltale_named")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = checkpoint(tmp_path, {"num_classes": 3, "net": {"class_path": "telltale_named.Thing"}})
    config = parse(["fit", *TINY, "--model.net=telltale_named.Thing", f"--ckpt_path={ckpt}"])
    assert config.fit.model.net.class_path == "telltale_named.Thing"
    assert marker.exists()  # the user named it: imported as any class on the command line


def test_a_checkpoints_own_settings_still_apply(tmp_path):
    hparams = {
        "base_width": 4,
        "lr": 0.02,
        "class_names": ["a.b", "c", "d"],  # a dotted class name is a plain string
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "_class_path": "segcam_lightning.module.SegmentationModule",
    }
    config = parse(["fit", *TINY, f"--ckpt_path={checkpoint(tmp_path, hparams)}"])
    assert (config.fit.model.base_width, config.fit.model.lr) == (4, 0.02)
    assert list(config.fit.model.class_names) == ["a.b", "c", "d"]


class _Pickled:
    pass


def test_a_checkpoint_weights_only_refuses_is_one_configuration_error(tmp_path):
    ckpt = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": _Pickled()}}, ckpt)
    with pytest.raises(ConfigurationError, match=r"weights_only=True\) refuses .*_Pickled"):
        parse(["fit", *TINY, f"--ckpt_path={ckpt}"])
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigurationError, match="could not be read as a checkpoint"):
        parse(["fit", *TINY, f"--ckpt_path={tmp_path / 'garbage.ckpt'}"])


def test_own_classes_are_this_packages_classes_only():
    assert _is_own_class("segcam_lightning.module.SegmentationModule")
    assert _is_own_class("segcam_lightning.callbacks.gradcam.GradCAMCallback")
    assert not _is_own_class("segcam_lightning.callbacks.gradcam.Tensor")  # torch's, imported there
    assert not _is_own_class("segcam_lightning.no_such_module.Thing")
    assert not _is_own_class("segcam_lightning.callbacks.gradcam.os.system")
    assert not _is_own_class("segcam_lightning_evil.Thing")


def run_train(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SEGCAM_DEBUG"}
    if debug:
        env["SEGCAM_DEBUG"] = "1"
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *TINY, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_a_bad_layer_is_one_line_and_exit_2_and_a_traceback_with_segcam_debug(tmp_path):
    done = run_train(tmp_path, "--trainer.callbacks.layers=[nope]", "--trainer.logger=false")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("train.py: error: GradCAMCallback: No layer named 'nope'")
    debug = run_train(
        tmp_path, "--trainer.callbacks.layers=[nope]", "--trainer.logger=false", debug=True
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "ConfigurationError: GradCAMCallback: No layer named 'nope'" in debug.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    (tmp_path / "buggy.py").write_text(
        "from segcam_lightning.module import SegmentationModule\n\n\n"
        "class Buggy(SegmentationModule):\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        raise ValueError('a bug, not a setting')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("SEGCAM_DEBUG", None)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from segcam_lightning.cli import main; from buggy import Buggy;"
        " import segcam_lightning.cli as c; c.SegmentationModule = Buggy; main()",
        "fit",
        *TINY,
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: a bug, not a setting" in done.stderr


class _ProbeData(L.LightningDataModule):
    """Images 32², masks 16²: masks of another size than their images."""

    def val_dataloader(self):
        images, masks = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 16, 16))
        return DataLoader(TensorDataset(images, masks), batch_size=2)


def test_probe_masks_of_another_size_than_the_images_are_refused_at_setup(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[GradCAMCallback(probe=ProbeSpec(num_images=2))],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ConfigurationError, match=r"masks are \[16, 16\] but its images \[32, 32\]"):
        trainer.validate(SegmentationModule(base_width=4), datamodule=_ProbeData())
