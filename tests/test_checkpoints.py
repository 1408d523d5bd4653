"""Checkpoint loading is safe and fails clearly: nothing in a file picks what is imported,
every unreadable file is a one-line CheckpointError, non-finite weights are refused, and the
advice for pickled objects fits what the file holds."""

import random
import re
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from segcam_lightning.audit import main
from segcam_lightning.loading import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_lightning_module,
    load_network_weights,
)
from segcam_lightning.models import UNet

CLI_MARKER = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(3, base_width=2)


def save_lightning(path, model, **hyper_parameters):
    """A Lightning-layout checkpoint of ``model`` (weights under ``net.``) with these hparams."""
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "pytorch-lightning_version": "2.6.0",
            "epoch": 4,
            "hyper_parameters": hyper_parameters,
            "datamodule_hyper_parameters": {"image_size": 32, "channel_order": "rgb", **CLI_MARKER},
        },
        path,
    )
    return path


def explain(*args, out):
    """explain.py in this process; returns the exit status."""
    return main([*map(str, args), "--out", str(out), "--quiet", "--num-workers", "0"])


def assert_one_line_error(stderr, pattern=""):
    assert stderr.startswith("explain.py: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    if pattern:
        assert pattern in stderr, stderr


# ------------------------------------------------------------- 1: hyperparameters import nothing


def test_hyperparameters_naming_a_class_are_refused_and_never_imported(net, tmp_path, capsys):
    sys.modules.pop("this", None)  # `import this` prints the Zen of Python once per process
    evil = save_lightning(
        tmp_path / "evil.ckpt", net, num_classes=3, net={"class_path": "this.Nothing"}, **CLI_MARKER
    )
    with pytest.raises(CheckpointError, match=r"net: a dict naming the class 'this\.Nothing'"):
        load_checkpoint(evil)
    out = tmp_path / "out"
    assert explain("--checkpoint", evil, "--data", "synthetic", out=out) == 2
    assert_one_line_error(capsys.readouterr().err, "--trust-checkpoint")
    assert "this" not in sys.modules
    assert not out.exists()


@pytest.mark.parametrize(
    ("hparams", "found"),
    [
        ({"_class_path": "os.system"}, "_class_path: 'os.system' (names code to run)"),
        ({"_instantiator": "builtins.exec"}, "_instantiator: 'builtins.exec' (names code to run)"),
        ({"base_width": "2"}, "base_width: '2', expected an integer >= 1"),
        ({"class_names": [1, 2, 3]}, "class_names: a list, expected a list of strings"),
        ({"loss": {"class_path": "os.system"}}, "loss: a dict naming the class 'os.system'"),
        ({"extra": [{"class_path": "x.Y"}]}, "extra: a list, not plain data"),
    ],
)
def test_hyperparameters_that_are_not_plain_values_are_refused(net, tmp_path, hparams, found):
    path = save_lightning(tmp_path / "odd.ckpt", net, num_classes=3, **hparams)
    with pytest.raises(CheckpointError, match="Refusing to rebuild") as caught:
        load_checkpoint(path)
    assert found in str(caught.value)


def test_plain_lightning_checkpoint_is_rebuilt_from_its_values(net, tmp_path):
    names = ["soil", "narrow_leaf", "round_leaf"]
    path = save_lightning(
        tmp_path / "ok.ckpt",
        net,
        num_classes=3,
        base_width=2,
        class_names=names,
        optimizer="sgd",  # settings the network does not need are plain data, ignored
        momentum=0.9,
        ignore_index=None,
        **CLI_MARKER,
    )
    loaded = load_checkpoint(path)
    assert (loaded.layout, loaded.num_classes, loaded.base_width) == ("lightning", 3, 2)
    assert loaded.class_names == tuple(names) and loaded.image_size == (32, 32)
    assert loaded.epoch == 4 and not loaded.trusted
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    wrong = save_lightning(tmp_path / "wrong.ckpt", net, num_classes=4)
    with pytest.raises(CheckpointError, match=r"num_classes=4 but the weights have 3"):
        load_checkpoint(wrong)


def test_trust_checkpoint_rebuilds_with_lightning(tmp_path):
    from segcam_lightning.module import SegmentationModule

    module = SegmentationModule(num_classes=3, base_width=2)
    path = tmp_path / "module.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": dict(module.hparams),
        },
        path,
    )
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded = load_checkpoint(path, trust=True)
    assert loaded.trusted and loaded.net is not module.net and loaded.base_width == 2


# ------------------------------------------------------------- 2: unreadable files


@pytest.mark.parametrize("text", ["hello\n", "abc", "ttt", ".x", "Jx", "Qx", "Rx", "ux"])
def test_text_files_are_unreadable_checkpoints(tmp_path, text):
    path = tmp_path / "t.pth"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=r"Could not read .*t\.pth as a PyTorch checkpoint"):
        load_checkpoint(path)


