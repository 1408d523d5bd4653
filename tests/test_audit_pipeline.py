"""explain.py through the user's own pipeline: ``--config`` (a LightningCLI run's config.yaml),
``--module`` with ``--datamodule``, the audit's own YAML settings, and the folder reader's
warnings for what it has to assume.

The user project is ``examples/binary_plants/project.py`` (ImageNet normalisation, float
``[B, 1, H, W]`` masks, the network in ``self.model``), trained here at a size other than its
default (48 px instead of 64) through LightningCLI, which saves the run's config.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from segcam_lightning.audit import main
from segcam_lightning.audit.cli import build_parser, settings_from_args

PROJECT = Path(__file__).resolve().parents[1] / "examples" / "binary_plants"
SIZE = 48
NUM_VAL = 12


@pytest.fixture(scope="module")
def project():
    sys.path.insert(0, str(PROJECT))
    try:
        import project as module  # examples/binary_plants/project.py

        yield module
    finally:
        sys.path.remove(str(PROJECT))


@pytest.fixture(scope="module")
def plants_run(project, tmp_path_factory):
    """A LightningCLI run of the plants project (subclass mode: the config names its classes):
    ``(run folder, checkpoint, the validation IoU Trainer.validate reports for it)``."""
    root = tmp_path_factory.mktemp("plants_run")
    torch.manual_seed(0)
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        cli = LightningCLI(
            args=[
                "fit",
                "--model=project.PlantSegmenter",
                "--model.width=8",
                "--data=project.PlantsData",
                f"--data.image_size={SIZE}",
                "--data.num_train=32",
                f"--data.num_val={NUM_VAL}",
                "--data.batch_size=4",
                "--trainer.max_epochs=2",
                "--trainer.limit_train_batches=6",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.accelerator=cpu",
                f"--trainer.default_root_dir={root}",
                "--seed_everything=0",
            ],
            subclass_mode_model=True,
            subclass_mode_data=True,
        )
    finally:
        sys.argv = argv
    run = Path(cli.trainer.log_dir)
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return run, checkpoint, metrics["val/iou"]


def audit(*args, out):
    return main([*map(str, args), "--out", str(out), "--quiet", "--num-workers", "0"])


def test_config_audit_reads_the_run_pipeline(plants_run, tmp_path, capsys):
    """Nothing to guess: the run's config.yaml and its checkpoint. The report's IoU for the
    plants equals Trainer.validate's on the same split: the audit sees the images the
    validation sees (ImageNet-normalised, 48 px) and pools intersections and unions as
    torchmetrics does. Tolerance 1e-6: the audit recovers each image's intersection from
    float32 area shares and IoU (relative error a few float32 ulps, ~2e-7), and a ratio of
    sums of such terms keeps that relative error."""
    run, checkpoint, validated = plants_run
    out = tmp_path / "audit"
    assert audit("--config", run / "config.yaml", "--checkpoint", checkpoint, out=out) == 0
    err = capsys.readouterr().err
    assert "assumed" not in err  # the pipeline is the user's: nothing was guessed
    assert "layer fuse2.2: the default" in err  # the last block before the head, named once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["processed"] == NUM_VAL
    (row,) = [m for m in summary["means"] if m["class_name"] == "plant"]
    assert row["dataset_iou"] == pytest.approx(validated, abs=1e-6)
    (model,) = summary["checkpoints"]
    assert "as the data module gives it" in model["input"]
    report = (out / "report.html").read_text()
    assert "IoU over the data" in report and "fuse2.2" in report


def test_module_and_datamodule_read_the_saved_data_values(plants_run, tmp_path, capsys):
    """Without the config: the classes named on the command line, the data module built from
    the checkpoint's datamodule_hyper_parameters (plain values), one value overridden."""
    _, checkpoint, validated = plants_run
    out = tmp_path / "audit"
    args = [
        "--module",
        PROJECT / "project.py:PlantSegmenter",
        "--datamodule",
        PROJECT / "project.py:PlantsData",
        "--datamodule-kwargs",
        '{"batch_size": 3}',
        "--checkpoint",
        checkpoint,
    ]
    assert audit(*args, out=out) == 0
    err = capsys.readouterr().err
    assert "built with the values saved in" in err and "image_size" in err
    summary = json.loads((out / "summary.json").read_text())
    (row,) = [m for m in summary["means"] if m["class_name"] == "plant"]
    assert summary["counts"]["processed"] == NUM_VAL
    assert row["dataset_iou"] == pytest.approx(validated, abs=1e-6)


