"""Weight loading: state_dicts in the checkpoint layouts found in the wild, read into a model.

Accepted layouts: a raw state_dict, or a dict holding it under ``'state_dict'``, ``'model'`` or
``'net'``; keys may carry a ``'module.'`` (DataParallel / DDP) or ``'_orig_mod.'``
(``torch.compile``) prefix. Files are read with ``torch.load(..., weights_only=True)`` unless the
caller passes ``trust_code=True`` (full unpickling runs code from the file); ``.safetensors`` files
are read with safetensors.

* :func:`load_weights` reads a file or an in-memory object into a model.
* :func:`check_state_dict` is the one check that a state_dict fits a model (missing, unexpected
  and shape-mismatched keys, one line); :func:`chip.artifact.load` uses it too.
* :func:`load_torch_file` is the one guarded ``torch.load`` (weights only unless ``trust_code``);
  training-state checkpoints (:func:`chip.train.load_training_state`) are read with it.
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
from chip.utils import first_line

__all__ = [
    "CONTAINER_KEYS",
    "STRIP_PREFIXES",
    "check_state_dict",
    "extract_state_dict",
    "load_state_dict_file",
    "load_torch_file",
    "load_weights",
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


def _weights_only_reason(exc: BaseException) -> str:
    """The short reason in torch's weights-only error (e.g. ``unsupported global: pkg.Cls``)."""
    match = re.search(r"Unsupported (?:global: GLOBAL (\S+)|([^\n]+))", str(exc))
    if match is None:
        return "unsupported pickle content"
    return f"unsupported global: {match[1]}" if match[1] else match[0].strip().lower()


def load_torch_file(path: str | Path, *, trust_code: bool = False) -> Any:
    """``torch.load`` of ``path`` onto the CPU, weights only unless ``trust_code``.

    Args:
        path: an existing ``torch.save`` file.
        trust_code: use ``weights_only=False`` (full unpickling executes code from the file;
            only for trusted files).

    Returns the unpickled object (tensors on the CPU).

    Raises:
        ChipError: the file needs full unpickling and ``trust_code`` is False (the message names
            the refused global and ``trust_code=True`` / ``--trust-code``), or it is unreadable.
    """
    path = Path(path)
    _check_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_code)
    except pickle.UnpicklingError as exc:
        if not trust_code and "weights only load failed" in str(exc).lower():
            raise ChipError(
                f"checkpoint {path} cannot be loaded safely ({_weights_only_reason(exc)}): it is "
                "not a plain tensor file; pass trust_code=True (CLI: --trust-code) if you trust "
                "the file"
            ) from None
        raise ChipError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    except Exception as exc:  # corrupt files surface as many types (IndexError, EOFError, ...)
        reason = first_line(exc).split(". ")[0]
        raise ChipError(
            f"cannot read checkpoint {path}: it is truncated or corrupted ({type(exc).__name__}: "
            f"{reason}); expected a complete torch.save file"
        ) from None


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy pickle (protocol 2+)


def _check_torch_file(path: Path) -> None:
    """ChipError (naming the expected form) for an empty file or one that is neither a
    ``torch.save`` zip archive nor a pickle: full unpickling would not help those."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ChipError(
            f"checkpoint {path} is empty (0 bytes); expected a state_dict saved with "
            "torch.save, or a .safetensors file"
        )
    if not head.startswith(_TORCH_MAGIC):
        raise ChipError(
            f"checkpoint {path} is not a torch.save file (it starts with bytes "
            f"{head.hex()}); expected a state_dict saved with torch.save, or a "
            ".safetensors file"
        )


def _safetensors_load(path: Path) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ChipError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line(exc)}"
        ) from None


def load_state_dict_file(path: str | Path, *, trust_code: bool = False) -> StateDict:
    """Read a checkpoint file into a flat, prefix-free ``{name: tensor}`` state_dict on the CPU.

    Args:
        path: a ``torch.save`` file (any layout of :func:`extract_state_dict`) or a
            ``.safetensors`` file.
        trust_code: see :func:`load_torch_file` (ignored for ``.safetensors``).

    Raises:
        ChipError: missing/unreadable file, non-tensor pickle without ``trust_code``, or no
            state_dict inside.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ChipError(f"checkpoint file {what}: {path}")
    if path.suffix == ".safetensors":
        obj = _safetensors_load(path)
    else:
        obj = load_torch_file(path, trust_code=trust_code)
    return extract_state_dict(obj, source=f"checkpoint {path}")


def _listing(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{label} {len(items)}: {', '.join(items[:_MAX_LISTED])}{more}"


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    subject: str = "checkpoint does not fit",
    hint: str = "",
) -> None:
    """Raise a one-line :class:`ChipError` if ``state`` does not fit ``model``.

    Shape mismatches always fail; missing and unexpected keys fail only when ``strict``. The
    message counts each failing kind, then names the first offending keys of each (shape
    mismatches with both shapes), then ``hint``::

        checkpoint x.pt does not fit resnet20 (1 missing, 0 unexpected, 1 of another shape):
        missing 1: 'fc.bias'; shape mismatch 1: 'fc.weight' (10, 64) vs model (100, 64)

    (one line; the first five keys of each kind are named, then ``(+N more)``).

    Args:
        model: the module the state is meant for (its ``chip_arch``, else its class name, is
            named in the message).
        state: ``{name: tensor}``.
        strict: also fail on missing and unexpected keys.
        subject: the start of the message, followed by the model's arch (e.g.
            ``"checkpoint x.pt does not fit"``).
        hint: appended after ``"; "`` (e.g. what a mismatch means for the caller).

    Raises:
        ChipError: the state does not fit.
    """
    expected = model.state_dict()
    missing = [repr(k) for k in expected if k not in state] if strict else []
    unexpected = [repr(k) for k in state if k not in expected] if strict else []
    shapes = [
        f"{k!r} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    counts = [f"{len(shapes)} of another shape"]
    if strict:
        counts[:0] = [f"{len(missing)} missing", f"{len(unexpected)} unexpected"]
    parts = [
        _listing(label, items)
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]
    arch = getattr(model, "chip_arch", type(model).__name__)
    raise ChipError(
        f"{subject} {arch} ({', '.join(counts)}): " + "; ".join(parts + ([hint] if hint else []))
    )


def load_weights(
    model: nn.Module,
    path_or_state: PathOrState,
    *,
    strict: bool = True,
    trust_code: bool = False,
):
    """Load weights (file path or in-memory object, any accepted layout) into ``model``.

    Args:
        model: the target module (loaded in place).
        path_or_state: path to a checkpoint file, or an already-loaded state_dict / container.
        strict: require exactly the model's keys (shape mismatches are always an error).
        trust_code: allow full unpickling of a file; see :func:`load_torch_file`.

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` named tuple (both empty when ``strict``).

    Raises:
        ChipError: unreadable input, a pickle needing ``trust_code``, or keys/shapes that do not
            fit (:func:`check_state_dict`: one line listing the first offending keys); the model
            is left unchanged.
    """
    if isinstance(path_or_state, (str, Path)):
        state = load_state_dict_file(path_or_state, trust_code=trust_code)
        subject = f"checkpoint {path_or_state} does not fit"
    else:
        state = extract_state_dict(path_or_state)
        subject = "checkpoint does not fit"
    check_state_dict(model, state, strict=strict, subject=subject)
    return model.load_state_dict(state, strict=strict)
