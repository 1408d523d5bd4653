"""Token layers and query-based segmenters (issue 23; docs/engine.md, "Token layers and
query-based segmenters"; the rows of docs/compatibility.md's "Token layers" table).

Grad-CAM at token layers (``[B, N, C]`` with or without a class token, channels-last
``[B, d, h, w, C]``, 3-D token grids) of tiny random-init models against a naive loop (one
forward and one backward per image and class, hooks as pytorch-grad-cam keeps them) that applies
the same reshape by hand to the layer's output and to its gradient, both in float64. The
output adapters against the libraries' own post-processing, and the refusal of a token layer
whose grid cannot be inferred.

Tolerance: :data:`compat_rows.PARITY_ATOL` (1e-5 of each map's peak), derived there for
float64 maths with float32 maps. A token layout adds no rounding: the engine's grid and the
naive loop's are the same elements moved (reshape, transpose, slicing), and the gradient with
respect to the grid is the gradient with respect to the output moved the same way, so the
bound carries over unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from compat_rows import PARITY_ATOL, UserModule, fit_with_callback, scenes
from hooked import activation_and_gradient
from torch import Tensor, nn

from segcam_lightning.callbacks import GradCAMCallback
from segcam_lightning.cam import CAMEngine, candidate_layers
from segcam_lightning.cam.adapters import PromptedMask, get_output_adapter, query_semantic_logits
from segcam_lightning.cam.layers import default_layer_name
from segcam_lightning.cam.tokens import ChannelsLast, TokenGrid, infer_layout, token_grids
from segcam_lightning.errors import ConfigurationError

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
Grid = Callable[[Tensor], Tensor]


def tokens_to_grid(extra: int, *grid: int) -> Grid:
    """The hand-written reshape of the naive loop: drop ``extra`` leading tokens, channels
    first, the grid's sides."""
    return lambda t: t[:, extra:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def channels_last_to_grid(t: Tensor) -> Tensor:
    return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1))


def naive_gradcam(
    model: nn.Module,
    images: Tensor,
    layer: str,
    to_grid: Grid,
    adapter: Callable[[Any], Tensor],
    binary: bool = False,
) -> Tensor:
    """Per image and class: a forward with a hook on ``layer``, the score ``softmax`` (sigmoid
    for ``binary``) of the logits' class ``k`` averaged over pixels, a backward; ``to_grid`` on
    the output and on its gradient; weights = the gradient's spatial mean, ReLU of the
    weighted channel sum, upsampled to the input. Un-normalised ``[B, K, *S]``."""
    model = copy.deepcopy(model).eval()
    mode = "trilinear" if images.ndim == 5 else "bilinear"
    maps = []
    for image in images:
        x = image[None]
        with torch.no_grad():
            num_classes = adapter(model(x)).shape[1]
        per_class = []
        for k in range(num_classes):
            with activation_and_gradient(model, layer) as store:
                model.zero_grad()
                logits = adapter(model(x))
                probs = logits.sigmoid() if binary else F.softmax(logits, dim=1)
                probs[0, k].mean().backward()
            a, g = to_grid(store["activation"].detach()), to_grid(store["gradient"])
            weights = g.mean(dim=tuple(range(2, a.ndim)), keepdim=True)
            cam = F.relu((weights * a).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)
            per_class.append(cam[0, 0])
        maps.append(torch.stack(per_class))
    return torch.stack(maps)


def difference(ours: Tensor, reference: Tensor) -> float:
    """Largest difference after dividing both by the reference's per-map maximum; asserts
    that the reference is not blank."""
    assert ours.shape == reference.shape
    scale = reference.flatten(2).amax(dim=-1)
    assert (scale > 0).any(), "the reference maps are all zero: parity would be vacuous"
    view = scale.clamp_min(torch.finfo(scale.dtype).tiny)
    view = view.reshape(*view.shape, *(1,) * (reference.ndim - 2))
    return float(((ours.double() - reference) / view).abs().max())


