"""segcam-lightning: where a segmentation model looks for each class, during and after training.

``from segcam_lightning import GradCAMCallback`` (and the other names of ``__all__``: the
callbacks and their settings, the engine, the data and the module) is resolved lazily, so that
importing the engine (``segcam_lightning.cam``, plain PyTorch) does
not import Lightning or OpenCV.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "BatchAdapter",
    "CAMEngine",
    "CAMResult",
    "DisplaySpec",
    "GradCAMCallback",
    "ModalityMonitor",
    "ProbeSpec",
    "Readout",
    "SegmentationDataModule",
    "SegmentationModule",
    "ShortcutMonitor",
]

_LAZY = {
    "BatchAdapter": "segcam_lightning.data.batch",
    "CAMEngine": "segcam_lightning.cam",
    "CAMResult": "segcam_lightning.cam",
    "DisplaySpec": "segcam_lightning.callbacks",
    "GradCAMCallback": "segcam_lightning.callbacks",
    "ModalityMonitor": "segcam_lightning.callbacks",
    "ProbeSpec": "segcam_lightning.callbacks",
    "Readout": "segcam_lightning.cam",
    "SegmentationDataModule": "segcam_lightning.data",
    "SegmentationModule": "segcam_lightning.module",
    "ShortcutMonitor": "segcam_lightning.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segcam_lightning' has no attribute {name!r}")
