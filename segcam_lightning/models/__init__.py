"""Segmentation networks."""

from segcam_lightning.models.unet import SEED_LAYERS, UNet, build_unet

__all__ = ["SEED_LAYERS", "UNet", "build_unet"]
