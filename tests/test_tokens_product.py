"""Token layers and output adapters through the product (issue 23): the callbacks and
``networks`` take adapter names, GradCAMCallback's ``layers`` mapping carries a token layer's
layout (and its refusal at setup says so in the callback's terms), LightningCLI configs take
both, explain.py's ``--output-adapter``/``--reshape``/``--list-layers``, and the default layer
of a mask-classification model (Mask2Former) with a query adapter."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from compat_rows import UserModule, fit_with_callback, scenes
from test_cam_tokens import ManyExtraTokens, images, mask2former

from segcam_lightning.audit import main
from segcam_lightning.callbacks import GradCAMCallback, ShortcutMonitor
from segcam_lightning.cam import CAMEngine
from segcam_lightning.cam.adapters import query_semantic_logits
from segcam_lightning.cam.layers import default_layer_name
from segcam_lightning.cam.tokens import (
    ChannelsLast,
    TokenGrid,
    as_layout,
    layout_spec,
    parse_layout,
)
from segcam_lightning.data import write_synthetic_dataset
from segcam_lightning.errors import ConfigurationError
from segcam_lightning.networks import example_logits

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
M2F_PIXEL = "model.pixel_level_module.decoder.mask_projection"
M2F_EMBEDDING = "model.pixel_level_module.encoder.swin.embeddings.norm"


# --- layouts as short strings ----------------------------------------------------------------


def test_layout_specs_read_back() -> None:
    assert parse_layout("14x14+1") == TokenGrid(14, 14, extra=1)
    assert parse_layout("2x4x4") == TokenGrid(4, 4, depth=2)
    assert parse_layout(" Channels-Last ") == ChannelsLast()
    for layout in (TokenGrid(14, 14, extra=1), TokenGrid(4, 4, depth=2), ChannelsLast()):
        assert parse_layout(layout_spec(layout)) == layout
    assert as_layout("4x4+12", "mixer") == TokenGrid(4, 4, extra=12)
    with pytest.raises(ValueError, match=r"Expected a layout 'HxW' or 'HxW\+E'"):
        parse_layout("14*14")


# --- adapter names in the callbacks ----------------------------------------------------------


def test_the_callbacks_resolve_adapter_names_at_construction() -> None:
    assert GradCAMCallback(output_adapter="Mask2Former").output_adapter is query_semantic_logits
    assert ShortcutMonitor(output_adapter="mask-former").output_adapter is query_semantic_logits
    for make in (GradCAMCallback, ShortcutMonitor):
        with pytest.raises(ConfigurationError, match=r"unknown `output_adapter` name 'mask2'"):
            make(output_adapter="mask2")
    with pytest.raises(TypeError, match=r"adapter names \['default', 'mask2former'"):
        GradCAMCallback(output_adapter=3)


def test_example_logits_takes_an_adapter_name() -> None:
    model = mask2former()
    logits = example_logits(model, images(1, 64), "mask2former")
    assert logits.shape == (1, NUM_CLASSES, 16, 16)


# --- reshape through the callback's layers ---------------------------------------------------


def test_the_layers_mapping_gives_the_callback_a_layout(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    module = UserModule(ManyExtraTokens())
    callback = GradCAMCallback(layers={"model.mixer": "4x4+12"})
    assert callback.layers == ["model.mixer"]
    fit = fit_with_callback(tmp_path, module, scenes(4, 32, NUM_CLASSES), callback, caplog)
    assert fit.image_tags == {f"cam/model.mixer/class_{k}" for k in range(NUM_CLASSES)}


def test_a_refused_layout_names_the_fix_in_the_callbacks_terms(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    module = UserModule(ManyExtraTokens())
    wrong = GradCAMCallback(layers={"model.mixer": "4x4+1"})
    data = scenes(4, 32, NUM_CLASSES)
    with pytest.raises(ConfigurationError) as refused:
        fit_with_callback(tmp_path, module, data, wrong, caplog)
    message = str(refused.value)
    assert "GradCAMCallback could not compute CAMs at setup: reshape['mixer']" in message
    assert "N = 28 is not extra + 4·4" in message
    assert "`layers={'model.mixer': 'HxW+E'}` with E + H·W = 28" in message
    assert "CAMEngine" not in message
    with pytest.raises(ValueError, match=r"GradCAMCallback `layers`: Expected reshape\['a'\]"):
        GradCAMCallback(layers={"a": "tokens"})


# --- LightningCLI configs --------------------------------------------------------------------


def test_a_lightningcli_config_takes_adapter_names_and_layouts(tmp_path, capsys) -> None:
    from test_cli import ROOT

    from segcam_lightning.cli import build_cli

    config = tmp_path / "tokens.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            trainer:
              callbacks:
                - class_path: segcam_lightning.callbacks.GradCAMCallback
                  init_args:
                    layers: {d4.conv.conv.5: channels_first, e4.conv.conv.5: 4x4+1}
                    output_adapter: mask2former
                - class_path: segcam_lightning.callbacks.ShortcutMonitor
                  init_args:
                    output_adapter: sam
            """
        )
    )
    synthetic = str(ROOT / "configs/synthetic.yaml")
    cli = build_cli(["--config", synthetic, "--config", str(config)], run=False)
    (gradcam,) = [c for c in cli.trainer.callbacks if isinstance(c, GradCAMCallback)]
    (shortcut,) = [c for c in cli.trainer.callbacks if isinstance(c, ShortcutMonitor)]
    assert gradcam.output_adapter is query_semantic_logits
    assert gradcam.reshape == {"e4.conv.conv.5": TokenGrid(4, 4, extra=1)} | {
        "d4.conv.conv.5": parse_layout("channels_first")
    }
    assert type(shortcut.output_adapter).__name__ == "PromptedMask"
    args = ["fit", "--config", synthetic, f"--trainer.default_root_dir={tmp_path}"]
    args += ["--trainer.callbacks.output_adapter=mask2formr"]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown `output_adapter` name 'mask2formr'; the names are ['default'" in err
    assert "Traceback" not in err


# --- explain.py ------------------------------------------------------------------------------

TOKENS = '''
    import torch
    from torch import nn


    class ManyExtraTokens(nn.Module):
        """4x4 patch tokens of 8 px behind 12 extra tokens (a grid the engine cannot infer)."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, stride=8)
            self.extra = nn.Parameter(torch.zeros(1, 12, 8))
            self.mixer = nn.Linear(8, 8)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            patches = self.embed(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.extra.expand(x.shape[0], -1, -1), patches], dim=1)
            tokens = self.mixer(tokens)
            grid = tokens[:, 12:].transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
            return self.head(grid)


    def build():
        return ManyExtraTokens()
'''


@pytest.fixture(scope="module")
def token_project(tmp_path_factory):
    """``(--model spec, weights, data folder)`` of a file network with a token layer."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "tokens_net.py").write_text(textwrap.dedent(TOKENS))
    torch.manual_seed(0)
    weights = {
        "embed.weight": torch.randn(8, 3, 8, 8) * 0.1,
        "embed.bias": torch.zeros(8),
        "extra": torch.randn(1, 12, 8),
        "mixer.weight": torch.randn(8, 8),
        "mixer.bias": torch.zeros(8),
        "head.weight": torch.randn(3, 8, 1, 1),
        "head.bias": torch.zeros(3),
    }
    torch.save(weights, folder / "tokens.pt")
    data = write_synthetic_dataset(folder / "weeds", 2, 32)
    return f"{folder / 'tokens_net.py'}:build", folder / "tokens.pt", data


def explain(*args, out=None):
    """explain.py in this process; its exit status (argument errors exit 2 from the parser)."""
    extra = ["--out", str(out), "--quiet", "--num-workers", "0"] if out is not None else []
    try:
        return main([*map(str, args), *extra])
    except SystemExit as stop:
        return stop.code


def test_explain_reshape_audits_a_token_layer(token_project, tmp_path, capsys) -> None:
    spec, weights, data = token_project
    base = ["--model", spec, "--checkpoint", weights, "--data", data, "--size", 32]
    out = tmp_path / "refused"
    assert explain(*base, "--layers", "mixer", out=out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists(), err
    assert "cannot prove its grid" in err and "Pass --reshape mixer=HxW+E with E + H·W = 28" in err
    out = tmp_path / "audit"
    assert explain(*base, "--layers", "mixer", "--reshape", "mixer=4X4+12", out=out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["reshape"] == ["mixer=4x4+12"]
    assert summary["settings"]["output_adapter"] is None
    assert summary["counts"]["processed"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output-adapter", "mask3former"], r"--output-adapter: expected one of default, mask2"),
        (["--reshape", "mixer"], r"expected LAYER=SPEC \(e\.g\. encoder\.layer\.3=14x14\+1\)"),
        (["--reshape", "mixer=14*14"], r"Expected a layout 'HxW' or 'HxW\+E'"),
        (["--reshape", "embed=4x4"], r"--reshape embed=4x4: embed is not explained"),
    ],
)  # fmt: skip
def test_explain_token_options_refuse_in_one_line(token_project, tmp_path, capsys, args, message):
    spec, weights, data = token_project
    out = tmp_path / "out"
    base = ["--model", spec, "--checkpoint", weights, "--data", data, "--size", 32]
    assert explain(*base, "--layers", "mixer", *args, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("explain.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_list_layers_shows_a_token_layers_grid(token_project, capsys) -> None:
    spec, weights, _ = token_project
    argv = ["--model", spec, "--checkpoint", weights, "--size", 32, "--list-layers"]
    assert explain(*argv) == 0
    listing = capsys.readouterr().out
    # The mixer's 28 tokens fit no inferable grid, so it is not listed; the embed's are.
    assert "mixer" not in listing.split("Use them")[0].split("output shape")[1]
    line = next(row for row in listing.splitlines() if row.strip().startswith("embed "))
    assert "[1, 8, 4, 4]" in line


def test_list_layers_shows_layout_and_grid() -> None:
    from segcam_lightning.audit.cli import _shape_column
    from segcam_lightning.cam.layers import LayerInfo

    info = LayerInfo("vit.layernorm", "LayerNorm", (1, 17, 16), layout=TokenGrid(4, 4, extra=1))
    assert _shape_column(info) == "[1, 17, 16] as 4x4+1 -> [1, 16, 4, 4]"
    assert _shape_column(LayerInfo("c", "Conv2d", (1, 8, 4, 4))) == "[1, 8, 4, 4]"


# --- the default layer of a mask-classification model ----------------------------------------


def test_mask2former_default_layer_is_the_per_pixel_embedding_and_not_blank() -> None:
    """With a query adapter the rule names the pixel decoder's ``mask_projection`` (the
    embedding every query's mask is read from) instead of the patch embedding's norm, the
    only layer on every path. Its Grad-CAM maps are not blank, unlike the stage outputs'
    (rounding noise, 1e-15 of the patch embedding's, docs/engine.md): each map's maximum is
    over 1e-3 of the patch embedding's, and a quarter or more of its pixels are positive."""
    model, x = mask2former().double().eval(), images(2, 64).double()
    assert default_layer_name(model, x[:1], "mask2former") == M2F_PIXEL

    def maps(layer: str) -> torch.Tensor:
        engine = CAMEngine(model, [layer], normalize="none", output_adapter="mask2former")
        return engine(x).cams[:, 0].double()

    pixel, embedding = maps(M2F_PIXEL), maps(M2F_EMBEDDING)
    ratio = pixel.flatten(2).amax(-1) / embedding.flatten(2).amax(-1)
    positive = (pixel > 0).double().flatten(2).mean(-1)
    print(f"mask_projection: max / embedding's max {ratio.flatten().tolist()}, positive share "
          f"{positive.flatten().tolist()}")  # fmt: skip
    assert (ratio > 1e-3).all() and (positive > 0.25).all()
