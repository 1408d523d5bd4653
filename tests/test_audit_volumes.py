"""explain.py on 3-D checkpoints: a tiny ``train.py`` run of configs/synthetic3d.yaml and a saved
3-D U-Net state dict, audited on the synthetic test volumes and on a folder of ``.npy`` volumes.
Every volume gets its panels (axial, coronal and sagittal rows), ``cams/<name>.npy`` equal to the
engine's maps, one metrics row per volume × class × layer, report tiles per view; mistakes are
refused before writing; an interrupted run resumes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_audit import assert_report_images_exist, files_under, read_rows
from test_audit_hardening import fail_on_second_batch

import segcam_lightning.audit.preflight as preflight
from segcam_lightning.audit import main
from segcam_lightning.audit.volumes import read_volume
from segcam_lightning.cam import CAMEngine
from segcam_lightning.data import SyntheticVolumes
from segcam_lightning.loading import CheckpointError, load_checkpoint
from segcam_lightning.loading.checkpoints import infer_unet_shape
from segcam_lightning.models import UNet
from segcam_lightning.render import SEPARATOR

ROOT = Path(__file__).resolve().parents[1]
SIDE = 16
CLASSES = 3
LAYER = "d4.conv.conv.5"
# The maps written are the engine's float32 maps; batches of other sizes may round differently.
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume_ckpt(tmp_path_factory):
    """last.ckpt of ``train.py fit --config configs/synthetic3d.yaml``, tiny (16³, width 2)."""
    cwd = tmp_path_factory.mktemp("train3d")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs/synthetic3d.yaml"),
        "--data.image_size=16",
        "--data.batch_size=2",
        "--data.num_train=4",
        "--data.num_val=2",
        "--model.base_width=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 3-D convolutions on shared cores
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def volume_pth(tmp_path_factory):
    """A bare state dict of a 3-D U-Net with one input channel."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet3d") / "unet3d.pt"
    torch.save(UNet(CLASSES, base_width=2, in_channels=1, dims=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A folder of volumes as a user has them: ``images/*.npy`` in other dtypes, ranges, shapes
    and sizes than the network's, ``masks/*.npy`` integer labels."""
    root = tmp_path_factory.mktemp("scans")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    volumes = SyntheticVolumes(3, SIDE, seed=5)
    for i, stem in enumerate(("a", "b", "c")):
        image, mask = volumes.render(i)
        if stem == "a":  # int16 [D, H, W] in CT-like units, already the network's size
            array = (image * 1400 - 1000).astype(np.int16)
        elif stem == "b":  # float64 [C, D, H, W], larger: resized to 16³
            image = np.kron(image, np.ones((2, 2, 2)))
            mask = np.kron(mask, np.ones((2, 2, 2), np.uint8))
            array = image[None].astype(np.float64) * 3.0 + 7.0
        else:
            array = image.astype(np.float32)
        np.save(root / "images" / f"{stem}.npy", array)
        np.save(root / "masks" / f"{stem}.npy", mask.astype(np.uint8))
    return root


def audit(*args, out):
    """Run explain.py in this process; returns the exit status."""
    return main([*map(str, args), "--out", str(out), "--quiet", "--num-workers", "0"])


def engine_cams(checkpoint, volumes, layers=(LAYER,)):
    """The engine's maps of ``volumes`` ``[B, 1, D, H, W]`` in [0, 1], as the audit runs it."""
    net = load_checkpoint(checkpoint).net
    return CAMEngine(net, list(layers), "gradcam", "softmax_mean", "minmax")(volumes).cams.numpy()


def assert_volume_outputs(out, names, checkpoint_layers=1):
    """Panels (three blog-panel rows of 16² slices), one ``.npy`` per volume, report tiles."""
    panel_side = 3 * SIDE + 2 * SEPARATOR
    for k in range(CLASSES):
        assert sorted(p.stem for p in (out / "gradcam" / str(k)).iterdir()) == sorted(names)
        panel = cv2.imread(str(out / "gradcam" / str(k) / f"{names[0]}.jpg"))
        assert panel.shape == (panel_side, panel_side, 3)
    for name in names:
        cams = np.load(out / "cams" / f"{name}.npy")
        assert cams.shape == (checkpoint_layers, CLASSES, SIDE, SIDE, SIDE)
        assert cams.dtype == np.float32 and cams.min() >= 0 and cams.max() <= 1
    sources = assert_report_images_exist(out)
    for view in ("axial", "coronal", "sagittal"):
        assert any(src.endswith(f"/input_{view}.jpg") for src in sources)
        assert any(src.endswith(f"/0_{view}.jpg") for src in sources)


def test_lightning_3d_checkpoint_audits_the_synthetic_volumes(volume_ckpt, tmp_path):
    out = tmp_path / "out"
    assert audit("--checkpoint", volume_ckpt, "--data", "synthetic3d", "--limit", 3, out=out) == 0
    names = ["0000", "0001", "0002"]
    assert_volume_outputs(out, names)
    rows = read_rows(out)
    assert len(rows) == len(names) * CLASSES
    assert [r["class_name"] for r in rows[:3]] == ["background", "tube", "blob"]
    assert {r["source"] for r in rows} == {f"synthetic3d:{i}" for i in range(3)}
    test_split = SyntheticVolumes(3, SIDE, seed=2)  # the data module's test split (seed + 2)
    for row in rows:
        mask = test_split.render(int(row["index"]))[1]
        assert float(row["gt_area"]) == pytest.approx((mask == int(row["class"])).mean())
        assert row["pointing_game"] in ("", "0", "1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["settings"]["image_size"] == [16, 16, 16]
    assert "3-D U-Net width 2" in summary["checkpoints"][0]["description"]
    assert summary["checkpoints"][0]["input"] == "volume, 1 channel"
    assert summary["outputs"]["cams"] == "cams/<name>.npy"
    volumes = torch.stack([test_split[i]["image"] for i in range(3)])
    expected = engine_cams(volume_ckpt, volumes)
    for b, name in enumerate(names):
        np.testing.assert_allclose(np.load(out / "cams" / f"{name}.npy"), expected[b], atol=ATOL)


def test_a_volume_folder_is_scaled_resized_and_measured_over_voxels(volume_pth, scans, tmp_path):
    out = tmp_path / "out"
    layers = ("e4.conv.conv.5", LAYER)
    args = ("--checkpoint", volume_pth, "--data", scans, "--size", SIDE, "--layers", *layers)
    assert audit(*args, out=out) == 0
    rows = read_rows(out)
    assert len(rows) == 3 * CLASSES * len(layers)
    assert {r["source"] for r in rows} == {"images/a.npy", "images/b.npy", "images/c.npy"}
    # Each volume's own range maps to [0, 1]: a's int16 CT units as c's float32 [0, 1] would.
    volume_a = read_volume(scans / "images" / "a.npy", channels=1)
    raw = np.load(scans / "images" / "a.npy").astype(np.float32)
    np.testing.assert_allclose(volume_a[0], (raw - raw.min()) / (raw.max() - raw.min()))
    expected = engine_cams(volume_pth, torch.from_numpy(volume_a)[None], layers)[0]
    for layer, name in enumerate(layers):
        cams = np.load(out / "cams" / "a.npy")[layer]
        np.testing.assert_allclose(cams, expected[layer], atol=ATOL, err_msg=name)
    mask_a = np.load(scans / "masks" / "a.npy")
    for row in rows:
        if row["image"] == "a":
            share = (mask_a == int(row["class"])).mean()
            assert float(row["gt_area"]) == pytest.approx(share)
    layer_dirs = sorted(p.name for p in (out / "gradcam").iterdir())
    assert layer_dirs == sorted(layers)
    assert np.load(out / "cams" / "b.npy").shape == (2, CLASSES, SIDE, SIDE, SIDE)


def test_intensity_range_clips_and_scales(tmp_path):
    volume = np.array([[[-2000.0, -1000.0], [-300.0, 400.0]], [[1000.0, 0.0], [0.0, 0.0]]])
    np.save(tmp_path / "ct.npy", volume)
    scaled = read_volume(tmp_path / "ct.npy", channels=1, intensity_range=(-1000.0, 400.0))
    assert scaled.dtype == np.float32 and scaled.shape == (1, 2, 2, 2)
    assert scaled[0, 0, 0].tolist() == [0.0, 0.0] and scaled[0, 1, 0, 0] == 1.0
    assert scaled[0, 0, 1, 0] == pytest.approx(0.5)


def test_zscore_feeds_each_channel_standardised_and_shows_it_stretched(
    volume_pth, scans, tmp_path, capsys
):
    """--zscore: each channel to mean 0 and standard deviation 1 over the volume (MONAI's
    NormalizeIntensity(channel_wise=True)), fed to the network as is; the maps are the engine's
    on those values, and nothing is said to be assumed about the window."""
    raw = np.load(scans / "images" / "a.npy").astype(np.float64)
    volume = read_volume(scans / "images" / "a.npy", channels=1, zscore=True)
    assert volume.dtype == np.float32
    np.testing.assert_allclose(volume[0], (raw - raw.mean()) / raw.std(), atol=1e-5)
    out = tmp_path / "out"
    args = ("--checkpoint", volume_pth, "--data", scans, "--size", SIDE, "--zscore")
    assert audit(*args, "--layers", LAYER, out=out) == 0
    assert "intensity window" not in capsys.readouterr().err
    expected = engine_cams(volume_pth, torch.from_numpy(volume)[None])[0]
    np.testing.assert_allclose(np.load(out / "cams" / "a.npy")[0], expected[0], atol=ATOL)


def test_unreadable_volumes_are_skipped_with_the_reason(volume_pth, scans, tmp_path):
    data = tmp_path / "scans"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for stem in ("a", "c"):
        for part in ("images", "masks"):
            (data / part / f"{stem}.npy").write_bytes((scans / part / f"{stem}.npy").read_bytes())
    np.save(data / "images" / "two_channels.npy", np.zeros((2, SIDE, SIDE, SIDE), np.float32))
    np.save(data / "masks" / "two_channels.npy", np.zeros((SIDE, SIDE, SIDE), np.uint8))
    np.save(data / "images" / "bad_labels.npy", np.zeros((SIDE, SIDE, SIDE), np.float32))
    np.save(data / "masks" / "bad_labels.npy", np.full((SIDE, SIDE, SIDE), 7, np.uint8))
    out = tmp_path / "out"
    assert audit("--checkpoint", volume_pth, "--data", data, "--size", SIDE, out=out) == 0
    assert {r["image"] for r in read_rows(out)} == {"a", "c"}
    skipped = {
        s["name"]: s["reason"] for s in json.loads((out / "summary.json").read_text())["skipped"]
    }
    assert "has 2 channel(s)" in skipped["two_channels"] and "takes 1" in skipped["two_channels"]
    assert "labels 7 outside 0..2" in skipped["bad_labels"]


@pytest.mark.parametrize(
    ("checkpoint", "data", "message"),
    [
        ("volume_pth", "synthetic", "--data synthetic holds images, but the network takes volumes"),
        (
            "blog_2d",
            "synthetic3d",
            "--data synthetic3d holds volumes, but the network takes images",
        ),
        ("volume_pth", "images_folder", "No volumes found"),
        ("blog_2d", "scans", "holds volumes (.npy files), but the network takes images"),
        ("volume_pth", "unpaired", "1 volume(s) without a mask: lonely.npy"),
    ],
)
def test_data_of_the_other_kind_is_refused_before_writing(
    checkpoint, data, message, volume_pth, scans, tmp_path, capsys
):
    paths = {"volume_pth": volume_pth, "scans": scans}
    if checkpoint == "blog_2d":
        paths["blog_2d"] = tmp_path / "blog.pt"
        torch.save(UNet(CLASSES, base_width=2).state_dict(), paths["blog_2d"])
    (tmp_path / "images_folder").mkdir()
    cv2.imwrite(str(tmp_path / "images_folder" / "x.png"), np.zeros((16, 16, 3), np.uint8))
    unpaired = tmp_path / "unpaired"
    (unpaired / "images").mkdir(parents=True)
    (unpaired / "masks").mkdir()
    np.save(unpaired / "images" / "lonely.npy", np.zeros((SIDE,) * 3, np.float32))
    paths.update(images_folder=tmp_path / "images_folder", unpaired=unpaired)
    out = tmp_path / "out"
    source = paths.get(data, data)
    assert audit("--checkpoint", paths[checkpoint], "--data", source, "--size", SIDE, out=out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_memory_check_speaks_of_volumes(volume_pth, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: (10_000, "host"))
    out = tmp_path / "out"
    args = ("--checkpoint", volume_pth, "--data", "synthetic3d", "--size", 32)
    assert audit(*args, out=out) == 2
    err = capsys.readouterr().err
    assert "32x32x32 volume(s) needs about" in err and "16x16x16 volume fits" in err
    assert not out.exists()


def test_an_interrupted_volume_audit_resumes_to_what_one_run_writes(
    volume_pth, tmp_path, capsys, monkeypatch
):
    common = ("--checkpoint", volume_pth, "--data", "synthetic3d", "--limit", 3, "--size", SIDE)
    common = (*common, "--batch-size", 1)
    reference = tmp_path / "reference"
    assert audit(*common, out=reference) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fail_on_second_batch(patch)
        assert audit(*common, out=out) == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "partial"
    written = sorted(p.name for p in (out / "cams").iterdir())
    assert written in (["0000.npy"], ["0000.nii.gz", "0000.npy"])  # NIfTI with nibabel
    assert audit(*common, "--resume", out=out) == 0
    capsys.readouterr()
    with (out / "metrics.csv").open() as a, (reference / "metrics.csv").open() as b:
        assert list(csv.reader(a)) == list(csv.reader(b))
    assert files_under(out) == files_under(reference)
    for name in ("0000", "0001", "0002"):
        cams = np.load(out / "cams" / f"{name}.npy")
        np.testing.assert_array_equal(cams, np.load(reference / "cams" / f"{name}.npy"))


def test_module_and_model_audit_a_3d_checkpoint_as_the_package_loader_does(
    volume_ckpt, volume_pth, tmp_path
):
    base = ("--data", "synthetic3d", "--limit", 2)
    runs = {
        "package": ("--checkpoint", volume_ckpt),
        "module": (
            "--checkpoint",
            volume_ckpt,
            "--module",
            "segcam_lightning.module:SegmentationModule",
        ),
    }
    for label, args in runs.items():
        assert audit(*args, *base, out=tmp_path / label) == 0, label
    kwargs = json.dumps({"num_classes": CLASSES, "base_width": 2, "in_channels": 1, "dims": 3})
    model = ("--model", "segcam_lightning.models:UNet", "--model-kwargs", kwargs)
    assert audit("--checkpoint", volume_pth, *model, *base, "--size", SIDE, out=tmp_path / "m") == 0
    assert audit("--checkpoint", volume_pth, *base, "--size", SIDE, out=tmp_path / "p") == 0

    def values(out):
        return [
            {k: r[k] for k in ("image", "class", "energy_inside", "iou")} for r in read_rows(out)
        ]

    assert values(tmp_path / "module") == values(tmp_path / "package")
    assert values(tmp_path / "m") == values(tmp_path / "p")
    np.testing.assert_allclose(
        np.load(tmp_path / "module" / "cams" / "0001.npy"),
        np.load(tmp_path / "package" / "cams" / "0001.npy"),
        atol=ATOL,
    )


def test_3d_state_dicts_are_recognised_and_checked(volume_ckpt, tmp_path):
    state = UNet(CLASSES, base_width=2, in_channels=1, dims=3).state_dict()
    shape = infer_unet_shape({f"net.{k}": v for k, v in state.items()})
    assert shape == (2, 1, CLASSES, "net.", 3)
    content = torch.load(volume_ckpt, weights_only=True)
    assert content["hyper_parameters"]["dims"] == 3
    content["hyper_parameters"]["dims"] = 2
    torch.save(content, tmp_path / "clash.ckpt")
    with pytest.raises(CheckpointError, match=r"dims=2 but the weights have 3"):
        load_checkpoint(tmp_path / "clash.ckpt")
    content["hyper_parameters"]["dims"] = "3"
    torch.save(content, tmp_path / "text.ckpt")
    with pytest.raises(CheckpointError, match=r"dims: '3', expected 2 \(images\) or 3"):
        load_checkpoint(tmp_path / "text.ckpt")
