"""Model zoo of the CHIP paper with reference-compatible parameter names.

``chip.models.create("resnet56", checkpoint="resnet_56.pt")`` builds a registered architecture and
loads a checkpoint; :func:`list_models` names the zoo, :func:`get_model_info` gives everything
chip knows about an architecture (:class:`ModelInfo`: default input size and classes, the
sparsity-string layout, the reference code's CI hook points) and :func:`arch_input_size` the
default input size.

One file per family registers its architectures with those facts (``resnet_cifar``,
``vgg_cifar``, ``resnet50``); adding an architecture means adding one such file and importing it
here.
"""

from __future__ import annotations

# importing the family modules registers their architectures
from chip.models import resnet50, resnet_cifar, vgg_cifar  # noqa: F401
from chip.models.registry import (
    IgnoredRate,
    ModelInfo,
    SparsityLayout,
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
    "IgnoredRate",
    "ModelInfo",
    "PadShortcut",
    "SparsityLayout",
    "arch_input_size",
    "create",
    "get_model_info",
    "list_models",
    "register_model",
]
