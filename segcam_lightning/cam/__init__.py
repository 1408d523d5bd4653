"""CAM engine: per-class class activation maps for segmentation, all classes from one forward.

Images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]`` (3-D models) alike: maps are
``[B, L, K, *spatial]``. Imports torch only. The pieces:

- :class:`CAMEngine` / :class:`CAMResult` (``engine.py``): hooks, one forward, gradients for all
  classes and layers, state restore.
- methods (``methods.py``): :class:`GradCAM`, :class:`HiResCAM`, :class:`XGradCAM`,
  :class:`GradCAMpp`, :class:`LayerCAM`, :class:`ScoreCAM`, :class:`EigenCAM`,
  :class:`GuidedGradCAM`.
- targets (``targets.py``): by name (:data:`TARGETS`: ``"softmax_mean"``, ``"logit_region"``,
  ``"logit_margin"``, ``"gt_region"``), :class:`PixelTarget`, :class:`BoxTarget`, a
  :class:`Target` of your own, or any callable.
- :class:`Readout` (``readout.py``): how the outputs are read (multi-class, binary,
  multi-label; the sigmoid threshold; the mask label that is no class).
- :func:`find_layer`, :func:`candidate_layers` (``layers.py``); token layers (``[B, N, C]``,
  channels-last grids) are read as their ``[B, C, h, w]`` grid, inferred or given as a
  :class:`TokenGrid` (``tokens.py``); output adapters by name (``adapters.py``:
  ``"mask2former"``, ``"sam"``, ...).
- :func:`sliding_window_cams` (``sliding.py``): CAMs of inputs too big for one forward, over
  MONAI-style sliding windows, stitched like the logits.
- pure maths in the module :mod:`segcam_lightning.cam.functional` (``from segcam_lightning.cam
  import functional as FC``), among them ``FC.predicted_masks`` and ``FC.class_regions`` (what
  the model predicts, and ground truth as per-class regions, for each output kind).

Example:
    >>> import torch
    >>> from segcam_lightning.models import UNet
    >>> from segcam_lightning.cam import CAMEngine
    >>> net = UNet(num_classes=3, base_width=4)
    >>> result = CAMEngine(net, ["e4.conv.conv.5", "d4.conv.conv.5"])(torch.rand(2, 3, 32, 32))
    >>> result.cams.shape  # [B, L, K, H, W]
    torch.Size([2, 2, 3, 32, 32])
"""

from segcam_lightning.cam import functional
from segcam_lightning.cam.engine import CAMEngine, CAMResult
from segcam_lightning.cam.layers import candidate_layers, find_layer
from segcam_lightning.cam.methods import (
    METHODS,
    CustomCAM,
    EigenCAM,
    GradCAM,
    GradCAMpp,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    get_method,
)
from segcam_lightning.cam.readout import Readout
from segcam_lightning.cam.sliding import sliding_window_cams
from segcam_lightning.cam.targets import TARGETS, BoxTarget, PixelTarget, Target, get_target
from segcam_lightning.cam.tokens import TokenGrid

__all__ = [
    "METHODS",
    "TARGETS",
    "BoxTarget",
    "CAMEngine",
    "CAMResult",
    "CustomCAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMpp",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "PixelTarget",
    "Readout",
    "ScoreCAM",
    "Target",
    "TokenGrid",
    "XGradCAM",
    "candidate_layers",
    "find_layer",
    "functional",
    "get_method",
    "get_target",
    "sliding_window_cams",
]
