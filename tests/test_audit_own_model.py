"""explain.py with the user's own code: --module rebuilds a Lightning checkpoint with the named
class and --model loads weights into the network a named factory builds; both audit what the
package's own loader audits, any output kind, logits at a lower resolution, sizes a network
accepts, and a resume fingerprint that covers the code. The example project's end-to-end runs
are in test_examples.py."""

import csv
import json
import re
import textwrap

import cv2
import pytest
import torch

from segcam_lightning.audit import AuditSettings, main
from segcam_lightning.audit.plan import prepare
from segcam_lightning.audit.resume import fingerprint
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.module import SegmentationModule

SIZE = 32
NUM_IMAGES = 4
CLASSES = 3
UNET = '{"num_classes": 3, "base_width": 2}'


def explain(*args, out=None):
    extra = ["--out", str(out), "--quiet", "--num-workers", "0"] if out is not None else []
    return main([*map(str, args), *extra])


def read_rows(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def without(rows, *columns):
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


@pytest.fixture(scope="module")
def weeds(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "weeds", NUM_IMAGES, SIZE)


@pytest.fixture(scope="module")
def module_ckpt(tmp_path_factory):
    """A train.py-style checkpoint of SegmentationModule, Lightning CLI's markers included."""
    torch.manual_seed(0)
    module = SegmentationModule(num_classes=CLASSES, base_width=2)
    path = tmp_path_factory.mktemp("ckpt") / "seg.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "pytorch-lightning_version": "2.6.6",
            "epoch": 3,
            "hyper_parameters": {
                **dict(module.hparams),
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
                "_class_path": "segcam_lightning.module.SegmentationModule",
            },
            "datamodule_hyper_parameters": {"image_size": SIZE, "channel_order": "rgb"},
        },
        path,
    )
    return path