def test_folder_audit_warns_once_per_assumed_setting(project, plants_run, tmp_path, capsys):
    """The folder reader with the network alone (a state dict): size, normalisation and
    channel order are assumed, each said once with its option, and listed in the report."""
    _, checkpoint, _ = plants_run
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    weights = tmp_path / "net.pt"
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, weights)
    data = project.write_data(tmp_path / "data", num=4, image_size=SIZE)
    out = tmp_path / "audit"
    args = ["--model", f"{PROJECT / 'project.py'}:build_model", "--model-kwargs", '{"width": 8}']
    assert audit(*args, "--checkpoint", weights, "--data", data, out=out) == 0
    lines = capsys.readouterr().err.splitlines()
    for option in ("--size", "--image-mean and --image-std", "--channel-order"):
        assert sum(line.endswith(f"pass {option}") for line in lines) == 1, lines
    report = (out / "report.html").read_text()
    assert "assumed no normalisation" in report
    # Given the settings, nothing is assumed.
    out2 = tmp_path / "audit2"
    given = ["--size", SIZE, "--channel-order", "rgb", "--image-mean", "0.485", "0.456", "0.406"]
    given += ["--image-std", "0.229", "0.224", "0.225"]
    assert audit(*args, "--checkpoint", weights, "--data", data, *given, out=out2) == 0
    assert "assumed" not in capsys.readouterr().err


def test_a_config_beside_the_checkpoint_is_named_not_read(project, plants_run, tmp_path, capsys):
    run, checkpoint, _ = plants_run
    data = project.write_data(tmp_path / "data", num=2, image_size=SIZE)
    out = tmp_path / "audit"
    args = ["--module", PROJECT / "project.py:PlantSegmenter", "--checkpoint", checkpoint]
    assert audit(*args, "--data", data, out=out) == 0
    err = capsys.readouterr().err
    assert f"pass --config {run / 'config.yaml'}" in err


