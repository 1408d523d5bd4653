"""Compatibility rows: segmentation_models_pytorch (docs/compatibility.md).

``Unet``, ``FPN`` and ``DeepLabV3Plus`` on a random-init ResNet-18 encoder
(``encoder_weights=None``): the callback with no arguments in a tiny ``fit``, the layer it
chooses, and Grad-CAM parity with a naive per-class loop in float64. Skipped where
segmentation_models_pytorch is missing (it needs torchvision, whose wheels on the package
index are CUDA builds; docs/compatibility.md says how these rows were run).
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

smp = pytest.importorskip("segmentation_models_pytorch")

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
SIZE = 64  # smp's encoders need sides divisible by 32


def unet() -> nn.Module:
    return smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)


def fpn() -> nn.Module:
    return smp.FPN("resnet18", encoder_weights=None, classes=NUM_CLASSES)


def deeplabv3plus() -> nn.Module:
    return smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=NUM_CLASSES)


#: row -> (builder, the layer the default rule chooses).
ROWS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "unet_resnet18": (unet, "decoder.blocks.4.conv2.2"),
    "fpn_resnet18": (fpn, "decoder.merge"),
    "deeplabv3plus_resnet18": (deeplabv3plus, "decoder.block2.2"),
}


def build(row: str) -> nn.Module:
    torch.manual_seed(0)
    return ROWS[row][0]()


@pytest.mark.parametrize("row", ROWS)
def test_callback_with_no_arguments_logs_cams_at_the_default_layer(
    tmp_path, caplog, row: str
) -> None:
    """Columns (a) and (b)."""
    fit = fit_with_callback(
        tmp_path, UserModule(build(row)), scenes(4, SIZE, NUM_CLASSES), GradCAMCallback(), caplog
    )
    layer = ROWS[row][1]
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
