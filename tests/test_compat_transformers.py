"""Compatibility rows: Hugging Face transformers segmentation models (docs/compatibility.md).

Tiny random-init models built from their own configs (no download): the callback with no
arguments in a tiny ``fit``, the layer it chooses, Grad-CAM parity with a naive per-class loop in
float64, and explain.py ``--config`` on a LightningCLI run. Mask2Former's output is per-query
class scores and masks, read by ``output_adapter="mask2former"`` (the callback's argument, and
explain.py's ``--output-adapter``): its row's tests are the ``test_mask2former_*`` below.
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
from segcam_lightning.cam.adapters import query_semantic_logits

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
SIZE = 32


def segformer() -> nn.Module:
    config = transformers.SegformerConfig(
        num_labels=NUM_CLASSES,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    return transformers.SegformerForSemanticSegmentation(config)


def _upernet(backbone: object, third_stage_channels: int) -> nn.Module:
    config = transformers.UperNetConfig(
        backbone_config=backbone,
        num_labels=NUM_CLASSES,
        hidden_size=16,
        pool_scales=[1, 2],
        use_auxiliary_head=True,  # its branch must not be chosen: it does not reach the logits
        auxiliary_in_channels=third_stage_channels,  # the stage it reads
        auxiliary_channels=8,
    )
    return transformers.UperNetForSemanticSegmentation(config)


STAGES = ["stage1", "stage2", "stage3", "stage4"]


def upernet_convnext() -> nn.Module:
    return _upernet(
        transformers.ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=STAGES
        ),
        third_stage_channels=24,
    )


def upernet_swin() -> nn.Module:
    return _upernet(
        transformers.SwinConfig(
            image_size=SIZE,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_features=STAGES,
        ),
        third_stage_channels=32,  # Swin doubles embed_dim per stage: 8, 16, 32, 64
    )


def dpt() -> nn.Module:
    config = transformers.DPTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=1,
        intermediate_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        num_labels=NUM_CLASSES,
        use_auxiliary_head=True,
    )
    return transformers.DPTForSemanticSegmentation(config)


#: row -> (builder, the layer the default rule chooses: the last block before the head).
ROWS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    # SegFormer's all-MLP decoder: the fused features after BatchNorm and ReLU (its dropout,
    # an identity in eval mode, gives the same tensor; the innermost name is kept).
    "segformer": (segformer, "decode_head.activation"),
    # UperNet: the FPN bottleneck's output, never the auxiliary FCN head.
    "upernet_convnext": (upernet_convnext, "decode_head.fpn_bottleneck.activation"),
    "upernet_swin": (upernet_swin, "decode_head.fpn_bottleneck.activation"),
    # DPT: the ViT's token layers ([B, N, D]) are candidates too, but the head's conv block
    # comes after them on every path.
    "dpt": (dpt, "head.head.2"),
}


def build(row: str) -> nn.Module:
    torch.manual_seed(0)
    return ROWS[row][0]()


@pytest.mark.parametrize("row", ROWS)
def test_callback_with_no_arguments_logs_cams_at_the_default_layer(
    tmp_path, caplog, row: str
) -> None:
    """Columns (a) and (b): the model's output object (a ``SemanticSegmenterOutput`` holding
    only ``logits`` in eval mode) is read by the default adapter, so no argument is needed."""
    module = UserModule(build(row), logits=lambda out: out.logits)
    fit = fit_with_callback(
        tmp_path, module, scenes(4, SIZE, NUM_CLASSES), GradCAMCallback(), caplog
    )
    layer = ROWS[row][1]
    assert f"GradCAMCallback: explaining layer {layer!r}" in fit.log
    assert fit.image_tags == {f"cam/{layer}/class_{k}" for k in range(NUM_CLASSES)}


@pytest.mark.parametrize("row", ROWS)
def test_gradcam_equals_a_naive_per_class_loop_in_float64(row: str) -> None:
    """Column (c), at the default layer (see ``compat_rows.PARITY_ATOL``)."""
    images, _ = scenes(2, SIZE, NUM_CLASSES, seed=1)
    difference = parity(build(row), images, ROWS[row][1], lambda out: out.logits)
    print(f"parity {row}: {difference:.1e}")
    assert difference <= PARITY_ATOL


@pytest.mark.parametrize("row", ROWS)
def test_explain_config_audits_a_lightningcli_run(tmp_path, row: str) -> None:
    """Column (d): the run's config.yaml and checkpoint, audited at column (b)'s layer."""
    builder, layer = ROWS[row]
    data = {"size": SIZE, "num_classes": NUM_CLASSES}
    summary = audit_a_cli_run(tmp_path, builder, data, output="logits")
    assert_audited(summary, layer, NUM_CLASSES)


# --- Mask2Former: per-query class scores and masks, read by the "mask2former" adapter --------

#: Mask2Former's row: 64² (its Swin backbone's fourth stage is 2×2 there), and the layer the
#: default rule picks with a query adapter: the pixel decoder's per-pixel embedding.
M2F_SIZE = 64
M2F_LAYER = "model.pixel_level_module.decoder.mask_projection"


def mask2former() -> nn.Module:
    """Swin backbone (embed 8, window 2, 1 block per stage), 6 queries, hidden 32."""
    swin = transformers.SwinConfig(
        image_size=M2F_SIZE,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=STAGES,
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin,
        num_labels=NUM_CLASSES,
        num_queries=6,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=1,
    )
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(config)


def test_mask2former_callback_with_the_adapter_name_logs_cams_at_the_default_layer(
    tmp_path, caplog
) -> None:
    """Columns (a) and (b): the one argument is the adapter's name."""
    module = UserModule(mask2former(), logits=query_semantic_logits)
    data = scenes(4, M2F_SIZE, NUM_CLASSES)
    callback = GradCAMCallback(output_adapter="mask2former")
    fit = fit_with_callback(tmp_path, module, data, callback, caplog)
    assert f"GradCAMCallback: explaining layer {M2F_LAYER!r}" in fit.log
    assert fit.image_tags == {f"cam/{M2F_LAYER}/class_{k}" for k in range(NUM_CLASSES)}


