"""Segmentation networks."""

from segcam_lightning.models.unet import BLOG_LAYERS, UNet, build_unet

__all__ = ["BLOG_LAYERS", "UNet", "build_unet"]
