"""train.py / LightningCLI: both configs parse, and the default run writes logs and checkpoints."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segcam_lightning.cli import build_cli
from segcam_lightning.data import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_config_parses():
    cli = build_cli(["--config", str(ROOT / "configs/synthetic.yaml")], run=False)
    assert cli.datamodule.is_synthetic
    assert cli.model.hparams.num_classes == 3
    assert cli.model.hparams.class_names == ["soil", "narrow_leaf", "round_leaf"]
    assert cli.model.hparams.base_width == 16
    cli.model.trainer = cli.trainer
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.003
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == cli.trainer.max_epochs == 6


def test_blog_weeds_config_parses(tmp_path):
    write_synthetic_dataset(tmp_path / "weeds", num_samples=5, image_size=32)
    args = [
        "--config",
        str(ROOT / "configs/blog_weeds.yaml"),
        "--data.data",
        str(tmp_path / "weeds"),
    ]
    cli = build_cli(args, run=False)
    assert cli.model.hparams.base_width == 64
    assert cli.model.hparams.num_classes == 3
    assert cli.datamodule.hparams.batch_size == 16
    assert cli.datamodule.hparams.image_size == 256
    assert cli.datamodule.colormap == [(0, 0, 0), (0, 0, 128), (0, 128, 0)]
    cli.model.trainer = cli.trainer
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.0005)
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler["monitor"] == "val/loss"


def test_train_script_writes_tensorboard_logs_and_checkpoint(tmp_path, train_script):
    version = train_script(tmp_path, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1")
    checkpoints = sorted(p.name for p in (version / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2 and checkpoints[0].startswith("best-epoch="), checkpoints
    assert checkpoints[1] == "last.ckpt"
    events = EventAccumulator(str(version))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "val/mIoU" in scalars
    assert "train/loss" in scalars
    assert len(events.Scalars("val/mIoU")) == 2
    assert (version / "config.yaml").exists()


def test_multi_gpu_config_parses():
    # Instantiated on CPU here; on a cluster the same file runs DDP over every GPU of each node.
    args = ["--config", str(ROOT / "configs/multi_gpu.yaml"), "--trainer.accelerator=cpu"]
    cli = build_cli([*args, "--trainer.devices=2", "--trainer.precision=32-true"], run=False)
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    assert cli.trainer.num_devices == 2
    callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradCAMCallback"]
    assert callbacks[0].layers == ["d4.conv.conv.5", "b.conv.5", "e4.conv.conv.5"]


def test_synthetic_config_enables_the_cam_callback():
    cli = build_cli(["--config", str(ROOT / "configs/synthetic.yaml")], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradCAMCallback"]
    assert callback.layers == ["d4.conv.conv.5", "e4.conv.conv.5"]
    assert callback.every_n_epochs == 1


def test_shortcut_config_watches_e1_with_the_contrastive_target():
    """configs/shortcut.yaml: the planted-shortcut data and, besides the default callbacks, the
    shortcut watch benchmarks/quality/RESULTS.md measures (e1, logit_margin, thresholds at
    chance)."""
    cli = build_cli(["--config", str(ROOT / "configs/shortcut.yaml")], run=False)
    assert cli.datamodule.hparams.shortcut == "soil"
    callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradCAMCallback"]
    assert [c.layers for c in callbacks] == [
        ["d4.conv.conv.5", "e4.conv.conv.5"],
        ["d3.conv.conv.5"],
        ["e1.conv.conv.5"],
    ]
    assert (callbacks[-1].method, callbacks[-1].target) == ("gradcam", "logit_margin")
    monitors = [c for c in cli.trainer.callbacks if type(c).__name__ == "ShortcutMonitor"]
    assert [(m.maps, m.objects_alone) for m in monitors] == [
        (["d4.conv.conv.5", "e4.conv.conv.5", "d3.conv.conv.5"], True),
        (["e1.conv.conv.5"], False),
    ]
    assert (monitors[-1].energy, monitors[-1].reference, monitors[-1].warn) == (0.1, 0.4, True)


def test_settings_a_callback_rejects_are_one_line_and_exit_2(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/synthetic.yaml"),
        "--trainer.callbacks+=segcam_lightning.callbacks.GradCAMCallback",
        "--trainer.callbacks.layers=[]",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "error: segcam_lightning.callbacks.GradCAMCallback: Expected `layers` to be a non-empty"
        in err
    )
    assert "Traceback" not in err and "Union subtypes" not in err


def test_the_schedule_follows_max_epochs_and_model_lr_is_used(tmp_path, train_script):
    version = train_script(tmp_path, "--trainer.max_epochs=3", "--model.lr=0.01")
    events = EventAccumulator(str(version))
    events.Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.startswith("lr-")]
    rates = [v.value for v in events.Scalars(tag)]
    assert len(rates) == 3 and rates[0] == pytest.approx(0.01)
    assert rates[0] > rates[1] > rates[2] > 0  # cosine over exactly 3 epochs, no restart


def test_callback_help_by_short_name_and_override_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--trainer.callbacks.help", "GradCAMCallback"])
    assert exit_info.value.code == 0
    assert "--trainer.callbacks.method METHOD" in capsys.readouterr().out
    # The callback is the last one in the config, so `--trainer.callbacks.<arg>` reaches it.
    args = ["--config", str(ROOT / "configs/synthetic.yaml"), "--trainer.callbacks.method=layercam"]
    cli = build_cli(args, run=False)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradCAMCallback"]
    assert callback.method == "layercam"


def fit_edited_config(tmp_path, capsys, old: str, new: str) -> tuple[int, str]:
    """``train.py fit`` on configs/synthetic.yaml with ``old`` replaced by ``new``: the exit
    status and what it wrote to stderr."""
    config = (ROOT / "configs/synthetic.yaml").read_text()
    edited = config.replace(old, new)
    assert edited != config
    path = tmp_path / "edited.yaml"
    path.write_text(edited)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    return exit_info.value.code, capsys.readouterr().err


def test_a_moved_callback_setting_names_its_new_place(tmp_path, capsys):
    """A config of the earlier flat GradCAMCallback (``num_probe: 8``) fails in one line that
    says where the setting went, not with jsonargparse's list of errors."""
    code, err = fit_edited_config(
        tmp_path,
        capsys,
        "        probe:\n          num_images: 8\n        every_n_epochs",
        "        num_probe: 8\n        every_n_epochs",
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: GradCAMCallback `num_probe` has moved: pass probe=ProbeSpec(num_images=...) (in "
        "YAML, e.g. `probe: {num_images: 8}` under the callback's init_args; see "
        "docs/callback.md, 'Settings')."
    )


def test_a_new_style_config_with_a_typo_gets_jsonargparses_own_error(tmp_path, capsys):
    """Nested groups hold some of the earlier names (``readout: {threshold: ...}``): only a key
    jsonargparse refuses is reported as moved."""
    _, err = fit_edited_config(
        tmp_path,
        capsys,
        "        every_n_epochs: 1\nmodel",
        "        readout:\n          threshold: 0.3\n        every_n_epoch: 1\nmodel",
    )
    assert "has moved" not in err
    assert "every_n_epoch" in err