def flipped(raw, seed, within, flips=3):
    """``raw`` with ``flips`` random bits flipped among its first ``within`` bytes."""
    rng = random.Random(seed)
    data = bytearray(raw)
    for _ in range(flips):
        data[rng.randrange(min(within, len(data)))] ^= 1 << rng.randrange(8)
    return bytes(data)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_byte_flipped_checkpoints_load_or_fail_with_checkpoint_error(net, tmp_path, legacy):
    path = tmp_path / "model.pth"
    state = {"epoch": 1, "model_state_dict": net.state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    outcomes = []
    for seed in range(40):
        path.write_bytes(flipped(raw, seed, within=len(raw)))
        try:
            load_checkpoint(path)
            outcomes.append("loaded")
        except CheckpointError as error:
            assert "\n" not in str(error)
            outcomes.append("refused")
    assert "refused" in outcomes  # any other exception type fails the test


def test_unreadable_checkpoints_exit_2_with_one_line(net, tmp_path, capsys):
    (tmp_path / "hello.pth").write_text("hello\n")
    for legacy in (True, False):
        path = tmp_path / f"legacy-{legacy}.pth"
        torch.save(
            {"model_state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=not legacy
        )
        path.write_bytes(flipped(path.read_bytes(), seed=1, within=3000))  # the pickle's bytes
    for name in ("hello.pth", "legacy-True.pth", "legacy-False.pth"):
        out = tmp_path / "out"
        assert explain("--checkpoint", tmp_path / name, "--data", "synthetic", out=out) == 2
        assert_one_line_error(capsys.readouterr().err, "as a PyTorch checkpoint")
        assert not out.exists()


# ------------------------------------------------------------- 4: non-finite weights


def test_non_finite_weights_are_refused_naming_the_tensors(net, tmp_path, capsys):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["d4.conv.conv.0.weight"][0, 0, 0, 0] = float("nan")
    state["outputs.bias"][1] = float("inf")
    torch.save({"model_state_dict": state}, tmp_path / "diverged.pth")
    pattern = (
        r"non-finite weights \(NaN or inf\) in 2 of \d+ tensors: "
        r"\[d4\.conv\.conv\.0\.weight \(1 of 72 values\), outputs\.bias \(1 of 3 values\)\]"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(tmp_path / "diverged.pth")
    out = tmp_path / "out"
    assert explain("--checkpoint", tmp_path / "diverged.pth", "--data", "synthetic", out=out) == 2
    assert_one_line_error(capsys.readouterr().err, "non-finite weights")
    assert not out.exists()  # refused before anything is written


# ------------------------------------------------------------- 10: advice that fits the file


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_whole_pickled_module_is_told_to_save_its_state_dict(net, tmp_path, legacy):
    torch.save(net, tmp_path / "whole.pth", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(tmp_path / "whole.pth")
    message = str(caught.value)
    assert "whole pickled object" in message
    assert "torch.save(model.state_dict(), 'clean.pth')" in message
    assert "['model_state_dict']" not in message


def test_dict_with_unsafe_values_is_told_to_save_the_weights_key(net, tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"model_state_dict": net.state_dict(), "loss": np.float64(0.25)}, path)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "it holds a dict" in message and "['model_state_dict'], 'clean.pth')" in message
    assert "model.state_dict()" not in message


# ------------------------------------------------------------- 4: the caller's own code


class TinyModule(L.LightningModule):
    """A caller's LightningModule: the network in ``self.net``, no forward."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 1))


def save_tiny(path, **hyper_parameters):
    module = TinyModule()
    hparams = {"classes": 2, **hyper_parameters}
    state = {"state_dict": module.state_dict(), "hyper_parameters": hparams, "epoch": 1}
    torch.save({**state, "pytorch-lightning_version": "2.6.6"}, path)
    return path, module


def test_own_module_is_rebuilt_by_the_named_class(tmp_path):
    cli = {**CLI_MARKER, "_class_path": f"{__name__}.TinyModule"}
    path, module = save_tiny(tmp_path / "tiny.ckpt", **cli)
    loaded = load_lightning_module(path, TinyModule, code="tests:TinyModule", size=(8, 8))
    assert loaded.net is not module.net and isinstance(loaded.net, nn.Sequential)
    assert (loaded.num_classes, loaded.in_channels, loaded.epoch) == (2, 3, 1)
    assert loaded.code == "tests:TinyModule" and loaded.layer_prefix == ""
    assert "Sequential by tests:TinyModule, 2 output channels" in loaded.describe()
    for key, value in module.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("hparams", "found"),
    [
        ({"_class_path": "other.module.Evil"}, "_class_path: 'other.module.Evil', another class"),
        ({"_instantiator": "os.system"}, "_instantiator: 'os.system' (names code to run)"),
        ({"layers": [{"class_path": "this.Nothing"}]}, "layers: a list (names a class)"),
    ],
)
def test_own_module_hyperparameters_naming_code_are_refused(tmp_path, hparams, found):
    path, _ = save_tiny(tmp_path / "tiny.ckpt", **hparams)
    with pytest.raises(CheckpointError, match=re.escape(found)):
        load_lightning_module(path, TinyModule, size=(8, 8))


def test_own_network_weights_load_under_any_prefix_and_mismatches_are_listed(tmp_path):
    torch.manual_seed(0)
    net = TinyModule().net
    nested = {f"model._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": {**nested, "loss.weight": torch.ones(2)}, "epoch": 2,
                "hyper_parameters": {}}, tmp_path / "nested.ckpt")  # fmt: skip
    fresh = TinyModule().net
    loaded = load_network_weights(tmp_path / "nested.ckpt", fresh, size=(8, 8))
    assert loaded.net is fresh and loaded.layout == "lightning" and loaded.epoch == 2
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    state = {**net.state_dict(), "extra.weight": torch.ones(1)}
    del state["0.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"1 missing \(\[0\.bias\]\); 1 unexpected \(\[extra"):
        load_network_weights(tmp_path / "bad.pt", TinyModule().net, code="f:build", size=(8, 8))
