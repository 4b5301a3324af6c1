"""Checks that run before any work: a wrong setting fails in seconds, with one line, leaving nothing.

Every command and ``chip run`` call these before they train, score or write anything:

* :func:`input_size_for` - the model's input size: given, or declared by its source; of the rank
  the model's first layer reads;
* :func:`check_data_fits` - the data's channels are the model's input channels;
* :func:`check_splits` - every data split holds at least one sample;
* :func:`check_writable` - an output file or directory can be written (nothing is created).

Device names are checked by :func:`chip.utils.resolve_device`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ChipError

__all__ = ["check_data_fits", "check_splits", "check_writable", "format_size", "input_size_for"]


def format_size(size: Sequence[int]) -> str:
    """An input size as chip prints it everywhere: ``3x32x32`` (C x H x W, no batch)."""
    return "x".join(str(int(s)) for s in size)


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first conv or linear layer in definition order (what reads the images)."""
    return next(
        (m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None
    )


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first conv reads (None when it starts with something else)."""
    first = _first_layer(model)
    return first.in_channels if isinstance(first, nn.modules.conv._ConvNd) else None


def input_size_for(
    model: nn.Module, given: Sequence[int] | None, source: str = ""
) -> tuple[int, ...]:
    """(C, *spatial) to trace and count ``model`` with: ``given`` (checked) or the size its
    source declares (``chip_input_size``).

    Raises:
        ChipError: no size known; a size whose rank the first conv cannot read (a Conv2d needs
            C,H,W); channels that differ from the first conv's.
    """
    name = source or getattr(model, "chip_arch", None) or type(model).__name__
    size = tuple(given) if given is not None else getattr(model, "chip_input_size", None)
    if size is None:
        raise ChipError(
            f"the input size of {name} is not known (its source declares none); "
            "pass --input-size C,H,W"
        )
    first = _first_layer(model)
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = len(first.kernel_size)
        if len(size) != 1 + spatial:
            form = ",".join(["C", "H", "W", "D"][: 1 + spatial]) if spatial < 3 else "C,D,H,W"
            raise ChipError(
                f"--input-size {','.join(map(str, size))} has {len(size)} numbers; "
                f"{name} starts with a {type(first).__name__}, which reads {form} "
                f"({1 + spatial} numbers)"
            )
        if size[0] != first.in_channels:
            raise ChipError(
                f"--input-size {','.join(map(str, size))} has {size[0]} channels but "
                f"{name} reads {first.in_channels}; expected "
                f"{first.in_channels},{','.join(map(str, size[1:]))}"
            )
    return size


def check_data_fits(
    model: nn.Module,
    channels: int,
    data: str,
    source: str = "",
    num_classes: int | None = None,
    image_size: tuple[int, ...] | None = None,
) -> None:
    """ChipError naming both numbers when ``data`` has ``channels`` and the model reads others,
    or (given ``num_classes`` and ``image_size``) when the model's (N, K, ...) logits on one
    image have fewer classes than the data's labels."""
    expected = input_channels(model)
    name = source or getattr(model, "chip_arch", None) or type(model).__name__
    if expected is not None and expected != channels:
        raise ChipError(
            f"the data {data} has {channels}-channel images but {name} reads "
            f"{expected} channels; use matching data or a model built for it"
        )
    if num_classes is None or image_size is None:
        return
    from .utils import eval_mode, example_input

    x = example_input(model, (2, channels, *image_size), zeros=True)
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except Exception:  # noqa: BLE001 - a model that cannot run is reported where it runs
        return
    if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[1] < num_classes:
        raise ChipError(
            f"the data {data} has {num_classes} classes but {name} outputs {out.shape[1]}; "
            f"use --num-classes {num_classes} (or a checkpoint trained for {num_classes} classes)"
        )


def check_splits(splits: dict, data: str) -> None:
    """ChipError naming the first empty split of ``data`` (``{split name: dataset}``)."""
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise ChipError(
                f"the {name} split of {data} is empty; expected at least one image "
                "(check the data directory and --train-subset / --val-subset)"
            )


def check_writable(path, what: str = "output") -> None:
    """ChipError if ``path`` (a file or directory to be written) cannot be written; creates
    nothing. Its nearest existing ancestor must be a writable directory."""
    path = Path(path)
    if path.exists() and path.is_dir() and what == "output file":
        raise ChipError(f"{what} {path} is a directory; expected a file path")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ChipError(f"cannot write {what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ChipError(f"cannot write {what} {path}: {ancestor} is not writable")
    try:  # root passes os.access everywhere; an unnamed temporary file is the real test
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ChipError(
            f"cannot write {what} {path}: {ancestor} refuses new files ({e.strerror})"
        ) from None
