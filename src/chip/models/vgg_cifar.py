"""VGG-16-BN for CIFAR with the reference's module names (docs/method.md section 8).

``features`` holds ``conv{i}`` / ``norm{i}`` / ``relu{i}`` for every conv entry ``i`` of the
configuration list and ``pool{i}`` for every ``'M'`` entry; then ``avgpool`` (AvgPool2d(2)),
flatten and ``classifier`` = ``linear1``, ``norm1`` (BatchNorm1d), ``relu1``, ``linear2``.

``vgg16_bn`` is registered with its sparsity-string layout (one rate for each of the first 12
convs) and the reference code's CI hook points.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence, Union

import torch
import torch.nn as nn

from chip.models.registry import SparsityLayout, register_model

__all__ = ["VGG16_REFERENCE_POINTS", "VGG16_SPARSITY", "VGG_CFGS", "CifarVGG", "vgg16_bn"]

CfgItem = Union[int, str]

VGG_CFGS: dict[str, list[CfgItem]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


def make_features(cfg: Sequence[CfgItem], in_channels: int = 3) -> nn.Sequential:
    """The conv trunk: named children by position in ``cfg`` (an int = conv width, ``'M'`` = pool)."""
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i, item in enumerate(cfg):
        if item == "M":
            layers.append((f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2)))
            continue
        width = int(item)
        layers += [
            (f"conv{i}", nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=True)),
            (f"norm{i}", nn.BatchNorm2d(width)),
            (f"relu{i}", nn.ReLU(inplace=True)),
        ]
        channels = width
    return nn.Sequential(OrderedDict(layers))


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (four max-pools, then AvgPool2d(2) to 1x1).

    Args:
        cfg: layer configuration (ints are conv widths, ``'M'`` is a 2x2 max-pool).
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, cfg: Sequence[CfgItem], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = list(cfg)
        width = int(self.cfg[-1])
        self.features = make_features(self.cfg, in_channels)
        self.avgpool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(width, width),
                norm1=nn.BatchNorm1d(width),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(width, num_classes),
            )
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's init: N(0, 2/(k*k*out)) convs, BN weight 0.5, N(0, 0.01) linears."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv trunk: (N, 512, H/16, W/16)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """AvgPool2d(2), flatten and the classifier."""
        return self.classifier(self.flatten(self.avgpool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# positions in VGG_CFGS["vgg16"] of the first 12 of its 13 convs: the sparsity string's positions
# (conv 13, feeding the classifier, is never pruned, as in the paper)
_VGG16_PRUNED_CONVS = (0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15)

VGG16_SPARSITY = SparsityLayout(
    positions=[[f"features.conv{i}"] for i in _VGG16_PRUNED_CONVS],
    help="one rate per conv for the first 12 convs",
)

# the reference code's CI hook points (ci_conv1 .. ci_conv12): each pruned conv's output after its
# ReLU, or after the max-pool that follows it
VGG16_REFERENCE_POINTS = [
    f"features.{m}"
    for m in (
        "relu0",
        "pool2",
        "relu3",
        "pool5",
        "relu6",
        "relu7",
        "pool9",
        "relu10",
        "relu11",
        "pool13",
        "relu14",
        "relu15",
    )
]


@register_model(sparsity=VGG16_SPARSITY, reference_points=VGG16_REFERENCE_POINTS)
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """CIFAR VGG-16-BN: 14,991,946 parameters for 10 classes."""
    return CifarVGG(VGG_CFGS["vgg16"], num_classes, in_channels)
