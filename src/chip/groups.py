"""Prunable channel groups of any PyTorch CNN, found with Torch-Pruning's DependencyGraph.

A :class:`ChannelGroup` is one set of channels that must be pruned together: the output channels of
one or more *producers* (convs/linears/custom layers writing them, e.g. every block of a ResNet stage
for the residual stream), everything that carries them along (BatchNorm, GroupNorm, LayerNorm,
depthwise convs, bare per-channel parameters) and the input channels of the *consumers* (the layers
that read them). Every member records, for each group channel ``c``, the positions ``index[c]`` it
occupies along that member's channel axis (plain ``range(C)`` except after ``torch.cat``, a flatten
into a linear layer, or when several groups share a layer). CHIP scores a group on the tensors its
consumers read (``docs/method.md`` section 1).

Groups are named after their first producer in definition order (``"conv1"`` for the stem +
stage-1 stream of a CIFAR ResNet). Groups whose channels only reach the model output (the
classifier's outputs) are not groups at all.

**Structure rules** (``docs/method.md`` section 6). Some layers constrain which channel sets can be
removed; each group turns its constraints into *units* (channels removed together) and *cells*
(channel blocks that must keep equal counts), and :meth:`ChannelGroup.choose` keeps the best units
under them:

* a grouped convolution (``1 < groups``, not depthwise) reads its input in ``groups`` equal blocks
  and keeps the *same positions* in every block (Torch-Pruning's rule): channels at the same
  position of each block form one unit;
* the output of a grouped convolution, and the channels of a GroupNorm, keep the *same number* of
  channels in every group (each block is a cell);
* a depthwise convolution (``groups == in_channels == out_channels``) carries its channels along.

**Refuse, don't guess.** A group chip cannot prune correctly is kept whole and listed in
:attr:`GroupGraph.skipped` with the reason: channels that pass through ``torch.split`` / ``chunk`` /
slicing / ``unbind`` / ``expand`` (their sizes are fixed in the model's code), reach the model's
output, feed attention, recurrent or embedding layers, a grouped transposed convolution, a
GroupNorm shared with other channels, or constraints that contradict each other. With
``check=True`` (the default), :func:`find_groups` also prunes a float64 copy of the model with random
weights and compares it with the masked original (:func:`chip.prune.check_groups`); a group whose
pruning changes what the model computes (a channel shuffle, a pixel shuffle, a channel-mixing op
Torch-Pruning takes for an element-wise one) is refused the same way.

Modules that Torch-Pruning cannot trace get a customized pruner through :func:`register_pruner`;
chip registers one for the option-A pad shortcut of the CIFAR ResNets (:class:`PadShortcutPruner`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.ops import OPTYPE

from .errors import ChipError
from .utils import device_dtype, eval_mode, first_line, require_data

__all__ = [
    "ChannelGroup",
    "Consumer",
    "GroupGraph",
    "Member",
    "PadShortcutPruner",
    "find_groups",
    "register_pruner",
]

_CONV = nn.modules.conv._ConvNd  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
_LINEAR = nn.Linear
_LEAF_TYPES = (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.LINEAR, OPTYPE.CUSTOMIZED)
_CARRIER_TYPES = (OPTYPE.BN, OPTYPE.GN, OPTYPE.LN, OPTYPE.IN, OPTYPE.PRELU, OPTYPE.PARAMETER)
# graph nodes whose channel sizes are fixed in the model's code or that chip does not prune
_REFUSED = {
    OPTYPE.SPLIT: "pass through torch.split/chunk, whose sizes are fixed in the model's code",
    OPTYPE.SLICE: "pass through a slice (x[:, a:b]), whose bounds are fixed in the model's code",
    OPTYPE.UNBIND: "pass through torch.unbind",
    OPTYPE.EXPAND: "pass through Tensor.expand",
    OPTYPE.OUTPUT: "are part of the model's output",
    OPTYPE.MHA: "feed a MultiheadAttention layer (chip does not prune attention)",
    OPTYPE.LSTM: "feed an LSTM",
    OPTYPE.EMBED: "are an embedding dimension",
}
_OUTPUT_REASON = f"its channels {_REFUSED[OPTYPE.OUTPUT]}"
# element-wise ops that never move channels (others are named in refusal messages)
_PLAIN_OPS = (
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "hardtanh",
    "sigmoid",
    "hardsigmoid",
    "hardswish",
    "silu",
    "gelu",
    "elu",
    "leakyrelu",
    "tanh",
    "softplus",
    "mish",
    "clamp",
    "pool",
    "upsample",
    "clone",
    "neg",
    "dropout",
    "mean",
    "cat",
    "view",
    "reshape",
    "flatten",
    "unsafeview",
    "accumulategrad",
    "threshold",
    "exp",
    "sqrt",
    "rsqrt",
    "pow",
    "where",
)

# module type -> customized Torch-Pruning pruner (filled by register_pruner)
CUSTOM_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {}


def register_pruner(module_type: type, pruner: tp.pruner.BasePruningFunc) -> None:
    """Teach chip (and its Torch-Pruning graph) how to prune a custom layer type.

    ``pruner`` implements ``prune_out_channels``, ``prune_in_channels``, ``get_out_channels`` and
    ``get_in_channels`` (a ``torch_pruning.pruner.BasePruningFunc``). Layers of this type are then
    traced as leaves, may produce and consume group channels (channel axis 1), and are hooked like
    convs.
    """
    CUSTOM_PRUNERS[module_type] = pruner


class PadShortcutPruner(tp.pruner.BasePruningFunc):
    """Prunes an option-A pad shortcut (``chip.models.resnet_cifar.PadShortcut``).

    The shortcut copies input channel ``src[k]`` to output position ``dst[k]``. Pruning input
    channels drops the pairs whose source is removed; pruning output channels drops the pairs whose
    target is removed. Both re-number the remaining positions, so every kept stream channel stays
    at its original position relative to the others.
    """

    TARGET_MODULES = None

    @staticmethod
    def _renumber(index: torch.Tensor, removed: Sequence[int], size: int):
        keep_mask = torch.ones(size, dtype=torch.bool)
        keep_mask[list(removed)] = False
        new_pos = torch.cumsum(keep_mask.long(), 0) - 1
        valid = keep_mask[index]
        return valid, new_pos[index]

    def _prune(self, layer: nn.Module, idxs: Sequence[int], side: str, count: str) -> nn.Module:
        """Drop the (src, dst) pairs whose ``side`` index is removed; renumber that side."""
        other = "dst" if side == "src" else "src"
        index = getattr(layer, side)
        valid, renumbered = self._renumber(index.cpu(), idxs, getattr(layer, count))
        setattr(layer, other, getattr(layer, other)[valid.to(index.device)])
        setattr(layer, side, renumbered[valid].to(index.device))
        setattr(layer, count, getattr(layer, count) - len(set(idxs)))
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._prune(layer, idxs, "dst", "out_channels")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._prune(layer, idxs, "src", "in_channels")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def _register_builtin_pruners() -> None:
    from .models.resnet_cifar import PadShortcut

    CUSTOM_PRUNERS.setdefault(PadShortcut, PadShortcutPruner())


@dataclass(frozen=True)
class Member:
    """One layer (or bare parameter) touching a group's channels.

    ``kind`` is ``"out"`` (writes or carries the channels: producers, norms, depthwise convs,
    per-channel parameters) or ``"in"`` (reads them: consumers). ``index`` has shape (C, r):
    the positions of group channel ``c`` along the member's channel ``axis`` (1 for NCHW layers,
    -1 for linear layers and channels-last LayerNorms); r > 1 when a flatten spreads each channel
    over r features.
    """

    name: str
    index: torch.Tensor
    kind: str = "in"
    axis: int = 1

    @property
    def is_identity(self) -> bool:
        c, r = self.index.shape
        return r == 1 and torch.equal(self.index[:, 0], torch.arange(c))


Consumer = Member  # a member of kind "in" that is a conv/linear/custom layer


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels (see the module docstring).

    ``units`` (n_units, unit_size) lists the channels removed together; ``unit_cell`` (n_units,)
    the cell of each unit: every cell keeps the same number of units. ``step`` is the width
    granularity that follows (1 for plain groups).
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[Member, ...]
    members: tuple[Member, ...] = field(repr=False)
    root: str = ""
    units: torch.Tensor = field(default=None, repr=False)
    unit_cell: torch.Tensor = field(default=None, repr=False)
    ops: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.units is None:
            object.__setattr__(self, "units", torch.arange(self.channels).view(-1, 1))
        if self.unit_cell is None:
            object.__setattr__(self, "unit_cell", torch.zeros(len(self.units), dtype=torch.long))
        if not self.root:
            object.__setattr__(self, "root", self.name)

    @property
    def consumer_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.consumers)

    @property
    def num_cells(self) -> int:
        return int(self.unit_cell.max()) + 1

    @property
    def step(self) -> int:
        """Kept widths are multiples of this (``unit_size * cells``)."""
        return self.units.shape[1] * self.num_cells

    def width(self, k: int, round_to: int = 1) -> int:
        """The allowed width nearest to a wanted ``k``: a multiple of ``lcm(step, round_to)``,
        at least one such multiple, at most ``channels``."""
        q = math.lcm(self.step, round_to)
        return min(self.channels, max(q, int(round(k / q)) * q))

    def choose(self, scores: torch.Tensor | None, k: int) -> list[int]:
        """Ascending indices of the ``k`` channels to keep (``k`` a multiple of :attr:`step`).

        Each cell keeps its ``k / step`` best units by mean score (stable: ties keep the lower
        unit); without scores the first units of each cell.
        """
        if k % self.step or not 0 < k <= self.channels:
            raise ChipError(
                f"group {self.name!r}: width {k} is not a multiple of its step "
                f"{self.step} in [1, {self.channels}]"
            )
        finite = scores is None or bool(torch.isfinite(scores).all())
        if scores is not None and (scores.dim() != 1 or not finite):
            raise ChipError(
                f"scores of group {self.name!r} must be finite, of shape ({self.channels},); got "
                f"shape {tuple(scores.shape)}" + ("" if finite else " with NaN or Inf values")
            )
        if scores is not None and scores.numel() != self.channels:
            raise ChipError(
                f"scores have {scores.numel()} channels but group {self.name!r} has "
                f"{self.channels}; were they computed on this model?"
            )
        per_cell = k // self.step
        if scores is None:
            unit_scores = torch.zeros(len(self.units), dtype=torch.float64)
        else:
            unit_scores = scores.detach().double().cpu()[self.units].mean(1)
        kept: list[int] = []
        for cell in range(self.num_cells):
            ids = torch.nonzero(self.unit_cell == cell).flatten()
            order = torch.sort(-unit_scores[ids], stable=True).indices[:per_cell]
            kept += self.units[ids[order]].flatten().tolist()
        return sorted(kept)

    def unusual_ops(self) -> list[str]:
        """The autograd ops the channels pass through that are not plain element-wise ones (for
        messages: a channel shuffle or pixel shuffle shows up here)."""
        return [op for op in self.ops if not op.lower().startswith(_PLAIN_OPS)]

    def check_keep(self, keep: Sequence[int]) -> None:
        """Raise :class:`ChipError` unless ``keep`` respects the group's units and cells."""
        mask = torch.zeros(self.channels, dtype=torch.bool)
        mask[list(keep)] = True
        unit_mask = mask[self.units]
        whole = unit_mask.all(1)
        if not torch.equal(whole, unit_mask.any(1)):
            raise ChipError(
                f"group {self.name!r}: the kept channels split a unit of channels that "
                f"must be kept or removed together (units of {self.units.shape[1]})"
            )
        counts = torch.bincount(self.unit_cell[whole], minlength=self.num_cells)
        if len(set(counts.tolist())) != 1:
            raise ChipError(
                f"group {self.name!r}: every one of its {self.num_cells} channel blocks "
                f"must keep the same number of channels, got {counts.tolist()}"
            )


