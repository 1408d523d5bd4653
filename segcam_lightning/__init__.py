"""segcam-lightning: where a segmentation model looks for each class, during and after training."""

__version__ = "0.1.0"
