"""Parameter and MAC counting (docs/method.md section 4).

Convention: ``params`` is every parameter of the model (shared parameters once); ``macs`` is the
number of multiply-accumulates of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
``nn.Linear`` layers for ONE image (bias, BatchNorm, activations and pooling are not counted). A
convolution costs ``in_channels / groups * prod(kernel_size)`` MACs per OUTPUT element; a transposed
convolution scatters every INPUT element into ``out_channels / groups * prod(kernel_size)`` outputs,
so it costs ``in_channels * out_channels / groups * prod(kernel_size)`` MACs per input position
(whatever its stride, padding or ``output_padding``). The paper's "FLOPs" are these MACs.

    >>> counts = count(model, (1, 3, 32, 32))
    >>> print(format_count(counts.params), format_count(counts.macs))
    0.853M 125.486M

Counting runs one forward pass with forward hooks that exist only during the measurement; the model
is left exactly as it was (same modules, buffers, training flags and device, no gradients).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from chip.errors import ChipError
from chip.utils import device_dtype, eval_mode

__all__ = [
    "CONVENTION",
    "Counts",
    "LayerCount",
    "WidthCounter",
    "count",
    "format_count",
    "reduction",
]

CONVENTION = "MACs of conv+linear layers, batch 1"


def _conv_macs(module: nn.Module, input: torch.Tensor | None, output: torch.Tensor) -> int:
    """Every output element costs ``in_channels / groups * prod(kernel)`` MACs (bias not counted)."""
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _conv_transpose_macs(
    module: nn.Module, input: torch.Tensor | None, output: torch.Tensor
) -> int:
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
                **{
                    **layer,
                    "in_shape": tuple(layer["in_shape"]),
                    "out_shape": tuple(layer["out_shape"]),
                }
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
            (
                layer.name,
                layer.kind,
                _shape_str(layer.in_shape),
                _shape_str(layer.out_shape),
                f"{layer.params:,}",
                f"{layer.macs:,}",
            )
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
        return "\n".join(
            [fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1]), f"({self.convention})"]
        )

    def __str__(self) -> str:
        return (
            f"params {format_count(self.params)}, MACs {format_count(self.macs)} "
            f"({self.convention}, input {_shape_str(self.input_size)})"
        )


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# unit suffix -> divisor
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def format_count(n: int | float, unit: str = "M", digits: int = 3) -> str:
    """Format a count in a fixed unit: ``853018 -> "0.853M"`` (chip prints every count so).

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


def check_input_size(input_size) -> tuple[int, ...]:
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
    current, _ = device_dtype(model)
    target = current if device is None else torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ChipError(f"device {str(target)!r} is not available here; expected 'cpu' or None")
    if _same_device(current, target) and memory_format is None:
        return model
    moved = copy.deepcopy(model).to(target)
    return moved if memory_format is None else moved.to(memory_format=memory_format)


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
    size = check_input_size(input_size)
    params = sum(p.numel() for p in model.parameters())
    work = on_device(model, device)
    dev, dtype = device_dtype(work)
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


# -- counts for any group widths (planning) -----------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The sizes of a layer that pruning changes, frozen at planning time."""

    kind: str  # "conv" | "linear" | "channel" (one entry per channel: norms, PReLU) | "custom"
    out: int
    inp: int = 0
    groups: int = 1
    kernel: int = 1
    shapes: tuple = ()  # "custom": (name, shape) of each own parameter


def _layout(module: nn.Module) -> _Layout | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return _Layout(
            "conv",
            module.out_channels,
            module.in_channels,
            module.groups,
            math.prod(module.kernel_size),
        )
    if isinstance(module, nn.Linear):
        return _Layout("linear", module.out_features, module.in_features)
    if isinstance(module, _CHANNEL_LAYERS):
        own = list(module.parameters(recurse=False))
        return _Layout("channel", own[0].numel()) if own else None
    from .groups import CUSTOM_PRUNERS  # layers with a registered pruner

    pruner = CUSTOM_PRUNERS.get(type(module))
    if pruner is None:
        return None
    shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
    return _Layout(
        "custom", pruner.get_out_channels(module), pruner.get_in_channels(module), shapes=shapes
    )


_CHANNEL_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)


def _conv_widths(layout: _Layout, out_rm: int, in_rm: int) -> tuple[int, int, int]:
    """(out, in, groups) of a conv after removing channels; a depthwise conv (Torch-Pruning's
    rule: ``groups == out_channels``) keeps one group per channel."""
    out_c, in_c = layout.out - out_rm, layout.inp - in_rm
    depthwise = layout.groups == layout.out and layout.out > 1
    return out_c, in_c, out_c if depthwise else layout.groups


