"""Prunable channel groups of any torchvision-style CNN, found with Torch-Pruning's DependencyGraph.

A :class:`ChannelGroup` is one set of channels that must be pruned together: the output channels of
one or more *producers* (convs/linears/custom layers writing them, e.g. every block of a ResNet stage
for the residual stream), everything that carries them along (BatchNorm, depthwise convs) and the
input channels of the *consumers* (the layers that read them). CHIP scores a group on the tensors
its consumers read (SPEC §1), so each group also records, per consumer, which positions of that
consumer's input hold the group's channels (plain ``range(C)`` except after ``torch.cat`` or a
flatten into a linear layer).

Groups are named after their root producer: the first conv/linear Torch-Pruning visits, which is
the first producer in execution order (``"conv1"`` for the stem + stage-1 stream of a CIFAR ResNet).
Groups whose channels reach the model output without a consumer (the classifier's outputs) are not
prunable and are left out.

Modules that Torch-Pruning cannot trace get a customized pruner through :func:`register_pruner`;
chip registers one for the option-A pad shortcut of the CIFAR ResNets (:class:`PadShortcutPruner`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import ChipError

__all__ = [
    "ChannelGroup",
    "Consumer",
    "GroupGraph",
    "PadShortcutPruner",
    "find_groups",
    "register_pruner",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR = (nn.Linear,)

# module type -> customized Torch-Pruning pruner (filled by register_pruner)
CUSTOM_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {}


def register_pruner(module_type: type, pruner: tp.pruner.BasePruningFunc) -> None:
    """Teach chip (and its Torch-Pruning graph) how to prune a custom layer type.

    ``pruner`` implements ``prune_out_channels``, ``prune_in_channels``, ``get_out_channels`` and
    ``get_in_channels`` (a ``torch_pruning.pruner.BasePruningFunc``). Layers of this type are then
    traced as leaves, may produce and consume group channels, and are hooked like convs.
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
class Consumer:
    """A layer reading a group's channels: ``index[c]`` are the input positions of channel ``c``.

    ``index`` has shape (C, r): r > 1 when a flatten spreads each channel over r features.
    """

    name: str
    index: torch.Tensor

    @property
    def is_identity(self) -> bool:
        c, r = self.index.shape
        return r == 1 and torch.equal(self.index[:, 0], torch.arange(c))


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels (see the module docstring)."""

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    # every (module name, "in"|"out", number of that module's features per group channel)
    members: tuple[tuple[str, str, int], ...] = field(repr=False)

    @property
    def consumer_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.consumers)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels


def _is_leaf_layer(m: nn.Module) -> bool:
    return isinstance(m, _CONV + _LINEAR) or type(m) in CUSTOM_PRUNERS


def _index_table(idxs: Sequence[int], root_idxs: Sequence[int], channels: int) -> torch.Tensor:
    """(C, r) table of positions per root channel, from Torch-Pruning's plain/root index lists."""
    per_root: list[list[int]] = [[] for _ in range(channels)]
    for i, r in zip(idxs, root_idxs):
        per_root[int(r)].append(int(i))
    width = {len(p) for p in per_root}
    if len(width) != 1 or 0 in width:
        raise ChipError(
            f"cannot map group channels to consumer inputs (uneven index mapping {sorted(width)}); "
            "expected each channel to occupy the same number of input features"
        )
    return torch.tensor([sorted(p) for p in per_root], dtype=torch.long)


class GroupGraph:
    """The prunable groups of one model plus the Torch-Pruning graph they came from."""

    def __init__(self, model: nn.Module, dg: tp.DependencyGraph, groups: list[ChannelGroup]):
        self.model = model
        self.dg = dg
        self.groups = groups
        self.by_name = {g.name: g for g in groups}
        self._module_group = {}
        for g in groups:
            for name, kind, _ in g.members:
                self._module_group.setdefault((name, kind), g.name)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self.by_name[name]
        except KeyError:
            raise ChipError(
                f"unknown channel group {name!r}; expected one of {list(self.by_name)[:8]}..."
            ) from None

    def group_of(self, module_name: str, kind: str = "out") -> str | None:
        """Name of the group holding ``module_name``'s output (``kind='out'``) or input channels."""
        return self._module_group.get((module_name, kind))

    def pruning_group(self, name: str, removed: Sequence[int]):
        """The Torch-Pruning group that removes ``removed`` channels of group ``name``."""
        root = self.model.get_submodule(name)  # the group's first producer
        pruner = self.dg.get_pruner_of_module(root)
        return self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs=list(removed))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def find_groups(model: nn.Module, example_inputs: torch.Tensor) -> GroupGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups.

    Tracing runs in eval mode with autograd on (Torch-Pruning traces grad_fns); the model's mode is
    restored afterwards. Groups are returned in the order Torch-Pruning visits their roots, which
    follows execution order.
    """
    _register_builtin_pruners()
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    with _eval_mode(model), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=example_inputs,
            customized_pruners=dict(CUSTOM_PRUNERS),
            verbose=False,
        )
        groups: list[ChannelGroup] = []
        for tp_group in dg.get_all_groups(root_module_types=_CONV + _LINEAR + tuple(CUSTOM_PRUNERS)):
            group = _convert(tp_group, dg, names)
            if group is not None:
                groups.append(group)
    groups.sort(key=lambda g: order[g.name])
    return GroupGraph(model, dg, groups)


def _convert(tp_group, dg, names) -> ChannelGroup | None:
    root_dep, root_idxs = tp_group[0]
    root = root_dep.target.module
    channels = len(root_idxs)
    producers: list[str] = []
    consumers: list[Consumer] = []
    members: list[tuple[str, str, int]] = []
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in names:
            continue  # unwrapped parameters: none in the supported CNNs
        name = names[module]
        out_fn = dg.is_out_channel_pruning_fn(item.dep.handler)
        per_channel = max(1, len(item.idxs) // channels)
        if _is_depthwise(module):
            kinds = ("out", "in")
        elif _is_leaf_layer(module):
            kinds = ("out",) if out_fn else ("in",)
        else:
            kinds = ("out",)  # BatchNorm & co. carry the channels along
        for kind in kinds:
            members.append((name, kind, per_channel))
        if "out" in kinds and _is_leaf_layer(module) and name not in producers:
            producers.append(name)
        if "in" in kinds and _is_leaf_layer(module):
            table = _index_table(item.idxs, item.root_idxs, channels)
            consumers.append(Consumer(name, table))
    if not consumers:
        return None  # channels go straight to the output (the classifier): not prunable
    # name the group after its first producer in definition order (stable and readable)
    order = {n: i for i, n in enumerate(names.values())}
    producers.sort(key=order.__getitem__)
    consumers.sort(key=lambda c: order[c.name])
    return ChannelGroup(
        name=producers[0] if producers else names[root],
        channels=channels,
        producers=tuple(producers),
        consumers=tuple(consumers),
        members=tuple(members),
    )
