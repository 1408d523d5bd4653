"""The U-Net keeps the blog U-Net's names, structure and state_dict layout."""

import pytest
import torch
from torch import nn

from segcam_lightning.models import BLOG_LAYERS, UNet, build_unet


# The blog post's U-Net, copied as the blog post wrote it: the independent reference for key names.
class blog_conv_block(nn.Module):
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


class blog_encoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv = blog_conv_block(in_c, out_c)
        self.pool = nn.MaxPool2d((2, 2))


class blog_decoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_c, out_c, kernel_size=2, stride=2, padding=0)
        self.conv = blog_conv_block(out_c + out_c, out_c)


class blog_build_unet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.e1 = blog_encoder_block(3, 64)
        self.e2 = blog_encoder_block(64, 128)
        self.e3 = blog_encoder_block(128, 256)
        self.e4 = blog_encoder_block(256, 512)
        self.b = blog_conv_block(512, 1024)
        self.d1 = blog_decoder_block(1024, 512)
        self.d2 = blog_decoder_block(512, 256)
        self.d3 = blog_decoder_block(256, 128)
        self.d4 = blog_decoder_block(128, 64)
        self.outputs = nn.Conv2d(64, num_classes, kernel_size=1, padding=0)


def test_blog_state_dict_loads_strictly():
    blog_state = blog_build_unet(num_classes=3).state_dict()
    ours = build_unet(num_classes=3)
    assert list(ours.state_dict()) == list(blog_state)
    ours.load_state_dict(blog_state, strict=True)
    for key, value in blog_state.items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("name", BLOG_LAYERS)
def test_blog_layer_names_are_last_inplace_relu(name):
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


# --------------------------------------------------------------------------------------------
# The 3-D U-Net
# --------------------------------------------------------------------------------------------


def test_3d_unet_keeps_the_names_with_3d_layers():
    flat, volume = build_unet(3, base_width=4), build_unet(3, base_width=4, in_channels=3, dims=3)
    assert list(volume.state_dict()) == list(flat.state_dict())
    for key, value in volume.state_dict().items():
        expected = flat.state_dict()[key].shape
        # Convolution kernels gain one spatial dimension; biases and BatchNorm stay as they are.
        if len(expected) == 4:
            assert value.shape == (*expected, expected[-1]), key
        else:
            assert value.shape == expected, key
    modules = dict(volume.named_modules())
    for name in BLOG_LAYERS:
        assert isinstance(modules[name], nn.ReLU) and modules[name].inplace
    assert isinstance(modules["e1.conv.conv.0"], nn.Conv3d)
    assert isinstance(modules["e1.conv.conv.1"], nn.BatchNorm3d)
    assert isinstance(modules["e1.pool"], nn.MaxPool3d)
    assert isinstance(modules["d4.up"], nn.ConvTranspose3d)
    assert isinstance(modules["outputs"], nn.Conv3d)
    assert volume.dims == 3 and flat.dims == 2


def test_3d_unet_maps_volumes_to_logits_at_input_resolution():
    net = UNet(num_classes=4, base_width=2, in_channels=1, dims=3).eval()
    shapes = {}
    hooks = [
        dict(net.named_modules())[name].register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name in BLOG_LAYERS
    ]
    with torch.no_grad():
        out = net(torch.rand(2, 1, 16, 32, 48))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 4, 16, 32, 48)
    assert shapes == {
        "e1.conv.conv.5": (2, 2, 16, 32, 48),
        "e4.conv.conv.5": (2, 16, 2, 4, 6),
        "b.conv.5": (2, 32, 1, 2, 3),
        "d4.conv.conv.5": (2, 2, 16, 32, 48),
    }


def test_invalid_dims():
    with pytest.raises(ValueError, match=r"Expected `dims` to be 2 \(images .*\) or 3 .*but got 4"):
        UNet(num_classes=3, dims=4)
