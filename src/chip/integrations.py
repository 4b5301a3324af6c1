"""Interop with other pruning libraries.

:class:`CHIPImportance` lets users of Torch-Pruning drop chip's scores into their own pruners::

    scores = chip.calibrate(model, loader)                    # or chip.score(model, loader, "hrank")
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=CHIPImportance(scores, model),
                                  pruning_ratio=0.5, ignored_layers=[model.fc],
                                  customized_pruners=chip.groups.CUSTOM_PRUNERS)
    pruner.step()

Torch-Pruning then removes, in every group it prunes, the channels with the lowest chip score.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import ChipError

__all__ = ["CHIPImportance"]


class CHIPImportance(tp.importance.Importance):
    """A Torch-Pruning importance that returns chip's per-channel scores.

    Args:
        scores: :class:`chip.ChannelScores` (or a ``{group name: (C,) tensor}`` mapping) computed on
            the *unpruned* model the pruner works on.
        model: that model, to name its modules; ``None`` uses the names Torch-Pruning's dependency
            graph gives them (the same ``named_modules`` names when the pruner got the model).

    A Torch-Pruning group is matched to chip's group by module names: chip names each group after
    its first producer, so the chip group is the one whose name is among the TP group's
    out-channel-pruned layers. That layer's entry in the TP group maps chip's channel order onto
    the TP root's channels (``idxs`` -> ``root_idxs``), so the returned scores follow the TP
    group's root channel order. A TP group no chip group matches raises :class:`ChipError` (score
    the same, unpruned model; or add the layer to the pruner's ``ignored_layers``).
    """

    def __init__(self, scores, model: nn.Module | None = None):
        groups = getattr(scores, "groups", scores)
        if not isinstance(groups, Mapping) or not groups:
            raise ChipError(
                "CHIPImportance needs chip.ChannelScores or a non-empty "
                "{group name: scores} mapping"
            )
        self.scores = {
            name: torch.as_tensor(v).detach().to(torch.float64).cpu() for name, v in groups.items()
        }
        self._names = {m: n for n, m in model.named_modules()} if model is not None else None

    def _module_names(self, group) -> Mapping[nn.Module, str]:
        if self._names is not None:
            return self._names
        dg = getattr(group, "_DG", None)
        if dg is None:
            raise ChipError("cannot name the group's modules; pass model= to CHIPImportance")
        return dg._module2name

    def _match(self, group, names: Mapping[nn.Module, str]):
        """(chip group name, that layer's TP group item) for a TP group."""
        dg = group._DG
        out_layers = []
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or not dg.is_out_channel_pruning_fn(
                item.dep.handler
            ):
                continue
            name = names.get(module)
            out_layers.append(name)
            if name in self.scores:
                return name, item
        raise ChipError(
            f"no chip group matches the Torch-Pruning group of layers {out_layers[:4]}; "
            "expected scores of the same unpruned model (chip.calibrate / chip.score)"
        )

    @torch.no_grad()
    def __call__(self, group, **_) -> torch.Tensor:
        """(len(root idxs),) float32 chip scores of the group's root channels, in their order."""
        names = self._module_names(group)
        name, item = self._match(group, names)
        vec = self.scores[name]
        chip_idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        if chip_idxs.numel() and int(chip_idxs.max()) >= vec.numel():
            raise ChipError(
                f"scores of group {name!r} have {vec.numel()} channels but the model "
                f"has more; expected scores of the same unpruned model"
            )
        by_root = dict(zip((int(r) for r in item.root_idxs), vec[chip_idxs].tolist()))
        root_order = [int(r) for r in group[0].root_idxs]
        missing = [r for r in root_order if r not in by_root]
        if missing:
            raise ChipError(
                f"chip group {name!r} does not cover Torch-Pruning root channels "
                f"{missing[:4]}; expected one coupled channel set"
            )
        device = _device_of(group[0].dep.target.module)
        return torch.tensor([by_root[r] for r in root_order], dtype=torch.float32, device=device)


def _device_of(module) -> torch.device:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")
