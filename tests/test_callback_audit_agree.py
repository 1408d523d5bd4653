"""The callback and the audit show one prediction for one network, a stride-4 head included.

Both resize the model's predicted labels to the image with one helper
(:func:`segcam_lightning.cam.functional.resize_labels`, nearest-exact). With logits at a size
that does not divide the image's (30 px images, 7 px logits), another rule ("nearest") gives
other areas: the test checks that it would see such a difference.
"""

import csv
import textwrap

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from segcam_lightning.audit import main
from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.callbacks.share import share_of

SIDE, CLASSES, NUM = 30, 3, 4

STRIDE4 = """
    from torch import nn


    class Stride4(nn.Module):
        '''Logits at a quarter of the input's side (floored: 30 px in, 7 px out).'''

        def __init__(self, classes=3):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.pool = nn.AvgPool2d(4)
            self.head = nn.Conv2d(8, classes, 1)

        def forward(self, x):
            return self.head(self.pool(self.features(x)))


    def build(classes=3):
        return Stride4(classes)
"""


class Module(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def validation_step(self, batch, batch_idx):
        return None


class Catch(Callback):
    """Receives the GradCAMCallback's CAM steps, as a ShortcutMonitor does."""

    def __init__(self):
        self.steps = []

    def setup(self, trainer, pl_module, stage):
        share_of(trainer).listeners[self] = lambda trainer, step: self.steps.append(step)


@pytest.fixture
def project(tmp_path):
    """A network file, its weights and a folder of images: what both read."""
    (tmp_path / "stride4.py").write_text(textwrap.dedent(STRIDE4))
    namespace: dict = {}
    exec(textwrap.dedent(STRIDE4), namespace)
    torch.manual_seed(0)
    net = namespace["build"](CLASSES)
    torch.save(net.state_dict(), tmp_path / "stride4.pt")
    images = np.random.default_rng(0).integers(0, 256, (NUM, SIDE, SIDE, 3), dtype=np.uint8)
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i, rgb in enumerate(images):
        cv2.imwrite(str(tmp_path / "data" / "images" / f"{i:02d}.png"), rgb[..., ::-1])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return tmp_path, net.eval(), batch


def test_callback_and_audit_show_the_same_prediction_for_a_stride_4_head(project):
    folder, net, images = project
    catch = Catch()
    probe = ProbeSpec(num_images=NUM)  # images only: no alignment scalars without masks
    callback = GradCAMCallback(["features"], log_alignment=False, strict=True, probe=probe)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(folder, name="tb"),
        callbacks=[callback, catch],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader([{"image": image} for image in images], batch_size=2)
    trainer.validate(Module(net), dataloaders=loader, verbose=False)
    [step] = catch.steps
    assert step.preds.shape == (NUM, SIDE, SIDE)
    shown = torch.stack([(step.preds == k).float().mean((1, 2)) for k in range(CLASSES)], 1)

    args = ["--model", f"{folder / 'stride4.py'}:build", "--checkpoint", folder / "stride4.pt"]
    args += ["--data", folder / "data", "--size", SIDE, "--layers", "features"]
    args += ["--out", folder / "audit", "--quiet", "--num-workers", "0"]
    assert main([str(a) for a in args]) == 0
    with (folder / "audit" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    audited = torch.zeros(NUM, CLASSES)
    for row in rows:
        audited[int(row["index"]), int(row["class"])] = float(row["pred_area"])
    # Both are pixel counts over 900 (a pixel is 1.1e-3): equal up to the CSV's float text.
    assert torch.allclose(audited, shown, atol=1e-6)

    # Sensitivity: "nearest" (the rule the callback once had) moves whole pixel rows here.
    with torch.no_grad():
        labels = net(images).argmax(1, keepdim=True).float()
    nearest = F.interpolate(labels, size=(SIDE, SIDE), mode="nearest")[:, 0]
    other = torch.stack([(nearest == k).float().mean((1, 2)) for k in range(CLASSES)], 1)
    assert (other - audited).abs().max() > 1 / SIDE**2
