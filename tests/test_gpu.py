"""On a CUDA device: the callback under mixed precision, and the audit against the CPU.

Skipped where PyTorch sees no CUDA device (CI runs on CPUs); run them on a GPU machine with
``python -m pytest -q tests/test_gpu.py``.
"""

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segcam_lightning.audit import main as explain
from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec
from segcam_lightning.cam import CAMEngine
from segcam_lightning.data import SegmentationDataModule, write_synthetic_dataset
from segcam_lightning.models import UNet
from segcam_lightning.module import SegmentationModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZE = 64
LAYERS = ["d4.conv.conv.5", "e4.conv.conv.5"]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_callback_on_the_gpu(tmp_path, precision):
    L.seed_everything(0)
    data = SegmentationDataModule(image_size=SIZE, batch_size=4, num_train=16, num_val=8)
    model = SegmentationModule(num_classes=3, base_width=8, class_names=data.class_names)
    callback = GradCAMCallback(layers=LAYERS, strict=True, probe=ProbeSpec(num_images=4))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    assert callback.last_cams.device.type == "cpu" and callback.last_cams.dtype == torch.float32
    assert torch.isfinite(callback.last_cams).all() and callback.last_cams.amax() == 1.0
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Tags()["images"]) == len(LAYERS) * 3
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def read_rows(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_audit_on_cuda_equals_the_cpu(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save(UNet(3, base_width=8).state_dict(), checkpoint)
    data = write_synthetic_dataset(tmp_path / "data", num_samples=6, image_size=SIZE)
    rows = {}
    # TF32 convolutions (CUDA's float32 default) round to a 10-bit mantissa: compared without
    # it, both devices compute float32 sums that differ by summation order only.
    allowed = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            out = tmp_path / device
            args = ["--checkpoint", checkpoint, "--data", data, "--size", SIZE, "--layers", *LAYERS]
            args += ["--device", device, "--out", out, "--quiet", "--num-workers", "0"]
            assert explain([str(a) for a in args]) == 0
            rows[device] = read_rows(out)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allowed
    assert len(rows["cpu"]) == len(rows["cuda"]) == 6 * 3 * len(LAYERS)
    for cpu, gpu in zip(rows["cpu"], rows["cuda"], strict=True):
        assert (cpu["image"], cpu["layer"], cpu["class"]) == (
            gpu["image"],
            gpu["layer"],
            gpu["class"],
        )
        # Relative 1e-3: float32 maps (~1e-7 relative error) through min-max scaling and sums of
        # 64² pixels; raw maxima (~1e-6) relative to their own scale. Absolute 1e-3 for shares
        # of pixels: a pixel whose two best logits tie within float32 rounding may change class
        # (one pixel is 2.4e-4 of the image).
        for key, absolute in (("energy_inside", 1e-3), ("raw_max", 0.0), ("pred_area", 1e-3)):
            if cpu[key] == "":
                assert gpu[key] == "", key
                continue
            assert math.isclose(float(cpu[key]), float(gpu[key]), rel_tol=1e-3, abs_tol=absolute), (
                key
            )


def test_auto_batched_gradients_on_cuda_equal_the_loop():
    # grad_mode="auto" batches here (K = 8 classes, 2 x 64² pixels): the maps must not change.
    torch.manual_seed(0)
    net = UNet(8, base_width=4).cuda().double().eval()
    images = torch.rand(2, 3, 64, 64, device="cuda", dtype=torch.float64)
    auto = CAMEngine(net, LAYERS)(images)
    loop = CAMEngine(net, LAYERS, grad_mode="loop")(images)
    # float64 on both sides: the batched and the derived-class loop differ by rounding only.
    torch.testing.assert_close(auto.cams, loop.cams, atol=1e-6, rtol=0)


def test_overlays_composed_on_cuda_equal_the_cpu():
    # The same gathers on the GPU: OpenCV's pixels (tests/test_overlays.py checks the CPU).
    from segcam_lightning.overlays import Painter, label_colors, uint8_images

    torch.manual_seed(0)
    images, cams = uint8_images(torch.rand(4, 3, 64, 48)), torch.rand(4, 2, 3, 64, 48)
    labels = torch.randint(0, 3, (4, 64, 48))
    painter = Painter(0.4)
    on_cuda = painter.overlays(images.cuda(), cams.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), painter.overlays(images, cams))
    colours = [[0, 0, 0], [0, 0, 128], [0, 128, 0]]
    assert torch.equal(label_colors(labels.cuda(), colours).cpu(), label_colors(labels, colours))