def test_mask2former_gradcam_equals_a_naive_per_class_loop_in_float64() -> None:
    """Column (c): the naive loop reads the same adapter (softmax over its log-scores)."""
    images, _ = scenes(2, M2F_SIZE, NUM_CLASSES, seed=1)
    difference = parity(mask2former(), images, M2F_LAYER, query_semantic_logits)
    print(f"parity mask2former: {difference:.1e}")
    assert difference <= PARITY_ATOL


def test_mask2former_explain_config_audits_a_lightningcli_run(tmp_path) -> None:
    """Column (d), with ``--output-adapter mask2former``."""
    data = {"size": M2F_SIZE, "num_classes": NUM_CLASSES}
    options = ("--output-adapter", "mask2former")
    summary = audit_a_cli_run(tmp_path, mask2former, data, "mask2former", options)
    assert_audited(summary, M2F_LAYER, NUM_CLASSES)


def test_mask2former_quality_checks_and_mistakes_run_through_the_adapter(tmp_path) -> None:
    """The audit's checks build their own engines and forwards: each reads Mask2Former's
    output through --output-adapter (the randomisation test, deletion and insertion, the
    objects-alone test, the mistakes and the modalities)."""
    data = {"size": M2F_SIZE, "num_classes": NUM_CLASSES}
    options = (
        *("--output-adapter", "mask2former"),
        *("--sanity-check", "--sanity-images", "2", "--sanity-seeds", "1"),
        *("--faithfulness", "--faithfulness-images", "2", "--faithfulness-steps", "2"),
        *("--objects-alone", "--objects-alone-images", "2"),
        *("--explain-errors", "--explain-errors-images", "1"),
        *("--modalities", "channels", "--modalities-images", "2"),
    )
    summary = audit_a_cli_run(tmp_path, mask2former, data, "mask2former", options)
    assert_audited(summary, M2F_LAYER, NUM_CLASSES)
    for key in ("sanity_check", "faithfulness", "objects_alone", "mistakes", "modalities"):
        assert summary[key], key
    assert summary["sanity_check"]["verdicts"]
    assert len(summary["modalities"]["groups"]) == 3
