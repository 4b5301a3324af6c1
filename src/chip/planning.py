"""Targets -> :class:`PruningPlan`: which channels of every group to keep.

A target is one of

* a sparsity string of the reference code (docs/method.md section 3), e.g. ``"[0.]+[0.15]*2+[0.4]*27"``, for the
  zoo architectures (positions are looked up in :data:`SPARSITY_LAYOUTS`);
* a uniform rate ``0.3`` (every group loses 30 % of its channels);
* a per-layer mapping ``{"layer1.0.conv1": 0.5, ...}`` keyed by group or producer module name
  (groups not named are kept whole);
* a budget ``"flops=0.5"`` / ``"macs=0.5"`` / ``"params=0.6"``: the fraction of the unpruned
  model's MACs or params to keep, spread over the groups by an ``allocation``
  (:mod:`chip.allocation`: ``uniform``, one rate for every group; ``global``, one ranking of
  normalised scores; ``sensitivity``, widths chosen by the measured loss of each group at a
  ladder of widths). Counts are exact and analytic; the achieved fraction is reported in the
  plan, and the plan records the allocation and its measurements.

Kept widths are ``int(C * (1 - rate))`` (truncation, as the reference), at least 1, and with
``round_to=N`` rounded to the nearest multiple of N (at least N, at most C). The kept channels of a
group are its ``k`` highest-scoring ones, returned as ascending original indices; ties break
towards the lower index (a stable sort on the negated score). Without scores the first ``k``
channels are kept: the widths (and counts) are right, the choice is not meaningful.

A plan is plain data: it saves to JSON, can be reviewed or edited, and is applied by
:func:`chip.prune.apply`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from . import latency
from .allocation import Allocation, kept_width, rounding, solve
from .counting import CONVENTION, WidthCounter
from .errors import ChipError, ChipWarning
from .groups import ChannelGroup, GroupGraph, find_groups
from .options import check_round_to
from .targets import describe, parse_sparsity, parse_target
from .utils import atomic_write, example_input

__all__ = [
    "Allocation",
    "GroupPlan",
    "PruningPlan",
    "SPARSITY_LAYOUTS",
    "WidthCounter",
    "parse_sparsity",
    "parse_target",
    "plan",
]

# -- sparsity strings ---------------------------------------------------------------------------


class _SparsityLayouts(Mapping[str, Callable[[], list[list[str]]]]):
    """Read-only view of the registry: zoo arch -> function returning its sparsity layout.

    The layouts live with the models (:class:`chip.models.SparsityLayout`, registered by
    :func:`chip.models.register_model`); this view lists every registered architecture that has
    one, including architectures registered after import. ``SPARSITY_LAYOUTS[arch]()`` is, for
    each position of the sparsity string, the list of group names that take that rate.
    """

    @staticmethod
    def _table() -> dict[str, Any]:
        from .models import get_model_info, list_models

        infos = (get_model_info(name) for name in list_models())
        return {info.name: info.sparsity for info in infos if info.sparsity is not None}

    def __getitem__(self, arch: str) -> Callable[[], list[list[str]]]:
        layout = self._table()[arch]
        return lambda: [list(groups) for groups in layout.positions]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"SPARSITY_LAYOUTS({', '.join(self)})"


# zoo arch -> for each position of the sparsity string, the groups that take that rate (a view of
# the model registry; docs/method.md section 3)
SPARSITY_LAYOUTS: Mapping[str, Callable[[], list[list[str]]]] = _SparsityLayouts()


def _sparsity_layout(arch: str | None):
    """The registered :class:`chip.models.SparsityLayout` of ``arch``; ChipError when it has none."""
    from .models import get_model_info, list_models

    layout = get_model_info(arch).sparsity if arch in list_models() else None
    if layout is None:
        raise ChipError(
            f"sparsity strings need a zoo architecture ({', '.join(SPARSITY_LAYOUTS)}), got {arch!r}; "
            "use a uniform rate, a per-layer mapping or a flops=/params= budget instead"
        )
    return layout


def _sparsity_rates(arch: str | None, text: str, graph: GroupGraph) -> dict[str, float]:
    layout = _sparsity_layout(arch)
    rates = parse_sparsity(text)
    if len(rates) != len(layout.positions):
        raise ChipError(
            f"sparsity string for {arch} has {len(rates)} rates; expected exactly {len(layout.positions)} "
            f"({_layout_help(arch)})"
        )
    out: dict[str, float] = {}
    for position, (rate, groups) in enumerate(zip(rates, layout.positions)):
        for name in groups:
            if name not in graph.by_name:
                raise ChipError(
                    f"group {name!r} (sparsity position {position}) not found in the model; "
                    f"is it really a {arch}?"
                )
            out[name] = rate
    for note in layout.ignored:  # e.g. the CIFAR ResNets' stem rate (it follows the stage-1 stream)
        message = note.message(rates)
        if message is not None:
            warnings.warn(message, stacklevel=3)
    return out


def _layout_help(arch: str) -> str:
    """The one-line description of ``arch``'s sparsity positions (registered with the model)."""
    return _sparsity_layout(arch).help