TINY = '''
    import torch
    from torch import nn

    from tiny_blocks import block  # a sibling module: the file's folder is on the path


    class Tiny(nn.Module):
        """Logits at half the input's resolution, in a dict."""

        def __init__(self, classes=3):
            super().__init__()
            self.features = block(3, 8)
            self.pool = nn.AvgPool2d(2)
            self.head = nn.Conv2d(8, classes, 1)

        def forward(self, x):
            return {"out": self.head(self.pool(self.features(x)))}


    def build(classes=3):
        return Tiny(classes)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(spec, weights)`` of a network in a file that is not installed."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "tiny.py").write_text(textwrap.dedent(TINY))
    (folder / "tiny_blocks.py").write_text(
        "from torch import nn\n\n\ndef block(i, o):\n"
        "    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())\n"
    )
    torch.manual_seed(0)
    for classes in (CLASSES, 1):
        weights = {
            "features.0.weight": torch.randn(8, 3, 3, 3),
            "features.0.bias": torch.randn(8) * 0.1,
            "head.weight": torch.randn(classes, 8, 1, 1),
            "head.bias": torch.zeros(classes),
        }
        torch.save(weights, folder / f"tiny{classes}.pt")
    return f"{folder / 'tiny.py'}:build", folder


def test_module_and_model_audit_what_the_package_loader_audits(module_ckpt, weeds, tmp_path):
    outs = {name: tmp_path / name for name in ("package", "module", "model")}
    data = ["--checkpoint", module_ckpt, "--data", weeds]
    assert explain(*data, out=outs["package"]) == 0
    module = "segcam_lightning.module:SegmentationModule"
    assert explain(*data, "--module", module, out=outs["module"]) == 0
    model = ["--model", "segcam_lightning.models:build_unet", "--model-kwargs", UNET]
    assert explain(*data, *model, out=outs["model"]) == 0
    rows = {name: read_rows(out) for name, out in outs.items()}
    assert len(rows["package"]) == NUM_IMAGES * CLASSES
    # The module runs itself (it defines forward): layers go by the U-Net's names all the same.
    assert {r["layer"] for r in rows["module"]} == {"d4.conv.conv.5"}
    assert rows["module"] == rows["package"]
    assert without(rows["model"], "class_name") == without(rows["package"], "class_name")
    summary = json.loads((outs["module"] / "summary.json").read_text())
    entry = summary["checkpoints"][0]
    assert entry["code"] == module and entry["epoch"] == 3 and entry["input"] == "RGB"
    assert (
        "SegmentationModule by segcam_lightning.module:SegmentationModule" in (entry["description"])
    )


def test_multilabel_outputs_are_independent_sigmoids(module_ckpt, weeds, tmp_path):
    model = ["--model", "segcam_lightning.models:build_unet", "--model-kwargs", UNET]
    args = [*model, "--checkpoint", module_ckpt, "--data", weeds, "--output-kind", "multilabel"]
    assert explain(*args, "--threshold", "0.4", out=tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["output_kind"] == "multilabel"
    net = SegmentationModule.load_from_checkpoint(module_ckpt, weights_only=True).net.eval()
    for row in read_rows(tmp_path):
        image = torch.from_numpy(cv2.imread(str(weeds / row["source"]))[..., ::-1].copy())
        with torch.no_grad():
            probs = net(image.permute(2, 0, 1)[None].float() / 255).sigmoid()
        expected = (probs[0, int(row["class"])] > 0.4).float().mean().item()
        assert float(row["pred_area"]) == pytest.approx(expected, abs=1e-6)


def test_a_file_network_with_low_resolution_dict_logits_at_any_size(tiny, weeds, tmp_path):
    spec, folder = tiny
    side = 24  # not a multiple of 16: only the U-Net needs that
    args = ["--model", spec, "--checkpoint", folder / "tiny3.pt", "--data", weeds]
    assert explain(*args, "--size", side, out=tmp_path) == 0
    rows = read_rows(tmp_path)
    assert len(rows) == NUM_IMAGES * CLASSES and {r["layer"] for r in rows} == {"pool"}
    panel = cv2.imread(str(tmp_path / "gradcam" / "0" / f"{rows[0]['image']}.jpg"))
    assert panel.shape[:2] == (side, 3 * side + 2 * 10)  # maps upsampled to the input
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["image_size"] == [side, side]
    assert all(r["energy_inside"] != "" or r["gt_present"] == "0" for r in rows)


def test_the_resume_fingerprint_covers_the_code(tiny, weeds, tmp_path):
    spec, folder = tiny
    settings = AuditSettings.from_options(
        checkpoints=(folder / "tiny3.pt",),
        data=str(weeds),
        out=tmp_path,
        size=SIZE,
        model=spec,
        model_kwargs={"classes": CLASSES},
        num_workers=0,
        progress=False,
    )
    code = fingerprint(prepare(settings))["code"]
    assert code["option"] == "--model" and code["kwargs"] == {"classes": CLASSES}
    assert code["spec"] == f"{(folder / 'tiny.py').resolve()}:build"
    assert re.fullmatch(r"[0-9a-f]{64}", code["sha256"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--output-kind", "binary", "--checkpoint", "{ckpt}"],
            r"--output-kind binary expects one output channel .* but the network has 3",
        ),
        (
            ["--model", "{tiny}", "--model-kwargs", '{"classes": 1}', "--checkpoint", "{tiny1}",
             "--output-kind", "multiclass"],
            r"--output-kind multiclass needs two or more output channels",
        ),
        (
            ["--model", "{tiny}", "--model-kwargs", '{"classes": 1}', "--checkpoint", "{tiny1}",
             "--classes", "1"],
            r"--classes \[1\]: a binary model has one output channel, class 0",
        ),
        (
            ["--model", "{tiny}", "--checkpoint", "{tiny1}"],
            r"does not hold the weights of the Tiny that .*tiny\.py:build builds: of its 4 "
            r"tensors, 2 with other shapes \(\[head\.weight: expected \[3, 8, 1, 1\]",
        ),
        (
            ["--model", "segcam_lightning.models:build_unet", "--model-kwargs", UNET,
             "--checkpoint", "{ckpt}", "--size", "24"],
            r"The UNet built by .*:build_unet with the weights of .*seg\.ckpt failed on a "
            r"1x3x24x24 input of zeros: RuntimeError: .* Pass --size \(a size it accepts\)\.$",
        ),
        (["--in-channels", "1", "--checkpoint", "{ckpt}"], r"--in-channels is for the networks"),
        (["--model-kwargs", "{}", "--checkpoint", "{ckpt}"], r"--model-kwargs are the arguments"),
        (
            ["--model", "{broken}", "--checkpoint", "{ckpt}"],
            r"--model: importing .*broken\.py failed: ZeroDivisionError: division by zero\. Fix",
        ),
    ],
)  # fmt: skip
def test_usage_errors_of_own_code_exit_2_with_one_line(
    module_ckpt, tiny, weeds, tmp_path, capsys, args, message
):
    spec, folder = tiny
    (tmp_path / "broken.py").write_text("1 / 0\n")
    values = {
        "{ckpt}": module_ckpt,
        "{tiny}": spec,
        "{tiny1}": folder / "tiny1.pt",
        "{broken}": f"{tmp_path / 'broken.py'}:build",
    }
    filled = [values.get(a, a) for a in args]
    out = tmp_path / "out"
    assert explain("--data", weeds, "--size", SIZE, *filled, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()
