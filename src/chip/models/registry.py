"""Model registry: a name -> builder table, in the style of timm's ``register_model``.

Builders are registered with :func:`register_model` and instantiated with :func:`create`, which
also records how to rebuild the model (``model.chip_arch`` / ``model.chip_kwargs``) and can load
a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn

from chip.errors import ChipError

__all__ = [
    "ModelInfo",
    "arch_input_size",
    "create",
    "get_model_info",
    "list_models",
    "register_model",
]

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """Registry entry: the builder and the architecture's default input size (C, H, W)."""

    name: str
    builder: Builder
    input_size: tuple[int, int, int] = (3, 32, 32)
    dataset: str = "cifar10"
    num_classes: int = 10


_MODEL_TABLE: dict[str, ModelInfo] = {}


def register_model(
    name: str | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    dataset: str = "cifar10",
    num_classes: int = 10,
) -> Callable[[Builder], Builder]:
    """Decorator adding ``fn(num_classes=..., in_channels=...) -> nn.Module`` to the registry.

    The registered name defaults to the function's ``__name__``; ``input_size`` (C, H, W),
    ``dataset`` and ``num_classes`` are the architecture's defaults.
    """

    def decorator(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in _MODEL_TABLE:
            raise ValueError(f"model {key!r} is already registered")
        _MODEL_TABLE[key] = ModelInfo(key, fn, tuple(input_size), dataset, num_classes)
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return sorted(_MODEL_TABLE)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; unknown names raise :class:`ChipError` listing the zoo."""
    try:
        return _MODEL_TABLE[name]
    except (KeyError, TypeError):
        raise ChipError(
            f"unknown model {name!r}; expected one of: {', '.join(list_models())}"
        ) from None


def arch_input_size(name: str) -> tuple[int, int, int]:
    """Default input size (C, H, W) of architecture ``name``: (3, 32, 32) CIFAR, (3, 224, 224) ImageNet."""
    return get_model_info(name).input_size


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChipError(f"{what} must be a positive integer, got {value!r}")
    return value


def create(
    name: str,
    num_classes: int | None = None,
    in_channels: int = 3,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    strict: bool = True,
    unsafe_pickle: bool = False,
) -> nn.Module:
    """Build registered architecture ``name`` and optionally load ``checkpoint`` into it.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet56"``.
        num_classes: size of the classifier output; ``None`` = the architecture's default
            (10 for the CIFAR models, 1000 for ``resnet50``).
        in_channels: channels of the input images (the stem conv is built for it).
        checkpoint: path to a state_dict file or an in-memory state_dict (any layout accepted by
            :func:`chip.checkpoint.load_checkpoint`).
        strict: require the checkpoint keys to match the model's exactly.
        unsafe_pickle: allow full (code-executing) unpickling of a trusted checkpoint file.

    The returned model has ``chip_arch`` (= ``name``) and ``chip_kwargs``
    (``{"num_classes", "in_channels"}``) attributes so it can be rebuilt with
    ``create(model.chip_arch, **model.chip_kwargs)``.
    """
    info = get_model_info(name)
    if num_classes is None:
        num_classes = info.num_classes
    kwargs = {
        "num_classes": _check_positive_int(num_classes, "num_classes"),
        "in_channels": _check_positive_int(in_channels, "in_channels"),
    }
    model = info.builder(**kwargs)
    model.chip_arch = info.name
    model.chip_kwargs = dict(kwargs)
    if checkpoint is not None:
        from chip.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, strict=strict, unsafe_pickle=unsafe_pickle)
    return model
