"""Small shared helpers: atomic file writes, seeding, devices."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    A crash or exception leaves ``path`` untouched (never half-written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; honour the umask instead
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path next to ``path`` for writers that want a file name; renamed over
    ``path`` on success, removed on failure (``path`` is never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, as atomic_write does
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Mixed-precision mode (``chip.recipe.AMP_MODES``) -> autocast dtype; training and latency
measurement share it."""


def atomic_save(obj, path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device=None) -> torch.device:
    """The device to run on: ``None`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"mps"`` or a ``torch.device`` -> that device, which must exist here.

    Raises:
        ChipError: a name torch does not know (``"gpu"``), or a device this machine lacks.
    """
    from .errors import ChipError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChipError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ChipError(
                f"device {str(device)!r} is not available: this machine has no CUDA "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ChipError(
                f"device {str(device)!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ChipError(f"device {str(device)!r} is not available here; use --device cpu")
    return dev


@contextlib.contextmanager
def eval_mode(model):
    """Put every submodule in eval mode; restore each one's own training flag afterwards.

    ``model.train(was_training)`` would instead set one flag on every submodule, unfreezing
    BatchNorms that were deliberately left in eval mode inside a training model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, tuple/list, dict or namedtuple), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def require_data(model) -> None:
    """ChipError if a parameter or buffer of ``model`` has no data (the meta device)."""
    named = (*model.named_parameters(), *model.named_buffers())
    meta = next((name for name, t in named if t.is_meta), None)
    if meta is not None:
        from .errors import ChipError

        raise ChipError(
            f"the model's weights are on the meta device (no data, e.g. {meta!r}); materialise "
            "them first: model.to_empty(device='cpu'), then load a state dict or reset parameters"
        )


def device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where ``model`` lives and its floating dtype: the device of its first parameter or buffer
    (CPU if none) and the first floating dtype among them (float32 if none)."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def example_input(model, size, *, zeros: bool = False, seed: int = 0) -> torch.Tensor:
    """An input of shape ``size`` in ``model``'s device and floating dtype: zeros (for tracing)
    or a seeded standard normal draw (for checks)."""
    device, dtype = device_dtype(model)
    if zeros:
        return torch.zeros(tuple(size), device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(size), generator=gen, dtype=torch.float64).to(device, dtype)


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name if it has none), optionally
    prefixed with the type: for one-line error messages that quote a library's error."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
