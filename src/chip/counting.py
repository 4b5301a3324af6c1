"""Parameter and MAC counting (SPEC section 5).

Convention: ``params`` is every parameter of the model (shared parameters once); ``macs`` is the
number of multiply-accumulates of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
``nn.Linear`` layers for ONE image (bias, BatchNorm, activations and pooling are not counted). A
convolution costs ``in_channels / groups * prod(kernel_size)`` MACs per OUTPUT element; a transposed
convolution scatters every INPUT element into ``out_channels / groups * prod(kernel_size)`` outputs,
so it costs ``in_channels * out_channels / groups * prod(kernel_size)`` MACs per input position
(whatever its stride, padding or ``output_padding``). The paper's "FLOPs" are these MACs.

    >>> counts = count(model, (1, 3, 32, 32))
    >>> print(format_count(counts.params), format_count(counts.macs))
    0.85M 125.49M

Counting runs one forward pass with forward hooks that exist only during the measurement; the model
is left exactly as it was (same modules, buffers, training flags and device, no gradients).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from chip.errors import ChipError

__all__ = ["CONVENTION", "Counts", "LayerCount", "count", "format_count", "reduction"]

CONVENTION = "MACs of conv+linear layers, batch 1"


def _conv_macs(module: nn.Module, input: torch.Tensor | None, output: torch.Tensor) -> int:
    """Every output element costs ``in_channels / groups * prod(kernel)`` MACs (bias not counted)."""
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _conv_transpose_macs(module: nn.Module, input: torch.Tensor | None,
                         output: torch.Tensor) -> int:
    """Every input element is multiplied into ``out_channels / groups * prod(kernel)`` outputs, i.e.
    ``in_channels * out_channels / groups * prod(kernel)`` MACs per input position (bias not
    counted; outputs cropped by ``padding`` are counted too: the product is still computed)."""
    if input is None:
        raise TypeError(f"{type(module).__name__}: expected the input as a positional tensor")
    return input.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)


def _linear_macs(module: nn.Module, input: torch.Tensor | None, output: torch.Tensor) -> int:
    """Every output element costs ``in_features`` MACs (bias not counted)."""
    return output.numel() * module.in_features


# counted layer type -> MACs of one call, from the module, its (batch-1) input and its output;
# a subclass is counted by the rule of its nearest listed base class
MAC_RULES: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor | None, torch.Tensor], int]] = {
    nn.Conv1d: _conv_macs,
    nn.Conv2d: _conv_macs,
    nn.Conv3d: _conv_macs,
    nn.ConvTranspose1d: _conv_transpose_macs,
    nn.ConvTranspose2d: _conv_transpose_macs,
    nn.ConvTranspose3d: _conv_transpose_macs,
    nn.Linear: _linear_macs,
}


@dataclass(frozen=True)
class LayerCount:
    """One call of a counted layer (a module called twice appears twice).

    ``params`` are the module's own parameters (repeated on every call of a shared module; the
    model total is :attr:`Counts.params`). Shapes are those of the batch-1 measurement pass.
    """

    name: str
    kind: str
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class Counts:
    """Parameter and MAC counts of a model for one input size (see :data:`CONVENTION`)."""

    params: int
    macs: int
    convention: str = CONVENTION
    input_size: tuple[int, ...] = ()
    layers: tuple[LayerCount, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["layers"] = [
            {**asdict(layer), "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape)}
            for layer in self.layers
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        """Inverse of :meth:`to_dict`."""
        layers = tuple(
            LayerCount(
                **{**layer, "in_shape": tuple(layer["in_shape"]),
                   "out_shape": tuple(layer["out_shape"])}
            )
            for layer in d.get("layers", ())
        )
        return cls(
            params=int(d["params"]),
            macs=int(d["macs"]),
            convention=d.get("convention", CONVENTION),
            input_size=tuple(d.get("input_size", ())),
            layers=layers,
        )

    def table(self) -> str:
        """Aligned text table of the per-layer breakdown, with a total row."""
        header = ("layer", "kind", "in_shape", "out_shape", "params", "MACs")
        rows = [
            (layer.name, layer.kind, _shape_str(layer.in_shape), _shape_str(layer.out_shape),
             f"{layer.params:,}", f"{layer.macs:,}")
            for layer in self.layers
        ]
        rows.append(("total", "", "", "", f"{self.params:,}", f"{self.macs:,}"))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        right = {4, 5}  # numeric columns

        def fmt(row) -> str:
            cells = [
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1]),
                          f"({self.convention})"])

    def __str__(self) -> str:
        return (f"params {format_count(self.params)}, MACs {format_count(self.macs)} "
                f"({self.convention}, input {_shape_str(self.input_size)})")


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# unit suffix -> divisor
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def format_count(n: int | float, unit: str = "M", digits: int = 2) -> str:
    """Format a count in a fixed unit, the paper's style: ``853018 -> "0.85M"``.

    ``unit`` is one of ``"", "K", "M", "G", "T"``.
    """
    if unit not in _UNITS:
        raise ChipError(f"unknown unit {unit!r}; expected one of {sorted(_UNITS)}")
    return f"{n / _UNITS[unit]:.{digits}f}{unit}"


def reduction(before: int | float, after: int | float) -> float:
    """Percentage removed going from ``before`` to ``after``: ``100 * (1 - after / before)``."""
    if before <= 0:
        raise ChipError(f"reduction needs a positive 'before' count, got {before!r}")
    return 100.0 * (1.0 - after / before)


def _check_input_size(input_size) -> tuple[int, ...]:
    """``input_size`` must be (batch, channels, *spatial) with positive ints."""
    try:
        size = tuple(input_size)
    except TypeError:
        size = ()
    ok = len(size) >= 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    )
    if not ok:
        raise ChipError(
            f"bad input_size {input_size!r}; expected positive ints (batch, channels, *spatial), "
            "e.g. (1, 3, 32, 32)"
        )
    return size


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter/buffer (CPU if none) and the first floating dtype."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) are the same."""
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return a.index == b.index


