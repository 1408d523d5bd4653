"""Audit segmentation checkpoints with per-class Grad-CAM: ``python explain.py --help``."""

from segcam_lightning.audit import main

if __name__ == "__main__":
    raise SystemExit(main())