def _conv_params(layout: _Layout, out_rm: int, in_rm: int) -> dict[str, int]:
    out_c, in_c, groups = _conv_widths(layout, out_rm, in_rm)
    return {"weight": out_c * (in_c // groups) * layout.kernel, "bias": out_c}


def _linear_params(layout: _Layout, out_rm: int, in_rm: int) -> dict[str, int]:
    out_f = layout.out - out_rm
    return {"weight": out_f * (layout.inp - in_rm), "bias": out_f}


def _channel_params(layout: _Layout, out_rm: int, _in_rm: int) -> dict[str, int]:
    return {"weight": layout.out - out_rm, "bias": layout.out - out_rm}


def _custom_params(layout: _Layout, out_rm: int, in_rm: int) -> dict[str, int]:
    """A layer with a registered pruner: the first dimension of each parameter that has the
    layer's output (else input) channel count shrinks. An assumption: ``chip.prune``'s checks
    compare it with the real pruned layer and refuse the group when it is wrong."""
    sizes = {}
    for name, shape in layout.shapes:
        dims = list(shape)
        for want, rm in ((layout.out, out_rm), (layout.inp, in_rm)):
            if want in dims:
                dims[dims.index(want)] -= rm
                break
        sizes[name] = math.prod(dims)
    return sizes


# layer kind -> its own parameters' sizes after removing (out, in) channel positions
PARAM_RULES: dict[str, Callable[[_Layout, int, int], dict[str, int]]] = {
    "conv": _conv_params,
    "linear": _linear_params,
    "channel": _channel_params,
    "custom": _custom_params,
}


def _mac_scale(layout: _Layout, out_rm: int, in_rm: int) -> tuple[int, int]:
    """(new, old) of ``out * in / groups``: MACs of a conv/linear call scale with it."""
    if layout.kind == "linear":
        return (layout.out - out_rm) * (layout.inp - in_rm), layout.out * layout.inp
    out_c, in_c, groups = _conv_widths(layout, out_rm, in_rm)
    return out_c * (in_c // groups), layout.out * (layout.inp // layout.groups)


class WidthCounter:
    """Exact params/MACs of ``model`` for any widths of its prunable groups, without pruning.

    Built from one :func:`count` pass and the groups' members: every conv/linear call's MACs scale
    with ``out * in / groups``, every parameter of a pruned layer (or a bare per-channel
    parameter) shrinks along the dimensions Torch-Pruning prunes. ``counter(widths)`` returns
    ``(params, macs)`` in the :data:`CONVENTION`; widths of groups not named stay whole.
    ``chip.prune`` checks every probe and every applied plan against :func:`count` of the real
    pruned model.
    """

    def __init__(self, model: nn.Module, graph, input_size):
        base = count(model, input_size)
        self.input_size = tuple(input_size)[1:]  # per image: the batch entry does not matter
        self.base_params, self.base_macs = base.params, base.macs
        self.groups_list = list(graph)
        self.groups = {g.name: g.channels for g in graph}
        deps: dict[str, dict[str, list[tuple[str, int]]]] = {}
        axes: dict[str, int] = {}
        for g in graph:
            for m in g.members:
                deps.setdefault(m.name, {"out": [], "in": []})[m.kind].append(
                    (g.name, m.index.shape[1])
                )
                axes[m.name] = m.axis
        self._deps = deps
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self._layers = []  # (module, base MACs, deps) for every counted call of a member layer
        fixed_macs = 0
        for layer in base.layers:
            module = modules.get(layer.name)
            if layer.name in deps and module is not None:
                self._layers.append((_layout(module), layer.macs, deps[layer.name]))
            else:
                fixed_macs += layer.macs
        self._fixed_macs = fixed_macs
        self._modules = []  # (layout, own parameter names, deps) of member layers with parameters
        self._params = []  # (numel, size along the pruned axis, deps) of bare parameters
        counted: set[int] = set()
        for name, dep in deps.items():
            if name in params:
                p = params[name]
                counted.add(id(p))
                self._params.append((p.numel(), p.shape[axes[name]], dep))
            elif name in modules:
                own = dict(modules[name].named_parameters(recurse=False))
                fresh = [n for n, p in own.items() if id(p) not in counted]
                counted.update(id(own[n]) for n in fresh)
                if fresh:
                    layout = _layout(modules[name])
                    if layout is None:
                        raise ChipError(
                            f"chip cannot count the parameters of "
                            f"{type(modules[name]).__name__} {name} after pruning; "
                            "expected a conv, linear or norm layer"
                        )
                    self._modules.append((layout, fresh, dep))
        self._fixed_params = sum(p.numel() for p in model.parameters() if id(p) not in counted)

    def __call__(self, widths: Mapping[str, int]) -> tuple[int, int]:
        removed = {g: c - widths.get(g, c) for g, c in self.groups.items()}

        def rm(dep, kind):
            return sum(removed[g] * per for g, per in dep[kind])

        params = self._fixed_params
        for layout, names, dep in self._modules:
            sizes = PARAM_RULES[layout.kind](layout, rm(dep, "out"), rm(dep, "in"))
            params += sum(sizes[n] for n in names)
        for numel, size, dep in self._params:
            params += numel // size * (size - rm(dep, "out"))
        macs = self._fixed_macs
        for layout, base, dep in self._layers:
            new, old = _mac_scale(layout, rm(dep, "out"), rm(dep, "in"))
            macs += base // old * new
        return params, macs