class GroupGraph:
    """The groups of one model: prunable ones, skipped ones with reasons, and the TP graph.

    ``groups`` are the prunable groups in execution order; ``skipped`` maps each group chip keeps
    whole to the reason; ``all_groups`` holds both. ``dg`` is the Torch-Pruning graph of ``model``
    itself (``None`` when the groups were found on a checked copy).
    """

    def __init__(
        self,
        model: nn.Module,
        dg,
        groups: list[ChannelGroup],
        skipped: dict[str, str] | None = None,
        all_groups: list[ChannelGroup] = (),
        untraced: Sequence[str] = (),
    ):
        self.model = model
        # conv/linear layers that ran but that the trace did not reach (an argmax, detach or
        # no_grad between them and the output): chip leaves them as they are
        self.untraced = tuple(untraced)
        self.dg = dg
        self.counter = None  # a chip.counting.WidthCounter, when one was built while checking
        self.groups = groups
        self.skipped = dict(skipped or {})
        self.all_groups = list(all_groups) or list(groups)
        self.by_name = {g.name: g for g in groups}
        self._all = {g.name: g for g in self.all_groups}
        self._module_group: dict[tuple[str, str], str] = {}
        for g in self.all_groups:
            for m in g.members:
                self._module_group.setdefault((m.name, m.kind), g.name)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self.by_name[name] if name in self.by_name else self._all[name]
        except KeyError:
            raise ChipError(
                f"unknown channel group {name!r}; expected one of {list(self.by_name)[:8]}..."
            ) from None

    def group_of(self, module_name: str, kind: str = "out") -> str | None:
        """Name of the group holding ``module_name``'s output (``kind='out'``) or input channels."""
        return self._module_group.get((module_name, kind))

    def release(self) -> None:
        """Drop the Torch-Pruning graph. Its nodes and dependencies form reference cycles that
        hold every module (and so every weight) of the traced model until Python's cycle
        collector happens to run; on large models that is gigabytes per traced copy."""
        if self.dg is not None:
            for node in self.dg.module2node.values():  # also the autograd nodes of the trace,
                node.inputs, node.outputs, node.dependencies = [], [], []  # which hold weights
                node.module = node.grad_fn = None
            self.dg.__dict__.clear()
            self.dg = None

    def without(self, bad: dict[str, str]) -> GroupGraph:
        """A copy with the groups in ``bad`` moved to :attr:`skipped` (with their reasons)."""
        return GroupGraph(
            self.model,
            self.dg,
            [g for g in self.groups if g.name not in bad],
            {**self.skipped, **bad},
            self.all_groups,
            self.untraced,
        )

    def pruning_group(self, name: str, removed: Sequence[int], *, frozen: bool = False):
        """The Torch-Pruning group that removes channels ``removed`` of group ``name``."""
        if self.dg is None:
            raise ChipError(
                "this group graph was found on a checked copy; trace the model itself "
                "(find_groups(model, x, check=False)) to prune it"
            )
        group = self[name]
        root = self.model.get_submodule(group.root)
        pruner = self.dg.get_pruner_of_module(root)
        with _tolerant_mappings(self.dg.chip_unmapped, frozen=frozen, limit=_walk_limit(self.dg)):
            return self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs=list(removed))

    def prune(self, removed: Mapping[str, Sequence[int]]) -> None:
        """Remove channels ``removed[group]`` (original indices) of several groups at once.

        All Torch-Pruning groups are built first, on the unpruned graph; then every (layer,
        pruning function) runs once with the union of its indices. Same result as pruning the
        groups one after another (each layer is cut once, in original coordinates), without
        refreshing Torch-Pruning's index mappings after every group.
        """
        merged: dict[tuple[int, Any], tuple[Any, set[int]]] = {}
        for name, idxs in removed.items():
            if len(idxs):
                for item in self.pruning_group(name, idxs, frozen=True):
                    key = (id(item.dep.target), item.dep.handler)
                    merged.setdefault(key, (item.dep, set()))[1].update(int(i) for i in item.idxs)
        for dep, idxs in merged.values():
            if isinstance(dep.target.module, nn.Parameter):
                self._replace_parameter(dep, sorted(idxs))
            else:
                dep(sorted(idxs))

    def _replace_parameter(self, dep, idxs: list[int]) -> None:
        """A bare parameter is pruned into a new Parameter set back on its owner (as TP does)."""
        old = dep.target.module
        name = self.dg._param_to_name.pop(old)
        new = dep(idxs)
        owner_name, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(owner_name), attr, new)
        self.dg._param_to_name[new] = name
        self.dg.module2node[new] = self.dg.module2node.pop(old)
        self.dg.module2node[new].module = new