def on_device(model: nn.Module, device=None, memory_format=None) -> nn.Module:
    """The model itself if it is already on ``device`` (None: wherever it is) and no memory format
    change is asked for; otherwise a moved deep copy, so the caller's model is never touched."""
    current, _ = _model_device_dtype(model)
    target = current if device is None else torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ChipError(f"device {str(target)!r} is not available here; expected 'cpu' or None")
    if _same_device(current, target) and memory_format is None:
        return model
    moved = copy.deepcopy(model).to(target)
    return moved if memory_format is None else moved.to(memory_format=memory_format)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _counted_rule(module: nn.Module):
    """MAC rule of the module's nearest counted base class, or None."""
    return next((MAC_RULES[t] for t in type(module).__mro__ if t in MAC_RULES), None)


def _record(records: list, name: str, rule, module: nn.Module, args, output) -> None:
    """Forward hook: append one LayerCount for this call (state lives in ``records`` only).

    The rule gets the module, its input (the first positional argument; None if that is not a
    tensor, which only the input-based rules reject) and its output.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor output, got {type(output).__name__}")
    inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
    records.append(
        LayerCount(
            name=name,
            kind=type(module).__name__,
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            macs=int(rule(module, inp, output)),
            in_shape=tuple(inp.shape) if inp is not None else (),
            out_shape=tuple(output.shape),
        )
    )


def _measure(model: nn.Module, x: torch.Tensor) -> list[LayerCount]:
    """Run ``model(x)`` with temporary hooks on every counted layer; hooks always removed."""
    records: list[LayerCount] = []
    handles = []
    try:
        for name, module in model.named_modules():
            rule = _counted_rule(module)
            if rule is not None:
                hook = functools.partial(_record, records, name or type(module).__name__, rule)
                handles.append(module.register_forward_hook(hook))
        with torch.inference_mode(), eval_mode(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return records


def count(model: nn.Module, input_size=(1, 3, 32, 32), device=None) -> Counts:
    """Count parameters and conv+linear MACs of ``model`` for one image of ``input_size``.

    ``input_size`` is (batch, channels, *spatial); the batch entry is ignored (the pass runs with
    batch 1, so MACs are per image). ``device`` (default: where the model is) is where the pass
    runs; a model elsewhere is measured on a copy. The model is left exactly as it was.
    """
    size = _check_input_size(input_size)
    params = sum(p.numel() for p in model.parameters())
    work = on_device(model, device)
    dev, dtype = _model_device_dtype(work)
    x = torch.zeros((1, *size[1:]), device=dev, dtype=dtype)
    try:
        layers = _measure(work, x)
    except (RuntimeError, ValueError, TypeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ChipError(
            f"forward pass failed for input_size {size} (expected (batch, channels, *spatial) "
            f"that the model accepts): {first_line}"
        ) from err
    return Counts(
        params=params,
        macs=sum(layer.macs for layer in layers),
        convention=CONVENTION,
        input_size=size,
        layers=tuple(layers),
    )

