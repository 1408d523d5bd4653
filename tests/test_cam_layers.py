"""The default layer: on the path to the logits the adapter picks, a block's output.

The networks here stand for the real libraries' shapes without needing them: torchvision's
DeepLabV3 with ``aux_loss`` (a dict with ``"out"`` and ``"aux"``, the auxiliary head run after the
main one) and a decoder ending in a residual unit (MONAI's ``ResidualUnit``). MONAI's own UNet is
checked where MONAI is installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segcam_lightning.cam import CAMEngine, candidate_layers
from segcam_lightning.cam.layers import default_layer_name
from segcam_lightning.models import UNet

D4 = "d4.conv.conv.5"


class AuxNet(nn.Module):
    """Backbone, main head and an auxiliary head on an intermediate feature (DeepLabV3-like)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.deep = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, k, 1)
        )
        self.aux_classifier = nn.Sequential(
            nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, k, 1)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.stem(x)
        out = self.classifier(self.deep(low))
        return {"out": out, "aux": self.aux_classifier(low)}


class ResidualUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ResidualDecoder(nn.Module):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.unit = ResidualUnit(8)
        self.head = nn.Conv2d(8, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unit(self.stem(x)))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_unet_keeps_the_blog_layer(images: torch.Tensor) -> None:
    net = UNet(num_classes=3, base_width=4).train()
    flags = [m.training for m in net.modules()]
    state = torch.get_rng_state()
    assert default_layer_name(net, images) == D4
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in net.parameters())


def test_an_auxiliary_head_is_never_the_default(images: torch.Tensor) -> None:
    net = AuxNet()
    infos = {info.name: info for info in candidate_layers(net, images)}
    assert not infos["aux_classifier.2"].reaches_logits
    assert infos["classifier.2"].reaches_logits and infos["classifier.2"].sole_path
    assert default_layer_name(net, images) == "classifier.2"
    # The adapter decides which logits are explained.
    aux = default_layer_name(net, images, output_adapter=lambda out: out["aux"])
    assert aux == "aux_classifier.2"
    with pytest.raises(
        RuntimeError,
        match=r"Layer 'aux_classifier.2' does not reach the logits.*Layers that do: .*"
        r"'classifier.2'",
    ):
        CAMEngine(net, ["aux_classifier.2"])(images)


def test_a_residual_unit_is_explained_at_its_output(images: torch.Tensor) -> None:
    net = ResidualDecoder()
    infos = {info.name: info for info in candidate_layers(net, images)}
    assert infos["unit.conv.1"].reaches_logits and not infos["unit.conv.1"].sole_path
    assert infos["unit"].sole_path
    assert default_layer_name(net, images) == "unit"


def test_monai_unet_block_output() -> None:
    nets = pytest.importorskip("monai.networks.nets")
    net = nets.UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=2,
    )
    volume = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert default_layer_name(net, volume) == "model.1"
