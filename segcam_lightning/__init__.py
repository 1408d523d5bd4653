"""segcam-lightning: where a segmentation model looks for each class, during and after training.

``from segcam_lightning import GradCAMCallback`` (and the other names of ``__all__``) is
resolved lazily, so that importing the engine (``segcam_lightning.cam``, plain PyTorch) does
not import Lightning or OpenCV.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["BatchAdapter", "GradCAMCallback", "SegmentationDataModule", "SegmentationModule"]

_LAZY = {
    "BatchAdapter": "segcam_lightning.data.batch",
    "GradCAMCallback": "segcam_lightning.callback",
    "SegmentationDataModule": "segcam_lightning.data",
    "SegmentationModule": "segcam_lightning.module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segcam_lightning' has no attribute {name!r}")
