"""Loading state_dicts from the checkpoint layouts found in the wild.

Accepted layouts: a raw state_dict, or a dict holding it under ``'state_dict'``, ``'model'`` or
``'net'``; keys may carry a ``'module.'`` (DataParallel / DDP) or ``'_orig_mod.'``
(``torch.compile``) prefix. Files are read with ``torch.load(..., weights_only=True)`` unless the
caller opts in to full unpickling; ``.safetensors`` files are read with safetensors.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from chip.errors import ChipError

__all__ = [
    "CONTAINER_KEYS",
    "STRIP_PREFIXES",
    "check_state_dict",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict_file",
]

StateDict = dict[str, torch.Tensor]
PathOrState = Union[str, Path, Mapping[str, Any]]

CONTAINER_KEYS = ("state_dict", "model", "net")
"""Keys under which training scripts commonly nest the state_dict, tried in this order."""

STRIP_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes removed when every key carries them (DataParallel/DDP, torch.compile)."""

_MAX_LISTED = 5  # offending keys named in a mismatch message


def _unwrap(obj: Any) -> Any:
    """Descend into ``{'state_dict': ...}``-style containers (and full nn.Module pickles)."""
    while True:
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            return obj
        inner = next((obj[k] for k in CONTAINER_KEYS if k in obj), None)
        if inner is None or not isinstance(inner, (Mapping, nn.Module)):
            return obj
        obj = inner


def _strip_prefixes(state: StateDict) -> StateDict:
    """Remove a prefix from STRIP_PREFIXES while every key starts with it."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def extract_state_dict(obj: Any, source: str = "checkpoint") -> StateDict:
    """Normalise a loaded checkpoint object to a flat ``{name: tensor}`` state_dict.

    Raises :class:`ChipError` when no mapping of parameter names to tensors is found.
    """
    state = _unwrap(obj)
    if not isinstance(state, Mapping) or not state:
        raise ChipError(
            f"{source} holds no state_dict; expected a dict of tensors, optionally under "
            f"one of the keys {', '.join(map(repr, CONTAINER_KEYS))}"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:_MAX_LISTED])
        raise ChipError(
            f"{source} is not a state_dict: {len(bad)} entries are not name -> tensor "
            f"(e.g. {shown}); expected a dict of tensors, optionally under "
            f"one of the keys {', '.join(map(repr, CONTAINER_KEYS))}"
        )
    return _strip_prefixes(dict(state))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_reason(exc: BaseException) -> str:
    """The short reason in torch's weights-only error (e.g. ``unsupported global: pkg.Cls``)."""
    match = re.search(r"Unsupported (?:global: GLOBAL (\S+)|([^\n]+))", str(exc))
    if match is None:
        return "unsupported pickle content"
    return f"unsupported global: {match[1]}" if match[1] else match[0].strip().lower()


def _torch_load(path: Path, unsafe_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        if not unsafe_pickle and "weights only load failed" in str(exc).lower():
            raise ChipError(
                f"checkpoint {path} cannot be loaded safely ({_weights_only_reason(exc)}): it is "
                "not a plain tensor file; if you trust it, pass unsafe_pickle=True "
                "(CLI: --unsafe-pickle)"
            ) from None
        raise ChipError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    except Exception as exc:  # corrupt files surface as many types (IndexError, EOFError, ...)
        raise ChipError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _safetensors_load(path: Path) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ChipError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def load_state_dict_file(path: str | Path, unsafe_pickle: bool = False) -> StateDict:
    """Read a checkpoint file into a flat, prefix-free state_dict on the CPU.

    Args:
        path: a ``torch.save`` file (any layout of :func:`extract_state_dict`) or a
            ``.safetensors`` file.
        unsafe_pickle: use ``weights_only=False`` (executes code from the file; only for
            trusted files).

    Raises:
        ChipError: missing/unreadable file, non-tensor pickle without ``unsafe_pickle``, or no
            state_dict inside.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ChipError(f"checkpoint file {what}: {path}")
    if path.suffix == ".safetensors":
        obj = _safetensors_load(path)
    else:
        obj = _torch_load(path, unsafe_pickle)
    return extract_state_dict(obj, source=f"checkpoint {path}")


def _listing(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{label} {len(items)}: {', '.join(items[:_MAX_LISTED])}{more}"


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Raise one-line :class:`ChipError` if ``state`` does not fit ``model``.

    Shape mismatches always fail; missing and unexpected keys fail only when ``strict``.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if strict and missing:
        parts.append(_listing("missing", missing))
    if strict and unexpected:
        parts.append(_listing("unexpected", unexpected))
    if shapes:
        parts.append(_listing("shape mismatch", shapes))
    if parts:
        arch = getattr(model, "chip_arch", type(model).__name__)
        raise ChipError(f"checkpoint does not fit {arch}: " + "; ".join(parts))


def load_checkpoint(
    model: nn.Module,
    path_or_state: PathOrState,
    strict: bool = True,
    unsafe_pickle: bool = False,
):
    """Load a checkpoint (file path or in-memory object, any accepted layout) into ``model``.

    Args:
        model: the target module.
        path_or_state: path to a checkpoint file, or an already-loaded state_dict / container.
        strict: require exactly the model's keys (shape mismatches are always an error).
        unsafe_pickle: see :func:`load_state_dict_file`.

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` named tuple (both empty when ``strict``).

    Raises:
        ChipError: unreadable input, or keys/shapes that do not fit (one line listing the first
            offending keys).
    """
    if isinstance(path_or_state, (str, Path)):
        state = load_state_dict_file(path_or_state, unsafe_pickle=unsafe_pickle)
    else:
        state = extract_state_dict(path_or_state)
    check_state_dict(model, state, strict=strict)
    return model.load_state_dict(state, strict=strict)