def test_pipeline_usage_errors_are_one_line(plants_run, tmp_path, capsys):
    run, checkpoint, _ = plants_run
    config = run / "config.yaml"
    cases = [
        (["--config", config, "--data", "synthetic"], "both say which images"),
        (["--config", config, "--size", 64], "--size: the data module reads"),
        (["--config", config, "--split", "test"], "has no test_dataloader"),
        (["--datamodule", PROJECT / "project.py:PlantsData"], "needs --module"),
    ]
    for args, message in cases:
        assert audit(*args, "--checkpoint", checkpoint, out=tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
        assert message in err, err
        assert not (tmp_path / "o").exists()


# Every option explain.py had before it moved to jsonargparse, with a value and the setting it
# gives: each keeps its meaning.
TODAY = [
    (["--module", "m.py:C"], "module", "m.py:C"),
    (["--model", "m.py:f"], "model", "m.py:f"),
    (["--model-kwargs", '{"width": 16}'], "model_kwargs", {"width": 16}),
    (["--data", "synthetic"], "data", "synthetic"),
    (["--limit", "5"], "limit", 5),
    (["--layers", "a", "b"], "layers", ("a", "b")),
    (["--method", "layercam"], "method", "layercam"),
    (["--target", "logit_region"], "target", "logit_region"),
    (["--normalize", "global"], "normalize", "global"),
    (["--output-kind", "binary"], "output_kind", "binary"),
    (["--threshold", "0.3"], "threshold", 0.3),
    (["--classes", "1", "2"], "classes", (1, 2)),
    (["--num-classes", "3"], "num_classes", 3),
    (["--colormap", "[[0,0,0],[0,0,128]]"], "colormap", ((0, 0, 0), (0, 0, 128))),
    (["--class-names", "soil", "plant"], "class_names", ("soil", "plant")),
    (["--size", "64"], "size", 64),
    (["--intensity-range", "-1000", "400"], "intensity_range", (-1000.0, 400.0)),
    (["--channel-order", "bgr"], "channel_order", "bgr"),
    (["--image-mean", "0.5"], "image_mean", (0.5,)),
    (["--image-std", "0.2", "0.3", "0.4"], "image_std", (0.2, 0.3, 0.4)),
    (["--in-channels", "1"], "in_channels", 1),
    (["--trust-checkpoint"], "trust_checkpoint", True),
    (["--batch-size", "4"], "batch_size", 4),
    (["--num-workers", "0"], "num_workers", 0),
    (["--device", "cpu"], "device", "cpu"),
    (["--devices", "2"], "devices", 2),
    (["--num-nodes", "2"], "num_nodes", 2),
    (["--strategy", "ddp"], "strategy", "ddp"),
    (["--render-threads", "3"], "render_threads", 3),
    (["--quiet"], "progress", False),
    (["--sanity-check"], "sanity_check", True),
    (["--sanity-images", "4"], "sanity_images", 4),
    (["--sanity-seeds", "2"], "sanity_seeds", 2),
    (["--sanity-methods", "all"], "sanity_methods", ("all",)),
    (["--faithfulness"], "faithfulness", True),
    (["--faithfulness-fill", "blur"], "faithfulness_fill", "blur"),
    (["--faithfulness-images", "4"], "faithfulness_images", 4),
    (["--faithfulness-steps", "8"], "faithfulness_steps", 8),
    (["--objects-alone"], "objects_alone", True),
    (["--objects-alone-images", "8"], "objects_alone_images", 8),
    (["--out", "audits/x"], "out", Path("audits/x")),
    (["--report-images", "3"], "report_images", 3),
    (["--overwrite"], "overwrite", True),
    (["--resume"], "resume", True),
]


@pytest.mark.parametrize(("args", "field", "value"), TODAY, ids=[a[0] for a, _, _ in TODAY])
def test_every_option_keeps_its_meaning(args, field, value):
    parsed = build_parser().parse_args(["--checkpoint", "a.ckpt", *args])
    assert settings_from_args(parsed).options()[field] == value


def test_checkpoints_repeat_and_list_layers_parse():
    parsed = build_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b", "--list-layers"])
    assert settings_from_args(parsed).checkpoints == (Path("a"), Path("b"))
    assert parsed.list_layers


def test_audit_settings_from_yaml_merge_and_print(tmp_path, capsys):
    """The audit's own settings in YAML: several --config merge in order, the command line
    wins, and --print_config prints them back as a YAML the command reads."""
    first = tmp_path / "a.yaml"
    first.write_text("layers: [fuse2]\nbatch_size: 5\nimage_mean: [0.5]\ncheckpoint: [x.ckpt]\n")
    second = tmp_path / "b.yaml"
    second.write_text("batch_size: 6\nsanity_check: true\n")
    parsed = build_parser().parse_args(
        ["--config", str(first), "--config", str(second), "--method", "layercam"]
    )
    settings = settings_from_args(parsed)
    assert settings.explain.layers == ("fuse2",) and settings.source.batch_size == 6
    assert settings.inputs.image_mean == (0.5,) and settings.checks.sanity_check
    assert settings.explain.method == "layercam" and settings.checkpoints == (Path("x.ckpt"),)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--config", str(first), "--print_config"])
    assert exit_info.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = settings_from_args(build_parser().parse_args(["--config", str(printed)]))
    assert again.explain.layers == ("fuse2",) and again.source.batch_size == 5


def test_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--checkpoint", "a", "--batch-size", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
    assert "expected a positive integer" in err


def test_list_layers_through_the_config(plants_run, capsys):
    """--list-layers at the size the data module feeds, the default marked."""
    run, checkpoint, _ = plants_run
    args = ["--config", run / "config.yaml", "--checkpoint", checkpoint, "--list-layers"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert f"1x3x{SIZE}x{SIZE} input" in out
    (default,) = [line for line in out.splitlines() if line.endswith("<- default")]
    assert default.split()[0] == "fuse2.2"