_MAPPINGS = (
    "update_concat_index_mapping",
    "update_split_index_mapping",
    "update_reshape_index_mapping",
    "update_unbind_index_mapping",
    "update_expand_index_mapping",
    "update_slice_index_mapping",
)


@contextlib.contextmanager
def _tolerant_mappings(unmapped: set, frozen: bool = False, limit: int = 20_000):
    """Torch-Pruning's index mappings, made safe for models it does not understand.

    Torch-Pruning maps channels through ``cat``/``split``/``view``/... by channel counts it infers
    from the graph. A reshape keeps a (stride) mapping only when it is a flatten into linear
    layers: on other reshapes (an unflatten, a channel shuffle) such a mapping builds index lists
    that grow without bound. Any mapping that raises (an uninferable channel count, a division by
    zero) leaves the default mapping. Either way the node goes into ``unmapped`` and the groups
    through it are refused, instead of the whole model failing. Active while chip builds graphs and groups.

    ``limit`` bounds the items of one group's dependency walk. ``frozen=True`` also skips the whole-graph mapping refresh Torch-Pruning runs before building
    every group: right while nothing is pruned (building all groups of a graph, or collecting the
    groups of a plan before pruning any), and the refresh is the slow part on models with many
    concatenations (DenseNet: quadratic in their inputs).
    """
    originals = {
        name: getattr(tp_index_mapping, name) for name in _MAPPINGS + ("update_index_mapping",)
    }

    def guard(name):
        def guarded(graph, node):
            if node in unmapped:
                return
            deps = [
                *node.dependencies,
                *(
                    d
                    for n in node.inputs + node.outputs
                    for d in n.dependencies
                    if d.target is node
                ),
            ]
            before = [list(d.index_mapping) for d in deps]
            try:
                originals[name](graph, node)
            except (ZeroDivisionError, TypeError, IndexError, ValueError):
                unmapped.add(node)
                return
            changed = any(d.index_mapping != b for d, b in zip(deps, before))
            if name == "update_reshape_index_mapping" and changed and not _feeds_linear_only(node):
                for d, b in zip(deps, before):  # not a flatten into linear layers: undo, refuse
                    d.index_mapping = b
                unmapped.add(node)

        return guarded

    add_dep, has_pruning_op = tp.dependency.Group.add_dep, tp.dependency.Group.has_pruning_op

    def bounded_add_dep(group, dep, idxs):
        # Torch-Pruning's dependency walk can cycle (slowly, and without bound in memory) when
        # index mappings keep shifting, e.g. through an in-place slice update it takes for an
        # element-wise op; real groups have far fewer items than twice the graph's nodes
        if len(group._group) > limit:
            raise RecursionError(f"its dependency walk passed {limit} steps")
        add_dep(group, dep, idxs)
        index = group.__dict__.setdefault("_chip_index", {})
        index.setdefault((id(dep.target), dep.handler), []).append(idxs)

    def indexed_has_pruning_op(group, dep, idxs):
        # the same test as Torch-Pruning's, by lookup instead of a scan of every item (the scan
        # makes each walk quadratic in its length)
        index = group.__dict__.get("_chip_index")  # complete: every item came via add_dep
        if index is None:
            return has_pruning_op(group, dep, idxs)
        return any(known == idxs for known in index.get((id(dep.target), dep.handler), ()))

    for name in _MAPPINGS:
        setattr(tp_index_mapping, name, guard(name))
    if frozen:
        tp_index_mapping.update_index_mapping = lambda graph: None
    tp.dependency.Group.add_dep = bounded_add_dep
    tp.dependency.Group.has_pruning_op = indexed_has_pruning_op
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(tp_index_mapping, name, fn)
        tp.dependency.Group.add_dep = add_dep
        tp.dependency.Group.has_pruning_op = has_pruning_op


