"""CAM engine: per-class class activation maps for segmentation, all classes from one forward.

Images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]`` (3-D models) alike: maps are
``[B, L, K, *spatial]``. Imports torch only. The pieces:

- :class:`CAMEngine` / :class:`CAMResult` (``engine.py``): hooks, one forward, gradients for all
  classes and layers, state restore.
- methods (``methods.py``): :class:`GradCAM`, :class:`HiResCAM`, :class:`XGradCAM`,
  :class:`GradCAMpp`, :class:`LayerCAM`, :class:`ScoreCAM`, :class:`EigenCAM`,
  :class:`GuidedGradCAM`.
- targets (``targets.py``): :class:`SoftmaxMean`, :class:`LogitRegion`, :class:`LogitMargin`,
  :class:`GTRegion`, :class:`PixelTarget`, :class:`BoxTarget`, or any callable.
- :func:`find_layer`, :func:`candidate_layers` (``layers.py``).
- pure maths in :mod:`segcam_lightning.cam.functional`, among them :func:`predicted_masks` and
  :func:`class_regions` (what the model predicts, and ground truth as per-class regions, for
  each output kind in :data:`OUTPUT_KINDS`).

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
from segcam_lightning.cam.engine import GRAD_MODES, CAMEngine, CAMResult, default_output_adapter
from segcam_lightning.cam.functional import (
    NORMALIZE_MODES,
    OUTPUT_KINDS,
    class_regions,
    normalize_cams,
    predicted_classes,
    predicted_masks,
    resolve_output_kind,
)
from segcam_lightning.cam.layers import LayerInfo, candidate_layers, default_layer_name, find_layer
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
from segcam_lightning.cam.targets import (
    TARGETS,
    BoxTarget,
    CallableTarget,
    GTRegion,
    LogitMargin,
    LogitRegion,
    PixelTarget,
    RegionTarget,
    SoftmaxMean,
    Target,
    TargetOutput,
    get_target,
)

__all__ = [
    "GRAD_MODES",
    "METHODS",
    "NORMALIZE_MODES",
    "OUTPUT_KINDS",
    "TARGETS",
    "BoxTarget",
    "CAMEngine",
    "CAMResult",
    "CallableTarget",
    "CustomCAM",
    "EigenCAM",
    "GTRegion",
    "GradCAM",
    "GradCAMpp",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "LayerInfo",
    "LogitMargin",
    "LogitRegion",
    "PixelTarget",
    "Readout",
    "RegionTarget",
    "ScoreCAM",
    "SoftmaxMean",
    "Target",
    "TargetOutput",
    "XGradCAM",
    "candidate_layers",
    "class_regions",
    "default_layer_name",
    "default_output_adapter",
    "find_layer",
    "functional",
    "get_method",
    "get_target",
    "normalize_cams",
    "predicted_classes",
    "predicted_masks",
    "resolve_output_kind",
]
