"""Channel criteria behind one entry point, so every comparison prunes to identical widths.

``chip.score(model, loader, criterion)`` is the one entry point: it returns
:class:`~chip.calibration.ChannelScores` for any criterion of the table :data:`CRITERIA` (name ->
function, and whether it needs data); :func:`chip.plan` then turns them into kept sets. The CLI,
``chip run`` configs and the stability check take their criterion names from the same table.
(``chip.calibrate`` is the data pass behind the data criteria; it stays public because it also takes
a custom per-map criterion.) The widths a
plan gives depend only on the target and the model, never on the scores, so for one target every
criterion prunes to the same architecture and only the kept indices differ.

Data criteria (need a loader; computed by :func:`chip.calibration.calibrate` on the consumers'
input maps):

* ``"chip"``: channel independence (the paper's criterion).
* ``"hrank"``: HRank (Lin et al., CVPR 2020), the mean matrix rank of each channel's feature map.

Weight / seed criteria (no data; the model is traced once on ``example_inputs``, the loader's first
batch or the zoo architecture's input size):

* ``"l1"``: Li et al. 2017, "Pruning Filters for Efficient ConvNets": a channel's score is the L1
  norm of the filter that produces it (the sum of the absolute kernel weights, bias excluded).
  A coupled group written by several producers (a residual stream: the stem or shortcut plus every
  block's last conv) scores each channel with the *mean* over the group's conv/linear producers of
  their filters' L1 norms. Depthwise convs in a group produce its channels too and count as
  producers; producers without a weight matrix (the option-A pad shortcut, custom layers) are
  skipped.
* ``"random"``: seeded uniform scores in [0, 1) from ``torch.Generator().manual_seed(seed)``, drawn
  group by group in graph order (the control every criterion should beat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ChipError

if TYPE_CHECKING:  # the table is importable without torch (the CLI builds its parser from it)
    import torch
    import torch.nn as nn

    from .calibration import ChannelScores
    from .groups import ChannelGroup, GroupGraph

__all__ = ["CRITERIA", "Criterion", "get_criterion", "l1_scores", "random_scores", "score"]


@dataclass(frozen=True)
class Criterion:
    """One channel criterion (larger score = keep).

    Data criteria (``needs_data``) map a hook point's (N, C, ...) maps to (N, C) per-sample
    scores, averaged over the calibration samples by :func:`chip.calibrate`; the others map
    ``(model, graph)`` (plus ``seed`` when ``seeded``) to ``{group name: (C,) float64 scores}``.
    """

    name: str
    needs_data: bool
    fn: Callable
    help: str
    seeded: bool = False


def _chip(fmaps: torch.Tensor) -> torch.Tensor:
    from .ci import channel_independence

    return channel_independence(fmaps)


def _hrank(fmaps: torch.Tensor) -> torch.Tensor:
    from .ci import channel_rank

    if fmaps.dim() < 4:  # a linear layer's input: each channel is a 1 x r map
        fmaps = fmaps.reshape(fmaps.shape[0], fmaps.shape[1], 1, -1)
    if fmaps.dim() > 4:  # HRank defines no rank for a D x H x W map: refuse, don't guess
        raise ChipError(
            f"criterion 'hrank' ranks 2-D (H x W) feature maps, but a layer gives "
            f"{fmaps.dim() - 2}-D maps (shape {tuple(fmaps.shape)}); use criterion 'chip' or 'l1'"
        )
    return channel_rank(fmaps)


def _filter_l1(module: nn.Module) -> torch.Tensor:
    """(out_channels,) float64 L1 norms of ``module``'s filters (one per output channel)."""
    import torch
    import torch.nn as nn

    weight = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # (in, out / groups, k...): output channel o of group g is column o of that group's rows
        groups = module.groups
        w = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        w = w.transpose(1, 2).reshape(-1, weight.shape[0] // groups, *weight.shape[2:])
        weight = w
    return weight.to(torch.float64).abs().flatten(1).sum(1)


def _group_l1(model: nn.Module, graph: GroupGraph, group: ChannelGroup) -> torch.Tensor:
    """Mean over the group's conv/linear producers of their per-channel filter L1 norms.

    The channel order is the group's; each producer's output positions come from its member index
    table (group channel ``c`` is the producer's output ``index[c, 0]``).
    """
    import torch
    import torch.nn as nn

    total = torch.zeros(group.channels, dtype=torch.float64)
    seen = 0
    for member in group.members:
        if member.kind != "out" or member.name not in group.producers:
            continue
        module = model.get_submodule(member.name)
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        total += _filter_l1(module).cpu()[member.index[:, 0]]
        seen += 1
    if not seen:
        raise ChipError(
            f"group {group.name!r} has no conv/linear producer with weights; "
            "the l1 criterion needs one (use chip, hrank or random)"
        )
    return total / seen


def l1_scores(model: nn.Module, graph: GroupGraph) -> dict[str, torch.Tensor]:
    """``{group: (C,) float64}`` filter L1 norms (see the module docstring)."""
    return {g.name: _group_l1(model, graph, g) for g in graph}


def random_scores(
    model: nn.Module, graph: GroupGraph, seed: int | None = 0
) -> dict[str, torch.Tensor]:
    """``{group: (C,) float64}`` uniform scores from one generator seeded with ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return {g.name: torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in graph}


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("chip", True, _chip, "channel independence (the paper's criterion)"),
        Criterion("hrank", True, _hrank, "feature-map rank (HRank)"),
        Criterion("l1", False, l1_scores, "filter L1 norm (Li et al. 2017)"),
        Criterion(
            "random", False, random_scores, "seeded uniform scores (the control)", seeded=True
        ),
    )
}
"""Every criterion by name: the one table the library, the CLI and run configs use."""


def get_criterion(name: str, key: str = "criterion") -> Criterion:
    """The table entry ``name``; :class:`ChipError` naming ``key`` and the valid names if none."""
    try:
        return CRITERIA[name]
    except (KeyError, TypeError):
        raise ChipError(f"unknown {key} {name!r}; expected one of {', '.join(CRITERIA)}") from None


def _example_inputs(model: nn.Module, loader, example_inputs) -> torch.Tensor:
    """A small input batch to trace ``model`` on, in its device and dtype."""
    import torch

    from .calibration import first_batch
    from .utils import device_dtype

    device, dtype = device_dtype(model)
    if example_inputs is not None:
        x = example_inputs
    elif loader is not None:
        x = first_batch(loader)
    elif getattr(model, "chip_input_size", None) is not None:
        from .planning import default_input_size

        x = torch.zeros(default_input_size(model))
    else:
        raise ChipError(
            "cannot trace the model: pass example_inputs (e.g. torch.zeros(1, 3, 32, 32)) "
            "or a loader, or use a chip.models zoo model"
        )
    if not isinstance(x, torch.Tensor):
        raise ChipError(f"example_inputs must be a tensor, got {type(x).__name__}")
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def score(
    model: nn.Module,
    loader: Iterable | None = None,
    criterion: str = "chip",
    *,
    num_batches: int = 5,
    seed: int | None = 0,
    device=None,
    example_inputs: torch.Tensor | None = None,
    graph: GroupGraph | None = None,
    progress: bool = False,
) -> ChannelScores:
    """Score every prunable channel of ``model`` with ``criterion`` (larger = keep).

    Args:
        model: any torchvision-style CNN (a zoo model knows its input size).
        loader: calibration batches; required by the criteria that need data.
        criterion: a name in :data:`CRITERIA`.
        num_batches: calibration batches for the data criteria.
        seed: RNG seed (calibration RNGs; the ``random`` criterion's generator).
        device: where the data criteria run (default: CUDA if available).
        example_inputs: an input batch to trace weight criteria on (default: the loader's first
            batch, else the zoo architecture's input size).
        graph: a precomputed :func:`chip.groups.find_groups` result for ``model``.
        progress: show a progress bar during calibration.

    Returns:
        :class:`ChannelScores` with ``meta["criterion"]`` set. Weight criteria have no hook points
        (``points`` is empty) and ``num_samples == 0``.

    Raises:
        ChipError: an unknown criterion, or a data criterion without a loader.
    """
    import torch

    from . import __version__
    from .calibration import ChannelScores, calibrate
    from .groups import find_groups

    entry = get_criterion(criterion)
    if entry.needs_data:
        if loader is None:
            free = ", ".join(n for n, c in CRITERIA.items() if not c.needs_data)
            raise ChipError(
                f"criterion {criterion!r} needs calibration data; pass a loader "
                f"(or use one of {free}, which need none)"
            )
        return calibrate(
            model,
            loader,
            num_batches,
            device=device,
            seed=seed,
            criterion=criterion,
            graph=graph,
            progress=progress,
        )
    own_graph = graph is None
    if own_graph:
        graph = find_groups(model, _example_inputs(model, loader, example_inputs), check=False)
    try:
        with torch.no_grad():
            groups = entry.fn(model, graph, seed) if entry.seeded else entry.fn(model, graph)
    finally:
        if own_graph:
            graph.release()
    return ChannelScores(
        groups=groups,
        num_samples=0,
        meta={
            "arch": getattr(model, "chip_arch", None),
            "criterion": criterion,
            "seed": seed,
            "chip_version": __version__,
            "torch_version": torch.__version__,
        },
    )