def _walk_limit(dg) -> int:
    """Items one group's dependency walk may add: twice the graph's nodes, plus slack (measured:
    the largest real groups of the torchvision zoo stay below 0.6 x nodes)."""
    return 2 * len(dg.module2node) + 100


def _feeds_linear_only(node) -> bool:
    """Whether every path out of ``node`` reaches a linear layer through element-wise ops only."""
    stack, seen = list(node.outputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.type == OPTYPE.LINEAR:
            continue
        if n.type != OPTYPE.ELEMENTWISE or not n.outputs:
            return False
        stack.extend(n.outputs)
    return bool(seen)


def find_groups(
    model: nn.Module, example_inputs: torch.Tensor, *, check: bool = True, seed: int = 0
) -> GroupGraph:
    """Trace ``model`` on ``example_inputs`` (N, C, ...) and return its channel groups.

    Tracing runs in eval mode with autograd on (Torch-Pruning traces grad_fns); every submodule's
    own training flag is restored afterwards. Groups are returned in execution order.

    ``check=True`` also verifies every group by pruning float64 copies of the model with random
    weights (seeded by ``seed``) and comparing them with the masked original
    (:func:`chip.prune.check_groups`); groups that fail move to :attr:`GroupGraph.skipped`. The
    returned graph then has no Torch-Pruning graph (``dg is None``): it names groups and layers,
    which is all planning and scoring need.

    Raises:
        ChipError: the model's weights have no data (the meta device).
    """
    require_data(model)
    if not check:
        return _trace_groups(model, example_inputs)
    from .prune import check_groups, probe_copy

    work = probe_copy(model, seed)
    device, dtype = device_dtype(work)
    x = example_inputs.to(
        device=device, dtype=dtype if example_inputs.is_floating_point() else example_inputs.dtype
    )
    graph = _trace_groups(work, x)
    bad = check_groups(model, graph, example_inputs, seed=seed)
    graph.release()
    checked = graph.without(bad)
    result = GroupGraph(
        model, None, checked.groups, checked.skipped, checked.all_groups, graph.untraced
    )
    result.counter = graph.counter  # exact counts do not depend on the weights: plan reuses it
    return result


def _trace_groups(model: nn.Module, example_inputs: torch.Tensor) -> GroupGraph:
    _register_builtin_pruners()
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    with eval_mode(model), torch.enable_grad():
        dg, shapes = _build_graph(model, example_inputs, names)
        with _tolerant_mappings(dg.chip_unmapped, frozen=True, limit=_walk_limit(dg)):
            found = [
                _convert(g, dg, names, order, shapes)
                if isinstance(g, tp.dependency.Group)
                else (_untraceable(g[0], names, g[1]), g[1])
                for g in _tp_groups(dg)
            ]
    found = [f for f in found if f is not None]
    found.sort(key=lambda f: order.get(f[0].name, len(order)))
    prunable = [g for g, reason in found if reason is None]
    skipped = {g.name: reason for g, reason in found if reason is not None}
    roots = (_CONV, _LINEAR) + tuple(CUSTOM_PRUNERS)
    untraced = [
        n
        for m, n in names.items()
        if isinstance(m, roots) and n in shapes and m not in dg.module2node
    ]
    return GroupGraph(model, dg, prunable, skipped, [g for g, _ in found], untraced)


def retrace(graph: GroupGraph, model: nn.Module, example_inputs: torch.Tensor) -> GroupGraph:
    """``graph``'s groups on ``model``, another instance of the same architecture: only the
    Torch-Pruning graph is built again (for pruning it), not the groups."""
    names = {m: n for n, m in model.named_modules()}
    with eval_mode(model), torch.enable_grad():
        dg, _ = _build_graph(model, example_inputs, names)
    return GroupGraph(model, dg, graph.groups, graph.skipped, graph.all_groups, graph.untraced)


def _build_graph(model: nn.Module, example_inputs: torch.Tensor, names):
    """Torch-Pruning's DependencyGraph of ``model`` (with ``chip_unmapped``) and the input and
    output shapes of every module's first call. Call in eval mode with autograd on."""
    unmapped: set = set()
    shapes: dict[str, tuple] = {}
    handles = [m.register_forward_hook(_shape_hook(shapes, names)) for m in names]
    try:  # a tuple: Torch-Pruning would otherwise try model(*x) (x[0] unbatched) first
        with _tolerant_mappings(unmapped):
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=(example_inputs,),
                customized_pruners=dict(CUSTOM_PRUNERS),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - a model that does not run is the user's input
        _check_runs(model, example_inputs)
        raise ChipError(
            f"Torch-Pruning cannot trace the model ({first_line(exc, with_type=True)})"
        ) from None
    finally:
        for h in handles:
            h.remove()
    dg.chip_unmapped = unmapped
    return dg, shapes


def _tp_groups(dg):
    """Torch-Pruning's groups, one per root conv/linear/custom layer in graph order (what
    ``DependencyGraph.get_all_groups`` yields), except that a root whose group Torch-Pruning
    fails to build gives ``(module, reason)`` instead of ending the whole walk."""
    root_types = (_CONV, _LINEAR) + tuple(CUSTOM_PRUNERS)
    visited: set = set()
    for module in list(dg.module2node):
        if not isinstance(module, root_types) or module in visited:
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = dg.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure refuses this group only
            visited.add(module)
            yield (
                module,
                f"Torch-Pruning cannot follow its channels ({first_line(exc, with_type=True)})",
            )
            continue
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(item.dep.target.module)
        yield group


def _untraceable(module, names, reason: str) -> ChannelGroup:
    """A placeholder group for a root whose Torch-Pruning group could not be built."""
    name = names.get(module, "?")
    channels = getattr(module, "out_channels", None) or getattr(module, "out_features", 1)
    return ChannelGroup(
        name=name, channels=channels, producers=(name,), consumers=(), members=(), root=name
    )


def _shape_hook(shapes: dict, names):
    """Forward hook recording module name -> (input shape, output shape) of its first call."""

    def hook(module, inputs, output):
        name = names.get(module)
        if name not in shapes:
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            shapes[name] = (
                tuple(inp.shape) if inp is not None else None,
                tuple(output.shape) if isinstance(output, torch.Tensor) else None,
            )

    return hook


def _check_runs(model: nn.Module, x: torch.Tensor) -> None:
    """ChipError naming the input shape if ``model(x)`` fails."""
    try:
        with torch.inference_mode():
            model(x)
    except Exception as exc:  # noqa: BLE001 - a model that does not run is the user's input
        raise ChipError(
            f"the model does not run on an input of shape {tuple(x.shape)}: "
            f"{first_line(exc)}; expected (batch, channels, "
            "*spatial) that the model accepts"
        ) from None


def _index_table(
    idxs: Sequence[int], root_idxs: Sequence[int], channels: int
) -> torch.Tensor | None:
    """(C, r) table of positions per root channel, or None when channels map unevenly."""
    per_root: list[list[int]] = [[] for _ in range(channels)]
    for i, r in zip(idxs, root_idxs):
        if r is None or not 0 <= int(r) < channels:
            return None
        per_root[int(r)].append(int(i))
    width = {len(p) for p in per_root}
    if len(width) != 1 or 0 in width:
        return None
    return torch.tensor([sorted(p) for p in per_root], dtype=torch.long)


def _channel_axis(module, name: str, size: int, shapes) -> int | None:
    """Axis of ``module``'s output (and input) holding its ``size`` channels; None if unclear."""
    if isinstance(module, (_LINEAR, nn.Parameter)):
        return -1
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is nn.LayerNorm.forward:
            return -1
        shape = (shapes.get(name) or (None, None))[1]
        if not shape:
            return None
        at_1, at_last = len(shape) > 1 and shape[1] == size, shape[-1] == size
        return 1 if at_1 and not at_last else -1 if at_last and not at_1 else None
    return 1


class _Builder:
    """Collects one TP group's members, constraints and refusal reasons."""

    def __init__(self, channels: int):
        self.channels = channels
        self.members: list[Member] = []
        self.producers: list[str] = []
        self.reasons: list[str] = []
        self.ops: list[str] = []
        self.unit_keys: list[torch.Tensor] = []  # (C,) positions that must be removed together
        self.cell_keys: list[tuple[torch.Tensor, int]] = []  # ((C,) block ids, number of blocks)

    def refuse(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


def _convert(tp_group, dg, names, order, shapes):
    """(ChannelGroup, reason or None) for one Torch-Pruning group; None if it has no consumer."""
    root_item = tp_group[0]
    root = root_item.dep.target.module
    b = _Builder(len(root_item.root_idxs))
    for item in tp_group:
        node = item.dep.target
        module = node.module
        if node.type in (OPTYPE.SLICE, OPTYPE.SPLIT) and not _on_channels(node):
            b.ops.append(node.grad_fn.name())  # a spatial slice or split: channels pass unchanged
            continue
        if node.type in _REFUSED:
            b.refuse(f"its channels {_REFUSED[node.type]}")
            continue
        if node in dg.chip_unmapped:
            b.refuse(f"its channels pass through a {node.grad_fn.name()} Torch-Pruning cannot map")
            continue
        if node.type in (OPTYPE.CONCAT, OPTYPE.RESHAPE, OPTYPE.ELEMENTWISE):
            op = getattr(module, "_grad_fn", None) or type(module).__name__.strip("_")
            b.ops.append(str(op))
            continue
        if isinstance(module, nn.Parameter):
            name = dg._param_to_name.get(module)
        else:
            name = names.get(module)
        if name is None:
            b.refuse("Torch-Pruning found a layer chip cannot name")
            continue
        table = _index_table(item.idxs, item.root_idxs, b.channels)
        if table is None:
            b.refuse(f"its channels map unevenly onto {name}")
            continue
        size = _size(dg, node, module, dg.is_out_channel_pruning_fn(item.dep.handler))
        if size is not None and int(table.max()) >= size:
            b.refuse(f"its {b.channels} channels do not fit the {size} channels of {name}")
            continue
        if node.type in _LEAF_TYPES:
            _add_leaf(
                b, node.type, module, name, table, dg.is_out_channel_pruning_fn(item.dep.handler)
            )
        elif node.type in _CARRIER_TYPES:
            _add_carrier(b, module, name, table, dg, shapes)
        else:
            b.refuse(f"chip cannot prune {type(module).__name__} {name}")
    consumers = [m for m in b.members if m.kind == "in"]
    if not consumers and set(b.reasons) <= {_OUTPUT_REASON}:
        return None  # channels go straight to the output (the classifier): not a group
    producers = sorted(b.producers, key=lambda n: order.get(n, len(order)))
    group_name = producers[0] if producers else names.get(root, "?")
    units, unit_cell = _constraints(b)
    members = tuple(
        sorted(_dedupe(b.members), key=lambda m: (order.get(m.name, len(order)), m.kind))
    )
    group = ChannelGroup(
        name=group_name,
        channels=b.channels,
        producers=tuple(producers),
        consumers=tuple(sorted(_dedupe(consumers), key=lambda m: order.get(m.name, len(order)))),
        members=members,
        root=names.get(root, group_name),
        units=units,
        unit_cell=unit_cell,
        ops=tuple(dict.fromkeys(b.ops)),
    )
    if not b.reasons and group.step >= group.channels:
        b.refuse(
            f"its layers allow no smaller width ({group.channels} channels in steps of "
            f"{group.step})"
        )
    return group, _summary(b.reasons)


def _summary(reasons: list[str]) -> str | None:
    """The first two reasons, and how many more (a skipped group's message stays one line)."""
    if not reasons:
        return None
    more = f" (and {len(reasons) - 2} more problems)" if len(reasons) > 2 else ""
    return "; ".join(reasons[:2]) + more


def _on_channels(node) -> bool:
    """Whether a slice/split node cuts the axis Torch-Pruning maps channels on (1; 2 for 3-D)."""
    fn = node.grad_fn
    dim, sizes = getattr(fn, "_saved_dim", None), getattr(fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None or not 0 <= dim < len(sizes):
        return True
    return dim == (2 if len(sizes) == 3 else 1)


def _size(dg, node, module, out_fn: bool) -> int | None:
    """Channels of ``module`` on the side Torch-Pruning prunes (None if unknown)."""
    if isinstance(module, nn.Parameter):
        return module.shape[node.pruning_dim]
    try:
        return dg.get_out_channels(module) if out_fn else dg.get_in_channels(module)
    except (AttributeError, IndexError, TypeError):
        return None


def _dedupe(members: list[Member]) -> list[Member]:
    seen, out = set(), []
    for m in members:
        key = (m.name, m.kind)
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def _add_leaf(b: _Builder, optype, module, name: str, table: torch.Tensor, out_fn: bool) -> None:
    if optype == OPTYPE.DEPTHWISE_CONV:
        if module.in_channels != module.out_channels:
            b.refuse(
                f"{name} is a grouped convolution with {module.in_channels} inputs and "
                f"{module.out_channels} outputs that Torch-Pruning takes for a depthwise one"
            )
            return
        b.members += [Member(name, table, "out"), Member(name, table, "in")]
        b.producers.append(name)
        return
    axis = -1 if isinstance(module, _LINEAR) else 1
    kind = "out" if out_fn else "in"
    b.members.append(Member(name, table, kind, axis))
    if kind == "out":
        b.producers.append(name)
    groups = getattr(module, "groups", 1) if isinstance(module, _CONV) else 1
    if groups == 1:
        return
    if module.transposed:
        b.refuse(f"{name} is a grouped transposed convolution (not supported)")
        return
    size = module.out_channels if kind == "out" else module.in_channels
    if table.shape[1] != 1 or not torch.equal(table[:, 0].sort().values, torch.arange(size)):
        b.refuse(f"the grouped convolution {name} mixes these channels with others")
        return
    block = size // groups
    if kind == "in":  # the same positions are kept in every block of the input
        b.unit_keys.append(table[:, 0] % block)
    else:  # every output block keeps the same number of channels
        b.cell_keys.append((table[:, 0] // block, groups))


def _add_carrier(b: _Builder, module, name: str, table: torch.Tensor, dg, shapes) -> None:
    if isinstance(module, nn.Parameter):  # pruned along Torch-Pruning's pruning dim
        b.members.append(Member(name, table, "out", dg.module2node[module].pruning_dim))
        return
    size = dg.get_out_channels(module)
    axis = _channel_axis(module, name, size, shapes)
    if axis is None:
        b.refuse(f"chip cannot tell the channel axis of {type(module).__name__} {name}")
        return
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        b.refuse(f"the LayerNorm {name} normalises over several dimensions")
        return
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        b.refuse(f"the InstanceNorm {name} tracks running statistics (Torch-Pruning drops them)")
        return
    b.members.append(Member(name, table, "out", axis))
    if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
        if table.shape[1] != 1 or not torch.equal(table[:, 0].sort().values, torch.arange(size)):
            b.refuse(f"the GroupNorm {name} normalises these channels together with others")
            return
        b.cell_keys.append((table[:, 0] // (size // module.num_groups), module.num_groups))


def _constraints(b: _Builder) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Units (channels removed together) and the cell of each unit, from the group's layers."""
    c = b.channels
    if not b.unit_keys and not b.cell_keys:
        return None, None
    # units: channels sharing a key under any unit constraint (union-find)
    parent = list(range(c))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in b.unit_keys:
        first: dict[int, int] = {}
        for ch, k in enumerate(key.tolist()):
            if k in first:
                parent[find(ch)] = find(first[k])
            else:
                first[k] = ch
    comps: dict[int, list[int]] = {}
    for ch in range(c):
        comps.setdefault(find(ch), []).append(ch)
    units = sorted(comps.values())
    if len({len(u) for u in units}) != 1:
        b.refuse("its grouped layers ask for units of different sizes")
        return None, None
    units_t = torch.tensor(units, dtype=torch.long)
    # cells: the common refinement of every block partition
    if b.cell_keys:
        cell_of: dict[tuple, int] = {}
        cell = torch.tensor(
            [
                cell_of.setdefault(tuple(int(k[0][ch]) for k in b.cell_keys), len(cell_of))
                for ch in range(c)
            ]
        )
        sizes = torch.bincount(cell)
        if len(set(sizes.tolist())) != 1:
            b.refuse("its grouped layers and GroupNorms split the channels into unequal blocks")
            return None, None
        for key, blocks in b.cell_keys:  # every block holds the same number of cells
            per_block = [
                len({int(cell[ch]) for ch in range(c) if int(key[ch]) == blk})
                for blk in range(blocks)
            ]
            if len(set(per_block)) != 1:
                b.refuse("its grouped layers and GroupNorms split the channels inconsistently")
                return None, None
    else:
        cell = torch.zeros(c, dtype=torch.long)
    n_cells = int(cell.max()) + 1
    unit_cells = cell[units_t]  # (n_units, unit_size)
    if bool((unit_cells == unit_cells[:, :1]).all()):  # every unit inside one cell
        return units_t, unit_cells[:, 0].clone()
    counts = torch.stack([torch.bincount(row, minlength=n_cells) for row in unit_cells])
    if bool((counts == counts[0, 0]).all()):  # every unit spread evenly over the cells
        return units_t, torch.zeros(len(units_t), dtype=torch.long)
    b.refuse("its grouped layers' unit and block structures contradict each other")
    return None, None
