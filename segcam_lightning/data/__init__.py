"""Datasets: embedded synthetic plants, blog-format folders, the blog's split, augmentation;
planted data for checking explanations (a cue confusion, classes in one channel each)."""

from segcam_lightning.data.batch import BatchAdapter, split_batch
from segcam_lightning.data.colormap import BLOG_COLORMAP, color_to_mask, mask_to_color
from segcam_lightning.data.cue import CueConfusion
from segcam_lightning.data.datamodule import SegmentationDataModule
from segcam_lightning.data.folder import FolderSegmentation, pair_files
from segcam_lightning.data.planted import PlantedDataModule, PlantedModalities, PlantedVolumes
from segcam_lightning.data.split import split_indices
from segcam_lightning.data.synthetic import (
    SYNTHETIC_CLASS_NAMES,
    SyntheticSegmentation,
    write_synthetic_dataset,
)
from segcam_lightning.data.synthetic3d import SYNTHETIC3D_CLASS_NAMES, SyntheticVolumes
from segcam_lightning.data.transforms import RandomFlip

__all__ = [
    "BLOG_COLORMAP",
    "SYNTHETIC3D_CLASS_NAMES",
    "SYNTHETIC_CLASS_NAMES",
    "BatchAdapter",
    "CueConfusion",
    "FolderSegmentation",
    "PlantedDataModule",
    "PlantedModalities",
    "PlantedVolumes",
    "RandomFlip",
    "SegmentationDataModule",
    "SyntheticSegmentation",
    "SyntheticVolumes",
    "color_to_mask",
    "mask_to_color",
    "pair_files",
    "split_batch",
    "split_indices",
    "write_synthetic_dataset",
]