def parity(
    model: nn.Module,
    images: Tensor,
    layers: dict[str, Grid],
    adapter: str | Callable[[Any], Tensor] | None = None,
    binary: bool = False,
) -> dict[str, float]:
    """The engine's Grad-CAM maps at all ``layers`` in one call against :func:`naive_gradcam`
    at each, in float64."""
    model64, images64 = copy.deepcopy(model).double().eval(), images.double()
    engine = CAMEngine(model64, list(layers), normalize="none", output_adapter=adapter)
    result = engine(images64)
    found = {}
    for name, to_grid in layers.items():
        reference = naive_gradcam(
            model64, images64, name, to_grid, get_output_adapter(adapter), binary
        )
        found[name] = difference(result.layer(name), reference)
    return found


def images(n: int, size: int, spatial_dims: int = 2, channels: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, *(size,) * spatial_dims, generator=generator)


# --- the models ------------------------------------------------------------------------------


class ViTSegmenter(nn.Module):
    """A transformers ``ViTModel`` (class token, 4×4 patches of 8 px at 32²) with a 1×1
    convolution over its patch tokens: transformers has no ViT segmentation model of its own."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=1,
            intermediate_size=16,
        )
        self.vit = transformers.ViTModel(config, add_pooling_layer=False)
        self.head = nn.Conv2d(16, NUM_CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit(x).last_hidden_state  # [B, 1 + 16, 16]
        return self.head(tokens_to_grid(1, 4, 4)(tokens))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return ViTSegmenter()


def upernet_swin() -> nn.Module:
    pytest.importorskip("transformers")
    from test_compat_transformers import upernet_swin as build

    torch.manual_seed(0)
    return build()


def segformer() -> nn.Module:
    pytest.importorskip("transformers")
    from test_compat_transformers import segformer as build

    torch.manual_seed(0)
    return build()


def mask2former() -> nn.Module:
    """Mask2Former with a Swin backbone (embed 8, window 2), 6 queries, hidden 32 (its pixel
    decoder's GroupNorm has 32 groups), at 64²: masks at 16²."""
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
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


def swin_unetr() -> nn.Module:
    """MONAI SwinUNETR 3-D, feature 12, one block per stage, 32³ (BatchNorm: InstanceNorm
    needs more than one voxel at 1/32, which would take 64³)."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return nets.SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=12,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        spatial_dims=3,
        norm_name="batch",
    )


def unetr() -> nn.Module:
    """MONAI UNETR 3-D at 32³: its ViT's tokens are a 2×2×2 grid of 16³ patches."""
    nets = pytest.importorskip("monai.networks.nets")
    pytest.importorskip("einops")
    torch.manual_seed(0)
    return nets.UNETR(
        1, 2, img_size=32, feature_size=8, hidden_size=32, mlp_dim=32, num_heads=1, spatial_dims=3
    )


def mask2former_logits(out: Any) -> Tensor:
    return query_semantic_logits(out)


M2F_STAGE1 = "model.pixel_level_module.encoder.hidden_states_norms.stage1"
M2F_BLOCK = "model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.mlp"
M2F_DEFAULT = "model.pixel_level_module.encoder.swin.embeddings.norm"
#: The default rule's layer with a query adapter: the per-pixel embedding the masks are read from.
M2F_PIXEL = "model.pixel_level_module.decoder.mask_projection"

#: row -> (builder, input (batch, size, spatial dims, channels), adapter, {layer: the naive
#: loop's hand reshape}, the layout the engine infers for each layer).
ROWS: dict[str, tuple[Any, ...]] = {
    "vit": (
        vit,
        (2, 32, 2, 3),
        None,
        {"vit.layers.0": tokens_to_grid(1, 4, 4), "vit.layernorm": tokens_to_grid(1, 4, 4)},
        [TokenGrid(4, 4, extra=1), TokenGrid(4, 4, extra=1)],
    ),
    "swin": (
        upernet_swin,
        (2, 32, 2, 3),
        "logits",
        {
            "backbone.hidden_states_norms.stage1": tokens_to_grid(0, 8, 8),
            "backbone.swin.encoder.layers.1.blocks.0.layernorm_after": tokens_to_grid(0, 4, 4),
        },
        [TokenGrid(8, 8), TokenGrid(4, 4)],
    ),
    "segformer": (
        segformer,
        (2, 32, 2, 3),
        "logits",
        {
            "segformer.stages.0.blocks.0": tokens_to_grid(0, 8, 8),
            "segformer.stages.1.layer_norm": tokens_to_grid(0, 4, 4),
        },
        [TokenGrid(8, 8), TokenGrid(4, 4)],
    ),
    "mask2former": (
        mask2former,
        (2, 64, 2, 3),
        "mask2former",
        {M2F_DEFAULT: tokens_to_grid(0, 16, 16), M2F_BLOCK: tokens_to_grid(0, 8, 8)},
        [TokenGrid(16, 16), TokenGrid(8, 8)],
    ),
    "swin_unetr": (
        swin_unetr,
        (1, 32, 3, 1),
        None,
        {"swinViT.layers2.0.blocks.0": channels_last_to_grid},
        [ChannelsLast()],
    ),
    "unetr": (
        unetr,
        (1, 32, 3, 1),
        None,
        {"vit.blocks.1": tokens_to_grid(0, 2, 2, 2)},
        [TokenGrid(2, 2, depth=2)],
    ),
}


def _adapter(name: str | None) -> str | Callable[[Any], Tensor] | None:
    return (lambda out: out.logits) if name == "logits" else name


@pytest.mark.parametrize("row", ROWS)
def test_gradcam_at_token_layers_equals_a_naive_loop_in_float64(row: str) -> None:
    """Column (c) of the token-layer table: every listed layer in one engine call."""
    build, (n, size, dims, channels), adapter, layers, layouts = ROWS[row]
    model, x = build(), images(n, size, dims, channels)
    infos = {info.name: info for info in candidate_layers(model, x[:1], _adapter(adapter))}
    assert [infos[name].layout for name in layers] == layouts
    found = parity(model, x, layers, _adapter(adapter))
    print(f"parity {row}: " + ", ".join(f"{k} {v:.1e}" for k, v in found.items()))
    assert max(found.values()) <= PARITY_ATOL


@pytest.mark.parametrize("row", ["vit"])
def test_the_default_rule_treats_token_layers_like_any_other(row: str) -> None:
    """ViT: the last layer on every path to the logits is the final LayerNorm's tokens.
    (Mask2Former's query adapter has a rule of its own: tests/test_tokens_product.py.)"""
    build, (_, size, dims, channels), adapter, *_ = ROWS[row]
    expected = {"vit": "vit.layernorm", "mask2former": M2F_DEFAULT}[row]
    example = images(1, size, dims, channels)
    assert default_layer_name(build(), example, adapter) == expected
    info = next(i for i in candidate_layers(build(), example, adapter) if i.name == expected)
    grid = {"vit": (1, 16, 4, 4), "mask2former": (1, 8, 16, 16)}[row]
    assert info.grid_shape == grid and info.output_shape == (
        1,
        grid[2] * grid[3] + (row == "vit"),
        grid[1],
    )


def test_downstream_sees_the_original_output() -> None:
    """The handed tensor is rebuilt from the grid and the class token: the logits are the
    model's own, bit for bit, and the grid is what gradients are taken at."""
    model, x = vit().eval(), images(2, 32)
    with torch.no_grad():
        plain = model(x)
    result = CAMEngine(model, ["vit.layers.0"], method="gradcam")(x)
    assert torch.equal(result.logits, plain)
    eigen = CAMEngine(model, ["vit.layers.0"], method="eigencam")(x)
    assert eigen.cams.shape == (2, 1, NUM_CLASSES, 32, 32)


def test_mask2former_stage_outputs_have_zero_gradcam_weights() -> None:
    """Each Swin stage output enters Mask2Former's pixel decoder through a 1×1 convolution and
    a GroupNorm of one channel per group, whose backward removes every channel's spatial mean:
    Grad-CAM's weights there (the gradient's spatial mean) are zero in exact arithmetic, and the
    maps are rounding noise, 1e-15 of the maps at the patch embedding or less. HiResCAM, which
    multiplies gradient and activation position by position, is not blank there."""
    model, x = mask2former().double(), images(2, 64).double()

    def raw_max(layer: str, method: str) -> float:
        engine = CAMEngine(
            model, [layer], method=method, normalize="none", output_adapter="mask2former"
        )
        return engine(x).raw_max.max().item()

    raw = {(layer, m): raw_max(layer, m) for layer in (M2F_DEFAULT, M2F_STAGE1) for m in METHODS}
    print(f"mask2former raw maxima: {raw}")
    assert raw[M2F_STAGE1, "gradcam"] <= 1e-15 * raw[M2F_DEFAULT, "gradcam"]
    assert raw[M2F_STAGE1, "hirescam"] >= 1e-6 * raw[M2F_DEFAULT, "hirescam"]


METHODS = ("gradcam", "hirescam")


#: row -> the layer the callback is given (Mask2Former: none, the default rule's), for
#: :func:`test_the_callback_logs_cams_at_a_token_layer`.
CALLBACK_LAYERS = {
    "vit": "vit.layers.0",
    "swin": "backbone.swin.encoder.layers.1.blocks.0.layernorm_after",
    "segformer": "segformer.stages.1.layer_norm",
    "mask2former": None,
}


@pytest.mark.parametrize("row", CALLBACK_LAYERS)
def test_the_callback_logs_cams_at_a_token_layer(tmp_path, caplog, row: str) -> None:
    """The callback in a tiny ``fit`` (compat_rows.fit_with_callback) at a token layer it is
    given, or for Mask2Former at the default rule's layer with the adapter by its name; one
    CAM image per class read back."""
    build, (_, size, dims, channels), adapter, *_ = ROWS[row]
    layer = CALLBACK_LAYERS[row]
    logits = get_output_adapter(_adapter(adapter))
    callback = GradCAMCallback(
        layers=[layer] if layer else None,
        output_adapter="mask2former" if adapter == "mask2former" else None,
    )
    module = UserModule(build(), logits=logits)
    data = scenes(4, size, NUM_CLASSES, channels, dims)
    fit = fit_with_callback(tmp_path, module, data, callback, caplog)
    shown = layer or M2F_PIXEL
    assert fit.image_tags == {f"cam/{shown}/class_{k}" for k in range(NUM_CLASSES)}


# --- the output adapters ---------------------------------------------------------------------


def test_mask2former_adapter_matches_the_image_processor() -> None:
    """Exp of the adapter's log-scores equals ``post_process_semantic_segmentation``'s scores
    before its argmax (taken with ``return_segmentation_scores=True``, no target size), given
    the same mask logits: the processor upsamples them to 384² first, so the adapter is fed
    those. Its argmax is the library's segmentation; the engine's softmax of it is the scores
    normalised over the classes."""
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "Mask2FormerImageProcessorPil", None)
    processor = (processor_class or transformers.Mask2FormerImageProcessor)()
    model, x = mask2former().eval(), images(2, 64)
    with torch.no_grad():
        out = model(x)
    library = processor.post_process_semantic_segmentation(out, return_segmentation_scores=True)
    scores = torch.stack([item.segmentation_scores for item in library])
    masks = F.interpolate(out.masks_queries_logits, size=(384, 384), mode="bilinear")
    same = SimpleNamespace(
        class_queries_logits=out.class_queries_logits, masks_queries_logits=masks
    )
    ours = query_semantic_logits(same)
    assert ours.shape == scores.shape == (2, NUM_CLASSES, 384, 384)
    assert float((ours.exp() - scores).abs().max()) <= 1e-5
    assert torch.equal(ours.argmax(dim=1), torch.stack([item.segmentation for item in library]))
    normalised = scores / scores.sum(dim=1, keepdim=True)
    assert float((ours.softmax(dim=1) - normalised).abs().max()) <= 1e-5
    # The engine reads the model's own 1/4-resolution logits through the named adapter.
    result = CAMEngine(model, [M2F_BLOCK], output_adapter="mask2former")(x)
    assert result.logits.shape == (2, NUM_CLASSES, 16, 16)
    assert result.cams.shape == (2, 1, NUM_CLASSES, 64, 64)
    assert result.output_kind == "multiclass"


