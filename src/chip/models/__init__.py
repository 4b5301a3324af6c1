"""Model zoo of the CHIP paper with reference-compatible parameter names.

``chip.models.create("resnet56", checkpoint="resnet_56.pt")`` builds a registered architecture and
loads a checkpoint; :func:`list_models` names the zoo and :func:`arch_input_size` gives the default
input size of each.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

from chip.models import resnet_cifar, vgg_cifar  # noqa: F401  (register the CIFAR models)
from chip.models.registry import (
    ModelInfo,
    arch_input_size,
    create,
    get_model_info,
    list_models,
    register_model,
)
from chip.models.resnet_cifar import BasicBlock, CifarResNet, PadShortcut
from chip.models.vgg_cifar import CifarVGG

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "ModelInfo",
    "PadShortcut",
    "arch_input_size",
    "create",
    "get_model_info",
    "list_models",
    "register_model",
]


@register_model(input_size=(3, 224, 224), dataset="imagenet", num_classes=1000)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (random init); the stem conv is rebuilt for ``in_channels != 3``."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
