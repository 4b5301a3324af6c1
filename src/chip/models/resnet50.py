"""torchvision's ResNet-50 (ImageNet), with the reference code's sparsity layout and hook points.

The architecture and parameter names are torchvision's (docs/method.md section 8), so torchvision
and reference checkpoints load unchanged. Registered as ``resnet50`` with input (3, 224, 224) and
1000 classes.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

from chip.models.registry import SparsityLayout, register_model

__all__ = ["RESNET50_REFERENCE_POINTS", "RESNET50_SPARSITY", "resnet50"]

_BLOCKS = (3, 4, 6, 3)  # bottlenecks per stage


def _sparsity_positions() -> list[list[str]]:
    inner = [
        [f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"]
        for s, blocks in zip((1, 2, 3, 4), _BLOCKS)
        for b in range(blocks)
    ]
    return [["conv1"], ["layer1.0.conv3"], ["layer2.0.conv3"], ["layer3.0.conv3"]] + inner


# [stem, stage-1..3 stream rates, one inner rate per bottleneck for its conv1 and conv2]
# (docs/method.md section 3; the stage-4 stream is never pruned, as in the paper). The stem
# (``conv1``) is its own group here: the max-pool and the stage-1 projection shortcut separate it
# from the stage-1 stream, so its rate applies.
RESNET50_SPARSITY = SparsityLayout(
    positions=_sparsity_positions,
    help="stem, 3 stream rates for stages 1-3, one inner rate per bottleneck (16)",
)

# the reference code's CI hook points (ci_conv1, ci_conv2, ...): the stem after the max-pool, then
# the three calls of every bottleneck's shared ReLU (after bn1, bn2 and the residual sum)
RESNET50_REFERENCE_POINTS = ["maxpool"] + [
    f"layer{s}.{b}.relu:{k}"
    for s, blocks in zip((1, 2, 3, 4), _BLOCKS)
    for b in range(blocks)
    for k in (0, 1, 2)
]


@register_model(
    input_size=(3, 224, 224),
    num_classes=1000,
    sparsity=RESNET50_SPARSITY,
    reference_points=RESNET50_REFERENCE_POINTS,
)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (random init); the stem conv is rebuilt for ``in_channels != 3``."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
