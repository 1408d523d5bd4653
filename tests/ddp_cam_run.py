"""Run by test_callback.py: CAMs of the same weights on N CPU processes (gloo), then a short fit.

Usage: python ddp_cam_run.py OUT_DIR NUM_PROCESSES
Writes OUT_DIR/cams.pt (probe images, CAMs and the objects-alone test's shares kept from
`trainer.validate`, from global rank 0) and TensorBoard events under OUT_DIR/tb.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from segcam_lightning.callbacks import GradCAMCallback, ProbeSpec, ShortcutMonitor
from segcam_lightning.data import SegmentationDataModule
from segcam_lightning.module import SegmentationModule


def main(out: Path, devices: int) -> None:
    L.seed_everything(0)
    data = SegmentationDataModule(image_size=32, batch_size=2, num_train=8, num_val=8)
    model = SegmentationModule(num_classes=3, base_width=4, class_names=data.class_names)
    callback = GradCAMCallback(
        layers=["d4.conv.conv.5", "b.conv.5"], strict=True, probe=ProbeSpec(num_images=5)
    )
    monitor = ShortcutMonitor(probe=ProbeSpec(num_images=5))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=TensorBoardLogger(out, name="tb"),
        callbacks=[callback, monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        cams = {
            "images": callback.probe.images,
            "cams": callback.last_cams,
            "kept": monitor.last_kept,
            "tested": torch.tensor(monitor.tested),
        }
        torch.save(cams, out / "cams.pt")
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
