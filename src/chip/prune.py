"""Surgery: physically remove the channels a :class:`~chip.spec.PruningPlan` drops.

Every group is pruned through Torch-Pruning's DependencyGraph (``chip.groups``), so coupled
channels (a residual stream, a depthwise conv and its neighbours, a flatten into a linear layer)
share one kept set, and BatchNorm statistics, biases and classifier weights carry over. The option-A
pad shortcut of the CIFAR ResNets is pruned by :class:`chip.groups.PadShortcutPruner`.

The pruned model computes exactly what the original computes with the removed channels zeroed
(see :func:`masked_forward_hooks`, used by the tests).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from .errors import ChipError
from .groups import GroupGraph, find_groups
from .spec import PruningPlan

__all__ = ["apply", "masked_forward_hooks"]


def apply(model: nn.Module, plan: PruningPlan, *, inplace: bool = False,
          graph: GroupGraph | None = None) -> nn.Module:
    """Return ``model`` with the channels ``plan`` removes physically gone.

    Args:
        model: the unpruned model the plan was made for.
        plan: from :func:`chip.plan` or :meth:`PruningPlan.load`.
        inplace: modify ``model`` itself instead of a deep copy.
        graph: a :func:`~chip.groups.find_groups` result *for this very model object*.

    The result carries ``chip_plan`` (the plan) plus the ``chip_arch`` / ``chip_kwargs`` of the
    original, so :func:`chip.save` can rebuild it.
    """
    plan.validate()
    if not inplace:
        model = copy.deepcopy(model)
        graph = None
    if graph is None:
        first = next(iter(model.parameters()))  # trace in the model's device and dtype
        graph = find_groups(model, torch.zeros(plan.input_size, device=first.device,
                                               dtype=first.dtype))
    arch = getattr(model, "chip_arch", None)
    if plan.arch is not None and arch is not None and plan.arch != arch:
        raise ChipError(f"the plan is for {plan.arch!r} but the model is {arch!r}; "
                        "was the plan made for another architecture?")
    unknown = [name for name in plan.groups if name not in graph.by_name]
    missing = [name for name in graph.by_name if name not in plan.groups]
    if unknown or missing:  # a plan covers every group of the model it was made for
        raise ChipError(f"plan and model groups differ (only in the plan: {unknown[:4]}, only in "
                        f"the model: {missing[:4]}); was the plan made for another architecture?")
    for name, gplan in plan.groups.items():
        group = graph[name]
        if group.channels != gplan.channels:
            raise ChipError(f"group {name!r} has {group.channels} channels but the plan expects "
                            f"{gplan.channels}; is the model already pruned?")
    was_training = model.training
    model.eval()
    for name in plan.groups:
        removed = plan.removed(name)
        if removed:
            graph.pruning_group(name, removed).prune()
    model.train(was_training)
    model.chip_plan = plan
    return model


def masked_forward_hooks(model: nn.Module, plan: PruningPlan, graph: GroupGraph) -> list:
    """Zero the channels ``plan`` removes at the output of every module that carries them.

    The reference semantics of pruning: a model with these hooks computes what the pruned model
    computes. Returns the hook handles (call ``.remove()`` on each to undo).
    """
    handles = []
    for name in plan.groups:
        removed = plan.removed(name)
        if not removed:
            continue
        for module_name, kind, per in graph[name].members:
            if kind != "out":
                continue
            handles.append(model.get_submodule(module_name).register_forward_hook(
                _zero_channels_hook(_expand(removed, per))))
    return handles


def _expand(removed: Iterable[int], per: int) -> torch.Tensor:
    return torch.tensor([c * per + j for c in removed for j in range(per)], dtype=torch.long)


def _zero_channels_hook(index: torch.Tensor):
    def hook(_module, _inputs, output):
        out = output.clone()
        out[:, index.to(out.device)] = 0
        return out

    return hook
