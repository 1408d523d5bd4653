"""explain.py with sliding windows (``--roi-size``): volumes explained at their own size, the
stitched ``cams/<name>.npy`` equal to :func:`sliding_window_cams` on the same input, NIfTI
beside them when nibabel is installed, and the window options refused before writing."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segcam_lightning.audit import main
from segcam_lightning.audit.settings import SYNTHETIC_TEST_SEED
from segcam_lightning.audit.volumes import read_volume
from segcam_lightning.cam import CAMEngine, sliding_window_cams
from segcam_lightning.data import SyntheticVolumes
from segcam_lightning.loading import load_checkpoint
from segcam_lightning.models import UNet

LAYER = "d4.conv.conv.5"
ROI = 16
ATOL = 1e-5
#: Volumes larger than the 16³ window, of different sizes (one per batch).
SHAPES = {"a": (24, 24, 24), "b": (20, 24, 16)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet3d(tmp_path_factory):
    torch.manual_seed(1)  # a seed whose untrained maps are not all zero
    path = tmp_path_factory.mktemp("unet3d") / "unet3d.pt"
    torch.save(UNet(3, base_width=2, in_channels=1, dims=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    volumes = SyntheticVolumes(len(SHAPES), 24, seed=3)
    for i, (stem, (d, h, w)) in enumerate(SHAPES.items()):
        image, mask = volumes.render(i)
        np.save(root / "images" / f"{stem}.npy", (image[:d, :h, :w] * 900 - 100).astype(np.int16))
        np.save(root / "masks" / f"{stem}.npy", mask[:d, :h, :w].astype(np.uint8))
    return root


def audit(*args, out):
    return main([*map(str, args), "--out", str(out), "--quiet", "--num-workers", "0"])


def direct_cams(checkpoint, volume, **window):
    """:func:`sliding_window_cams` called directly, as the audit's defaults build the engine."""
    engine = CAMEngine(load_checkpoint(checkpoint).net, [LAYER], "gradcam", "softmax_mean")
    x = torch.from_numpy(volume)[None]
    cams = sliding_window_cams(engine, x, ROI, **window).cams[0].numpy()
    assert cams.max() == 1  # not all zero: the comparison means something
    return cams


def engine_cams(checkpoint, volume):
    engine = CAMEngine(load_checkpoint(checkpoint).net, [LAYER], "gradcam", "softmax_mean")
    return engine(torch.from_numpy(volume)[None]).cams[0].numpy()


@pytest.fixture(scope="module")
def windowed(unet3d, scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("windowed") / "out"
    args = ("--checkpoint", unet3d, "--data", scans, "--roi-size", ROI, "--overlap", 0.5)
    assert audit(*args, "--blend", "gaussian", "--batch-size", 4, out=out) == 0
    return out


def test_volumes_are_explained_at_their_own_size_through_windows(windowed, unet3d, scans):
    for stem, shape in SHAPES.items():
        cams = np.load(windowed / "cams" / f"{stem}.npy")
        assert cams.shape == (1, 3, *shape) and cams.dtype == np.float32
        volume = read_volume(scans / "images" / f"{stem}.npy", 1)
        expected = direct_cams(unet3d, volume, overlap=0.5, mode="gaussian")
        np.testing.assert_allclose(cams, expected, atol=ATOL)  # sides the U-Net cannot take whole
    assert (windowed / "report.html").is_file()
    summary = json.loads((windowed / "summary.json").read_text())
    fed = "volume, 1 channel, through 16 windows (overlap 0.5, gaussian, patch)"
    assert summary["checkpoints"][0]["input"] == fed  # in the report, and what --resume matches


def test_the_maps_are_written_as_nifti_when_nibabel_is_installed(windowed):
    nibabel = pytest.importorskip("nibabel")
    for stem in SHAPES:
        raw = gzip.decompress((windowed / "cams" / f"{stem}.nii.gz").read_bytes())
        image = nibabel.Nifti1Image.from_bytes(raw)
        data = np.moveaxis(np.asarray(image.dataobj), (3, 4), (0, 1))
        np.testing.assert_array_equal(data, np.load(windowed / "cams" / f"{stem}.npy"))
        np.testing.assert_array_equal(image.affine, np.eye(4))


def test_synthetic3d_volumes_rendered_at_size_go_through_windows(unet3d, tmp_path):
    out = tmp_path / "out"
    args = ("--checkpoint", unet3d, "--data", "synthetic3d", "--size", 32, "--limit", 1)
    assert audit(*args, "--roi-size", ROI, "--window-weights", "whole", out=out) == 0
    image, _ = SyntheticVolumes(1, 32, seed=SYNTHETIC_TEST_SEED).render(0)
    volume = image[None].astype(np.float32)
    expected = direct_cams(unet3d, volume, weights="whole")
    cams = np.load(out / "cams" / "0000.npy")
    np.testing.assert_allclose(cams, expected, atol=ATOL)
    assert np.abs(engine_cams(unet3d, volume) - cams).max() > 0.05  # not the whole volume's maps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--overlap", "0.5"), "--overlap set(s) sliding windows, which --roi-size turns on"),
        (("--roi-size", "16", "16"), "--roi-size 16 16: expected one side or 3"),
        (("--roi-size", "16", "--sanity-check"), "--sanity-check run(s) the model on whole"),
        (
            ("--roi-size", "16", "--window-weights", "whole", "--method", "gradcam++"),
            "--window-weights whole pools channel weights over the windows",
        ),
        (("--roi-size", "16", "--overlap", "1"), "expected a fraction in [0, 1)"),
        (("--roi-size", "0"), "--roi-size"),
    ],
)
def test_window_options_are_refused_in_one_line_before_writing(
    options, message, unet3d, tmp_path, capsys
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if options[-1] in ("1", "0") else _no_raise() as raised:
        code = audit("--checkpoint", unet3d, "--data", "synthetic3d", *options, out=out)
    code = raised.value.code if raised is not None else code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err
    assert len(err.splitlines()) == 1 or "usage:" in err
    assert not out.exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_the_readmes_volumes_example_runs():
    """README's "Volumes (CT, MRI)" Python block (tests/test_readme.py runs only bash blocks)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Volumes \(CT, MRI\).*?```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    namespace: dict = {}
    exec(block, namespace)  # the README's own example
    assert namespace["cams"].shape == (1, 1, 3, 64, 64, 48)
