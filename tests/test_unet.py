"""The U-Net keeps the seed's names, structure and state_dict layout."""

import pytest
import torch
from torch import nn

from segcam_lightning.models import SEED_LAYERS, UNet, build_unet


# The blog post's U-Net, copied as the seed wrote it: the independent reference for key names.
class seed_conv_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_c),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_c, out_c, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_c),
            nn.ReLU(inplace=True),
        )


class seed_encoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv = seed_conv_block(in_c, out_c)
        self.pool = nn.MaxPool2d((2, 2))


class seed_decoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_c, out_c, kernel_size=2, stride=2, padding=0)
        self.conv = seed_conv_block(out_c + out_c, out_c)


class seed_build_unet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.e1 = seed_encoder_block(3, 64)
        self.e2 = seed_encoder_block(64, 128)
        self.e3 = seed_encoder_block(128, 256)
        self.e4 = seed_encoder_block(256, 512)
        self.b = seed_conv_block(512, 1024)
        self.d1 = seed_decoder_block(1024, 512)
        self.d2 = seed_decoder_block(512, 256)
        self.d3 = seed_decoder_block(256, 128)
        self.d4 = seed_decoder_block(128, 64)
        self.outputs = nn.Conv2d(64, num_classes, kernel_size=1, padding=0)


def test_seed_state_dict_loads_strictly():
    seed_state = seed_build_unet(num_classes=3).state_dict()
    ours = build_unet(num_classes=3)
    assert list(ours.state_dict()) == list(seed_state)
    ours.load_state_dict(seed_state, strict=True)
    for key, value in seed_state.items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("name", SEED_LAYERS)
def test_seed_layer_names_are_last_inplace_relu(name):
    module = dict(UNet(num_classes=3, base_width=4).named_modules())[name]
    assert isinstance(module, nn.ReLU)
    assert module.inplace


def test_output_is_logits_at_input_resolution():
    net = UNet(num_classes=5, base_width=4).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 48, 64))
    assert out.shape == (2, 5, 48, 64)
    assert out.dtype == torch.float32


def test_base_width_scales_every_block():
    net = UNet(num_classes=3, base_width=8)
    assert net.e1.conv.conv[0].out_channels == 8
    assert net.b.conv[0].out_channels == 128
    assert net.d4.conv.conv[3].out_channels == 8
    assert net.outputs.in_channels == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "`num_classes` to be a positive integer, but got 0"),
        ({"num_classes": 3, "base_width": 0}, "`base_width` to be a positive integer, but got 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)
