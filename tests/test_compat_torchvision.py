"""Compatibility rows: torchvision's segmentation models (docs/compatibility.md).

Random-init (``weights=None, weights_backbone=None``): the callback with no arguments in a
tiny ``fit`` (the model returns a dict, whose ``"out"`` the default adapter reads), the layer
it chooses (on the main branch, never the auxiliary head), and Grad-CAM parity with a naive
per-class loop in float64. Skipped where torchvision is missing (its wheels on the package
index are CUDA builds of one torch release each; docs/compatibility.md says how these rows
were run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from compat_rows import (
    PARITY_ATOL,
    UserModule,
    assert_audited,
    audit_a_cli_run,
    fit_with_callback,
    parity,
    scenes,
)
from torch import nn

from segcam_lightning.callbacks import GradCAMCallback

segmentation = pytest.importorskip("torchvision.models.segmentation")

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
SIZE = 64  # output stride 8 (ResNet, dilated) or 16 (MobileNetV3): 8² or 4² feature maps


def fcn_resnet50() -> nn.Module:
    return segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    )


def deeplabv3_mobilenet_v3_large() -> nn.Module:
    return segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    )


def lraspp_mobilenet_v3_large() -> nn.Module:
    return segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    )


#: row -> (builder, the layer the default rule chooses).
ROWS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "fcn_resnet50": (fcn_resnet50, "classifier.2"),
    "deeplabv3_mobilenet_v3_large": (deeplabv3_mobilenet_v3_large, "classifier.3"),
    "lraspp_mobilenet_v3_large": (lraspp_mobilenet_v3_large, "backbone.4.block.3.1"),
}


def build(row: str) -> nn.Module:
    torch.manual_seed(0)
    return ROWS[row][0]()


@pytest.mark.parametrize("row", ROWS)
def test_callback_with_no_arguments_logs_cams_at_the_default_layer(
    tmp_path, caplog, row: str
) -> None:
    """Columns (a) and (b): with ``aux_loss=True`` the auxiliary head's branch does not reach
    ``out``, so the chosen layer lies on the main branch."""
    fit = fit_with_callback(
        tmp_path, UserModule(build(row)), scenes(4, SIZE, NUM_CLASSES), GradCAMCallback(), caplog
    )
    layer = ROWS[row][1]
    assert not layer.startswith("aux_classifier")
    assert f"GradCAMCallback: explaining layer {layer!r}" in fit.log
    assert fit.image_tags == {f"cam/{layer}/class_{k}" for k in range(NUM_CLASSES)}


@pytest.mark.parametrize("row", ROWS)
def test_gradcam_equals_a_naive_per_class_loop_in_float64(row: str) -> None:
    """Column (c), at the default layer (see ``compat_rows.PARITY_ATOL``)."""
    images, _ = scenes(2, SIZE, NUM_CLASSES, seed=1)
    difference = parity(build(row), images, ROWS[row][1])
    print(f"parity {row}: {difference:.1e}")
    assert difference <= PARITY_ATOL


@pytest.mark.parametrize("row", ROWS)
def test_explain_config_audits_a_lightningcli_run(tmp_path, row: str) -> None:
    """Column (d): the run's config.yaml and checkpoint, audited at column (b)'s layer."""
    builder, layer = ROWS[row]
    summary = audit_a_cli_run(tmp_path, builder, {"size": SIZE, "num_classes": NUM_CLASSES})
    assert_audited(summary, layer, NUM_CLASSES)
