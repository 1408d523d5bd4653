"""U-Net with the blog post's module names, so its checkpoints and layer names keep working.

The structure and attribute names follow the original blog-post U-Net exactly
(``e1..e4``, ``b``, ``d1..d4``, ``outputs``; every ``conv_block.conv`` is a Sequential whose
index 5 is the last in-place ReLU). ``base_width`` scales every width; 64 is the blog's.

``dims=3`` builds the same network for volumes, with the same module names and the 3-D layers
(``Conv3d``, ``BatchNorm3d``, ``MaxPool3d``, ``ConvTranspose3d``) in place of the 2-D ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

#: The layers the blog's Grad-CAM tips point at, from the first encoder block to the last decoder.
BLOG_LAYERS = ("e1.conv.conv.5", "e4.conv.conv.5", "b.conv.5", "d4.conv.conv.5")


class _Layers(NamedTuple):
    """The layer types of a 2-D or 3-D network."""

    conv: type[nn.Module]
    norm: type[nn.Module]
    pool: type[nn.Module]
    up: type[nn.Module]


_LAYERS = {
    2: _Layers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
    3: _Layers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d),
}


def _layers(dims: int) -> _Layers:
    if isinstance(dims, bool) or dims not in _LAYERS:
        raise ValueError(
            f"Expected `dims` to be 2 (images [B, C, H, W]) or 3 (volumes [B, C, D, H, W]), "
            f"but got {dims!r}."
        )
    return _LAYERS[dims]


class conv_block(nn.Module):
    """Two 3×3 (3×3×3) convolutions, each followed by BatchNorm and an in-place ReLU."""

    def __init__(self, in_c: int, out_c: int, dims: int = 2) -> None:
        super().__init__()
        layers = _layers(dims)
        self.conv = nn.Sequential(
            layers.conv(in_c, out_c, kernel_size=3, padding=1),
            layers.norm(out_c),
            nn.ReLU(inplace=True),
            layers.conv(out_c, out_c, kernel_size=3, padding=1),
            layers.norm(out_c),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class encoder_block(nn.Module):
    """``conv_block`` then 2×2 (2×2×2) max-pooling; returns the skip features and the pooled
    map."""

    def __init__(self, in_c: int, out_c: int, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_block(in_c, out_c, dims)
        self.pool = _layers(dims).pool((2,) * dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.conv(x)
        return s, self.pool(s)


class decoder_block(nn.Module):
    """2×2 (2×2×2) transposed convolution, concatenation with the skip, then ``conv_block``."""

    def __init__(self, in_c: int, out_c: int, dims: int = 2) -> None:
        super().__init__()
        self.up = _layers(dims).up(in_c, out_c, kernel_size=2, stride=2, padding=0)
        self.conv = conv_block(out_c + out_c, out_c, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """The blog U-Net: four encoder blocks, a bottleneck, four decoder blocks, a 1×1 head.

    Args:
        num_classes: number of output channels ``K``.
        base_width: width of the first block; the others are 2×, 4×, 8× and 16× it. 64 is the
            blog's (31 M parameters); 16 trains on a laptop CPU in minutes.
        in_channels: channels of the input image.
        dims: 2 for images, 3 for volumes (3-D convolutions, pooling and upsampling; the module
            names stay the same, so ``"d4.conv.conv.5"`` is the last decoder ReLU either way).

    Input ``[B, C, H, W]`` with ``H`` and ``W`` divisible by 16; output logits ``[B, K, H, W]``.
    With ``dims=3``: input ``[B, C, D, H, W]``, each side divisible by 16; logits
    ``[B, K, D, H, W]``.

    Example:
        >>> net = UNet(num_classes=3, base_width=8)
        >>> net(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
        >>> volumes = UNet(num_classes=3, base_width=2, in_channels=1, dims=3)
        >>> volumes(torch.zeros(2, 1, 16, 16, 16)).shape
        torch.Size([2, 3, 16, 16, 16])
    """

    def __init__(
        self, num_classes: int, base_width: int = 64, in_channels: int = 3, dims: int = 2
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(
                f"Expected `num_classes` to be a positive integer, but got {num_classes}."
            )
        if base_width < 1:
            raise ValueError(
                f"Expected `base_width` to be a positive integer, but got {base_width}."
            )
        layers = _layers(dims)
        w = base_width
        self.num_classes = num_classes
        self.base_width = base_width
        self.dims = dims
        self.e1 = encoder_block(in_channels, w, dims)
        self.e2 = encoder_block(w, 2 * w, dims)
        self.e3 = encoder_block(2 * w, 4 * w, dims)
        self.e4 = encoder_block(4 * w, 8 * w, dims)
        self.b = conv_block(8 * w, 16 * w, dims)
        self.d1 = decoder_block(16 * w, 8 * w, dims)
        self.d2 = decoder_block(8 * w, 4 * w, dims)
        self.d3 = decoder_block(4 * w, 2 * w, dims)
        self.d4 = decoder_block(2 * w, w, dims)
        self.outputs = layers.conv(w, num_classes, kernel_size=1, padding=0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        s1, p1 = self.e1(inputs)
        s2, p2 = self.e2(p1)
        s3, p3 = self.e3(p2)
        s4, p4 = self.e4(p3)
        b = self.b(p4)
        d1 = self.d1(b, s4)
        d2 = self.d2(d1, s3)
        d3 = self.d3(d2, s2)
        d4 = self.d4(d3, s1)
        return self.outputs(d4)


def build_unet(num_classes: int, base_width: int = 64, in_channels: int = 3, dims: int = 2) -> UNet:
    """Build the blog-compatible U-Net (same call as the blog's ``build_unet(num_classes)``);
    ``dims=3`` builds its 3-D counterpart for volumes ``[B, C, D, H, W]``."""
    return UNet(num_classes=num_classes, base_width=base_width, in_channels=in_channels, dims=dims)