class PromptedToy(nn.Module):
    """SAM-shaped output for one prompt: three mask logits ``[B, 1, 3, h, w]`` and their
    predicted IoUs ``[B, 1, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.masks = nn.Conv2d(8, 3, 3, padding=1)
        self.iou = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.body(x)
        return {
            "pred_masks": self.masks(features)[:, None],
            "iou_scores": self.iou(features.mean(dim=(2, 3)))[:, None],
        }


def test_sam_adapter_explains_the_best_mask_as_a_binary_output() -> None:
    torch.manual_seed(0)
    model, x = PromptedToy(), images(2, 16)
    result = CAMEngine(model, ["body.1"], output_adapter="sam")(x)
    assert result.output_kind == "binary" and result.classes == (0,)
    out = model(x)
    best = out["iou_scores"][:, 0].argmax(dim=1)
    assert torch.equal(result.logits, out["pred_masks"][torch.arange(2), 0, best][:, None])
    found = parity(model, x, {"body.1": lambda t: t}, "sam", binary=True)
    assert found["body.1"] <= PARITY_ATOL
    fixed = PromptedMask(index=2)(out)
    assert torch.equal(fixed, out["pred_masks"][:, 0, 2:3])
    with pytest.raises(ValueError, match=r"no `iou_scores` to choose one by"):
        PromptedMask()(out["pred_masks"][:, 0])
    with pytest.raises(TypeError, match=r"adapter names \['default', 'mask2former'"):
        CAMEngine(model, ["body.1"], output_adapter="mask3former")


# --- refusals and explicit reshapes ----------------------------------------------------------


class ManyExtraTokens(nn.Module):
    """Patch tokens (4×4 of 8 px at 32²) behind 12 learnt extra tokens: more than inference
    considers, so the grid of ``mixer`` cannot be inferred."""

    def __init__(self, extra: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.extra = nn.Parameter(torch.randn(1, extra, 8))
        self.mixer = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.extra.expand(x.shape[0], -1, -1), patches], dim=1)
        tokens = self.mixer(tokens)
        tokens = tokens + tokens[:, :1]  # the first extra token reaches every patch
        return self.head(tokens_to_grid(self.extra.shape[1], 4, 4)(tokens))


def test_a_token_layer_whose_grid_cannot_be_inferred_is_refused_at_the_first_call() -> None:
    torch.manual_seed(0)
    model, x = ManyExtraTokens(), images(2, 32)
    engine = CAMEngine(model, ["mixer"])
    with pytest.raises(
        ValueError,
        match=r"Layer 'mixer' \(Linear\) returned a token sequence \[2, 28, 8\] for an input "
        r"\[2, 3, 32, 32\], and the engine cannot prove its grid: .*Pass `reshape=\{'mixer': "
        r"TokenGrid\(height=h, width=w, extra=n\)\}` with n \+ h·w = 28",
    ):
        engine(x)
    assert "mixer" not in {info.name for info in candidate_layers(model, x)}
    grid = TokenGrid(height=4, width=4, extra=12)
    found = parity_with(model, x, {"mixer": grid}, tokens_to_grid(12, 4, 4))
    assert found <= PARITY_ATOL
    # A callable that only re-indexes gives the same maps; it is inverted by its transpose.
    told = CAMEngine(model, ["mixer"], reshape={"mixer": grid})(x).cams
    by_hand = CAMEngine(model, ["mixer"], reshape={"mixer": tokens_to_grid(12, 4, 4)})(x).cams
    assert torch.equal(told, by_hand)


def test_the_callback_refuses_it_at_setup(tmp_path, caplog) -> None:
    """The callback's setup runs one engine call on a probe image: the refusal comes there,
    before any training step, with the ``reshape=`` to pass."""
    torch.manual_seed(0)
    module = UserModule(ManyExtraTokens())
    callback = GradCAMCallback(layers=["mixer"])
    with pytest.raises(ConfigurationError, match=r"cannot prove its grid: .*layers=\{'mixer'"):
        fit_with_callback(tmp_path, module, scenes(4, 32, NUM_CLASSES), callback, caplog)


def parity_with(model: nn.Module, x: Tensor, reshape: dict[str, Any], to_grid: Grid) -> float:
    (layer,) = reshape
    model64, x64 = copy.deepcopy(model).double(), x.double()
    ours = CAMEngine(model64, [layer], normalize="none", reshape=reshape)(x64).cams[:, 0]
    reference = naive_gradcam(model64, x64, layer, to_grid, lambda out: out)
    return difference(ours, reference)


def test_reshape_errors() -> None:
    torch.manual_seed(0)
    model, x = ManyExtraTokens(), images(2, 32)
    with pytest.raises(ValueError, match=r"No layer named 'mixr'"):
        CAMEngine(model, ["mixer"], reshape={"mixr": "channels_last"})
    with pytest.raises(ValueError, match=r"Expected reshape\['mixer'\] to be one of"):
        CAMEngine(model, ["mixer"], reshape={"mixer": "tokens"})
    with pytest.raises(TypeError, match=r"Expected reshape\['mixer'\] to be a TokenGrid"):
        CAMEngine(model, ["mixer"], reshape={"mixer": 4})
    wrong = CAMEngine(model, ["mixer"], reshape={"mixer": TokenGrid(4, 4, extra=1)})
    with pytest.raises(
        ValueError,
        match=r"reshape\['mixer'\] = TokenGrid\(height=4, width=4, extra=1\) does not fit layer "
        r"'mixer' \(Linear\), which returned \[2, 28, 8\] for an input \[2, 3, 32, 32\]: "
        r"N = 28 is not extra \+ 4·4",
    ):
        wrong(x)
    doubled = CAMEngine(
        model, ["mixer"], reshape={"mixer": lambda t: 2 * tokens_to_grid(12, 4, 4)(t)}
    )
    with pytest.raises(ValueError, match=r"is not a re-indexing of the output"):
        doubled(x)


def test_layout_inference() -> None:
    """The rule on shapes alone (no model): class and register tokens, channels-last grids,
    3-D grids, and what is left to ``reshape=``."""
    assert infer_layout((2, 197, 768), (224, 224)) == TokenGrid(14, 14, extra=1)
    assert infer_layout((2, 201, 768), (224, 224)) == TokenGrid(14, 14, extra=5)
    assert infer_layout((2, 128, 8), (32, 64)) == TokenGrid(8, 16)
    assert infer_layout((2, 8, 8, 96), (32, 32)) == ChannelsLast()
    assert infer_layout((2, 4, 4, 4, 48), (32, 32, 32)) == ChannelsLast()
    assert infer_layout((2, 64, 8, 8), (32, 32)) != ChannelsLast()  # channels-first wins
    assert infer_layout((2, 512, 8), (32, 32, 32)) == TokenGrid(8, 8, depth=8)
    assert infer_layout((2, 6, 32), (64, 64)) is None  # 6 queries are no 2×2 grid + 2
    assert infer_layout((2, 1, 64), (32, 32)) is None  # one token: no grid to explain
    assert infer_layout((2, 100, 256), (512, 512)) is None  # Mask2Former's 100 queries


def test_no_two_grids_fit_one_token_count() -> None:
    """docs/engine.md's claim, for every 2-D input with even sides up to 96: a token count with
    two grids would be some grid's positions plus at most 8 extra tokens, and none has two."""
    for height in range(2, 97, 2):
        for width in range(height, 97, 2):
            for p in range(1, height + 1):
                if height % p or width % p:
                    continue
                cells = (height // p) * (width // p)
                for n in range(cells, cells + 9):
                    assert len(token_grids((1, n, 8), (height, width))) <= 1, (height, width, n)