# -- plans ---------------------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """Channels of one group: ``channels`` before pruning, ``keep`` ascending kept indices."""

    channels: int
    keep: list[int]

    @property
    def kept(self) -> int:
        return len(self.keep)


@dataclass(repr=False)
class PruningPlan:
    """Which channels of every prunable group to keep (plain data; JSON round trip)."""

    groups: dict[str, GroupPlan]
    arch: str | None = None
    input_size: tuple[int, ...] = (1, 3, 32, 32)
    target: str = ""
    scores_used: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    # groups chip keeps whole because it cannot prune them correctly: name -> reason
    skipped: dict[str, str] = field(default_factory=dict)
    # how a budget was spread (chip.allocation.solve's record; empty for other targets)
    allocation: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        pruned = sum(g.kept < g.channels for g in self.groups.values())
        counts = ""
        if {"base_params", "params", "base_macs", "macs"} <= set(self.stats):
            from .counting import format_count

            st = self.stats
            counts = (
                f"; params {format_count(st['base_params'])} -> {format_count(st['params'])}"
                f", MACs {format_count(st['base_macs'])} -> {format_count(st['macs'])}"
            )
        return (
            f"PruningPlan({self.arch}, target {self.target}: {len(self.groups)} groups, "
            f"{pruned} pruned, {len(self.skipped)} kept whole{counts}; .table() lists them)"
        )

    def table(self) -> str:
        """One line per group (channels, kept), then the groups kept whole and why."""
        width = max([len("group")] + [len(n) for n in self.groups])
        lines = [f"{'group':<{width}}  channels  kept"]
        for name, g in self.groups.items():
            lines.append(f"{name:<{width}}  {g.channels:>8}  {g.kept:>4}")
        for name, why in self.skipped.items():
            lines.append(f"kept whole: {name}: {why}")
        return "\n".join(lines)

    def widths(self) -> dict[str, int]:
        """Group name -> kept channels."""
        return {name: g.kept for name, g in self.groups.items()}

    def removed(self, name: str) -> list[int]:
        g = self.groups[name]
        kept = set(g.keep)
        return [i for i in range(g.channels) if i not in kept]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "chip.PruningPlan/1"
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> PruningPlan:
        if not isinstance(d, Mapping) or d.get("format") != "chip.PruningPlan/1":
            raise ChipError(
                "not a chip pruning plan (expected JSON with format 'chip.PruningPlan/1')"
            )
        try:
            groups = {k: GroupPlan(v["channels"], list(v["keep"])) for k, v in d["groups"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ChipError(
                f"malformed plan groups ({exc}); expected {{name: {{channels, keep}}}}"
            ) from None
        input_size, stats = d.get("input_size", (1, 3, 32, 32)), d.get("stats", {})
        if (
            not isinstance(input_size, (list, tuple))
            or not input_size
            or not all(isinstance(n, int) and n > 0 for n in input_size)
        ):
            raise ChipError(
                f"malformed plan input_size {input_size!r}; expected a list like [1, 3, 32, 32]"
            )
        if not isinstance(stats, Mapping):
            raise ChipError(f"malformed plan stats {stats!r}; expected a mapping")
        skipped = d.get("skipped", {})
        if not isinstance(skipped, Mapping) or not all(
            isinstance(v, str) for v in skipped.values()
        ):
            raise ChipError(f"malformed plan skipped {skipped!r}; expected {{group: reason}}")
        allocation = d.get("allocation", {})
        if not isinstance(allocation, Mapping):
            raise ChipError(f"malformed plan allocation {allocation!r}; expected a mapping")
        plan_ = cls(
            groups=groups,
            arch=d.get("arch"),
            input_size=tuple(input_size),
            target=d.get("target", ""),
            scores_used=bool(d.get("scores_used", True)),
            stats=dict(stats),
            skipped=dict(skipped),
            allocation=dict(allocation),
        )
        plan_.validate()
        return plan_

    def validate(self) -> None:
        """ChipError naming the first group whose ``channels`` is not a positive int or whose
        ``keep`` is not a non-empty ascending list of unique int indices in [0, channels)."""
        for name, g in self.groups.items():
            if not _is_int(g.channels) or g.channels < 1:
                raise ChipError(
                    f"group {name!r}: channels must be a positive integer, got {g.channels!r}"
                )
            if not isinstance(g.keep, list) or not all(_is_int(i) for i in g.keep):
                raise ChipError(
                    f"group {name!r}: keep must be a list of integer channel indices, got "
                    f"{g.keep!r}"[:200]
                )
            if (
                not g.keep
                or len(set(g.keep)) != len(g.keep)
                or g.keep != sorted(g.keep)
                or g.keep[0] < 0
                or g.keep[-1] >= g.channels
            ):
                raise ChipError(
                    f"group {name!r}: keep must be ascending unique indices in [0, "
                    f"{g.channels}) with at least one channel"
                )

    def save(self, path) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise ChipError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ChipError(
                f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        return cls.from_dict(data)


def _choose(scores: torch.Tensor | None, k: int, channels: int) -> list[int]:
    """The ``k`` highest-scoring of ``channels`` plain channels, ascending (ties: lower index)."""
    return ChannelGroup("", channels, (), (), ()).choose(scores, k)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_rates(mapping: Mapping[str, float], graph: GroupGraph) -> dict[str, float]:
    """``{group name: rate}`` from a ``{group or producer name: rate}`` mapping; ChipError for a
    layer that is not prunable, a rate out of range, or two names of one group with two rates."""
    out: dict[str, float] = {}
    named_by: dict[str, str] = {}
    for key, rate in mapping.items():
        name = key if key in graph.by_name or key in graph.skipped else graph.group_of(key, "out")
        if name is None:
            raise ChipError(
                f"layer {key!r} is not a prunable layer; expected a group or producer name "
                f"such as {list(graph.by_name)[:4]}"
            )
        kind, value = parse_target(rate)
        if kind != "uniform":
            raise ChipError(f"rate for {key!r} must be a number in [0, 1), got {rate!r}")
        if name in graph.skipped and value > 0:
            raise ChipError(
                f"layer {key!r} cannot be pruned: {graph.skipped[name]}; expected rate 0 "
                "or no entry for it"
            )
        if name in out and out[name] != value:
            raise ChipError(
                f"layers {named_by[name]!r} and {key!r} share one channel group ({name!r}) but "
                f"are given different rates ({out[name]} and {value}); give the group one rate"
            )
        out[name], named_by[name] = value, key
    return out


def plan(
    model: nn.Module,
    scores=None,
    target=0.5,
    *,
    round_to: int | str = 1,
    input_size=None,
    graph: GroupGraph | None = None,
    allocation: str | Allocation = "uniform",
    data=None,
    progress: bool = True,
    latency_batch: int = 1,
    time_layer=None,
) -> PruningPlan:
    """Turn channel scores and a target into a :class:`PruningPlan` (see the module docstring).

    Args:
        model: the unpruned model (zoo models carry ``chip_arch``, needed for sparsity strings).
        scores: :class:`chip.ChannelScores` (or ``{group: tensor}``); ``None`` keeps the first k.
        target: sparsity string, uniform rate, ``{layer: rate}`` mapping or ``"flops=0.5"`` budget.
        round_to: kept widths become multiples of this (hardware-friendly shapes); ``"auto"``:
            per group, the channel step at which the measured latency drops
            (:func:`chip.latency.detect_step`); except for a ``latency=`` budget (measured
            anyway), that plan is then timed against the plan ``round_to=1`` gives for the
            same target, and the faster kept (:func:`chip.latency.faster_widths`, recorded in
            ``stats["latency"]["round_to_check"]``).
        input_size: example input (N, C, H, W) for tracing and counting; default: the size the
            model's source declares (zoo, timm), else a :class:`ChipError`.
        allocation: how a budget target is spread over the groups: ``"uniform"``,
            ``"global"``, ``"sensitivity"`` or a :class:`chip.allocation.Allocation` with its
            settings (budgets only).
        data: ``(inputs, targets)`` batches ``sensitivity`` measures on (e.g. the calibration
            loader); the model runs on the device of its parameters.
        progress: show a progress bar over ``sensitivity``'s evaluations.
        latency_batch: the batch size a ``latency=`` target and ``round_to="auto"`` are
            measured at, on the device of the model's parameters and with torch's current
            thread count (:func:`chip.latency.latency_table`, cached on disk). A ``latency=``
            budget is then checked on pruned copies measured against the model, and the asked
            budget corrected, up to 6 rounds (:func:`chip.latency.meet_latency`; recorded in
            ``stats["latency"]["rounds"]``).
        time_layer: replaces the layer timer (tests).

    Raises:
        ChipError: a target or allocation that does not fit the model or cannot be met,
            ``sensitivity`` without data or with too few labelled batches, ``global`` without
            scores.
    """
    allocation = check_allocation(allocation, target)
    kind, value = parse_target(target)
    if allocation.name == "sensitivity" and data is None:
        raise ChipError(
            "allocation 'sensitivity' measures each group's loss on data; pass data=loader "
            "(CLI: --data)"
        )
    arch = getattr(model, "chip_arch", None)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if not check_round_to(round_to):
        raise ChipError(f"round_to must be a positive integer or 'auto', got {round_to!r}")
    if not _is_int(latency_batch) or latency_batch < 1:
        raise ChipError(f"latency_batch must be a positive integer, got {latency_batch!r}")
    if graph is None:
        graph = find_groups(model, example_input(model, input_size, zeros=True))
    _warn_skipped(graph)
    counter = graph.counter
    if counter is None or counter.input_size != tuple(input_size)[1:]:
        counter = WidthCounter(model, graph, input_size)
    table, measured, checked = None, None, None
    size = (latency_batch, *input_size[1:])
    if measures_latency(target, round_to):
        table = latency.latency_table(model, graph, size, time_layer=time_layer)
    latency_budget = kind == "budget" and value[0] == "latency"

    def widths_for(round_to, table):
        if kind != "budget":
            rates = {
                "sparsity": lambda: _sparsity_rates(arch, value, graph),
                "uniform": lambda: {g.name: value for g in graph},
                "layers": lambda: _layer_rates(value, graph),
            }[kind]()
            widths = {
                g.name: kept_width(g, rates.get(g.name, 0.0), rounding(round_to, g)) for g in graph
            }
            if _is_int(round_to):
                _warn_rounded_away(graph, rates, widths, round_to)
            return widths, {}, None

        def solve_at(fraction: float):
            return solve(value[0], fraction, graph, counter, round_to, allocation, latency=table,
                         scores=scores, model=model, data=data, progress=progress)  # fmt: skip

        if latency_budget and value[1] < 1 and time_layer is None:  # measure the plan
            compare = latency.compare_widths(model, graph, size)
            return latency.meet_latency(solve_at, value[1], compare)
        return (*solve_at(value[1]), None)

    if round_to == "auto":
        round_to = dict(table.steps)
    widths, record, measured = widths_for(round_to, table)
    if isinstance(round_to, dict) and not latency_budget and time_layer is None:
        # auto is kept only where it measures faster than the plan round_to=1 gives
        plain = widths_for(1, None)
        if plain[0] != widths:
            compare = latency.compare_widths(model, graph, size)
            faster, checked = latency.faster_widths(compare, widths, plain[0])
            if faster == "step 1":
                (widths, record, measured), round_to = plain, {}  # step 1 in every group

    group_scores = getattr(scores, "groups", scores)
    groups = {}
    for g in graph:
        s = None
        if group_scores is not None:
            s = group_scores.get(g.name)
            if s is None and widths[g.name] < g.channels:
                raise ChipError(
                    f"no scores for group {g.name!r}, which the target prunes; "
                    "score the model again (chip score) or keep that group whole"
                )
        groups[g.name] = GroupPlan(g.channels, g.choose(s, widths[g.name]))

    stats = count_stats(counter, *counter(widths))
    if table is not None:
        stats["latency"] = {
            "predicted_ms": table.predict(widths),
            "base_ms": table.base_ms,
            "device": table.key["device"],
            "threads": table.key["threads"],
            "batch": table.key["input_size"][0],
        }
        if measured is not None:
            stats["latency"].update(measured)
        if checked is not None:
            stats["latency"]["round_to_check"] = checked
    if isinstance(round_to, dict):
        stats["round_to"] = {g.name: round_to.get(g.name, 1) for g in graph}
    if kind == "budget":
        stats.update(budget_kind=value[0], budget=value[1])
        if "uniform_rate" in record:
            stats["uniform_rate"] = record["uniform_rate"]
    return PruningPlan(
        groups=groups,
        arch=arch,
        input_size=input_size,
        target=describe(target),
        scores_used=group_scores is not None,
        stats=stats,
        skipped=dict(graph.skipped),
        allocation=record,
    )


def measures_latency(target, round_to) -> bool:
    """Whether planning ``target`` with ``round_to`` measures latency (a ``latency=`` budget or
    ``round_to="auto"``), on the model's device."""
    kind, value = parse_target(target)
    return round_to == "auto" or (kind == "budget" and value[0] == "latency")


def check_allocation(allocation, target) -> Allocation:
    """The :class:`Allocation` of ``allocation`` (a name or one); ChipError for an unknown one or
    one other than ``uniform`` with a target that is not a budget."""
    allocation = Allocation.of(allocation)
    if allocation.name != "uniform" and parse_target(target)[0] != "budget":
        raise ChipError(
            f"allocation {allocation.name!r} spreads a budget (flops=, params=); target "
            f"{describe(target)!r} fixes the rates itself; use allocation 'uniform'"
        )
    return allocation


def count_stats(counter: WidthCounter, params: int, macs: int) -> dict[str, Any]:
    """``plan.stats`` entries for a pruned model of ``params`` params and ``macs`` MACs: those
    two, the unpruned model's (from ``counter``), the kept fractions and the MACs convention."""
    return {
        "base_params": counter.base_params,
        "base_macs": counter.base_macs,
        "params": params,
        "macs": macs,
        "params_kept": params / counter.base_params,
        "macs_kept": macs / counter.base_macs,
        "macs_convention": CONVENTION,
    }


def _warn_rounded_away(graph: GroupGraph, rates, widths, round_to: int) -> None:
    """Warn when rounding to ``round_to`` keeps whole every group the rates would prune."""
    wanted = [g for g in graph if kept_width(g, rates.get(g.name, 0.0), 1) < g.channels]
    if wanted and all(widths[g.name] == g.channels for g in wanted):
        widest = max(g.channels for g in wanted)
        warnings.warn(
            f"round_to={round_to} keeps every group whole, so the target prunes nothing (the "
            f"widest group it would prune has {widest} channels); use a smaller round_to",
            ChipWarning,
            stacklevel=3,
        )


def _warn_skipped(graph: GroupGraph) -> None:
    if graph.untraced:
        layers = ", ".join(graph.untraced[:6]) + (" ..." if len(graph.untraced) > 6 else "")
        why = (
            "not on the autograd path from the input to the output (an argmax, .detach(), "
            "torch.no_grad() or an integer output cuts it)"
        )
        if not graph.all_groups:
            raise ChipError(
                f"chip found no channel groups: layers {layers} run but are {why}; prune a "
                "model whose forward returns differentiable outputs (the logits, not their argmax)"
            )
        warnings.warn(
            f"chip leaves layers {layers} as they are: they run but are {why}",
            ChipWarning,
            stacklevel=3,
        )
    if graph.skipped:
        listed = "; ".join(f"{name}: {why}" for name, why in list(graph.skipped.items())[:5])
        more = f" (and {len(graph.skipped) - 5} more)" if len(graph.skipped) > 5 else ""
        warnings.warn(
            f"chip keeps {len(graph.skipped)} channel groups whole: {listed}{more}",
            ChipWarning,
            stacklevel=3,
        )


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(1, C, H, W) from the input size the model's source declares (``chip_input_size``: zoo
    models, timm's pretrained config); :class:`ChipError` when it declares none."""
    size = getattr(model, "chip_input_size", None)
    if size is None:
        raise ChipError(
            f"the input size of {getattr(model, 'chip_arch', None) or type(model).__name__} is not "
            "known; pass input_size=(1, C, H, W) (CLI: --input-size C,H,W)"
        )
    return (1, *size)
