"""Budgets -> kept widths: how a ``flops=`` / ``params=`` budget is spread over the groups.

:func:`chip.plan` solves a budget target with one of the allocations of :data:`ALLOCATIONS`
(``docs/method.md`` section 3 has the formulas):

* ``uniform``: one rate for every group, the smallest that meets the budget (bisection on exact
  analytic counts), then width steps given back round-robin in graph order while it holds (with a
  measured latency table, as with ``round_to="auto"``: first where a step keeps the most MACs or
  params per ms of predicted time it adds).
* ``global``: one ranking of normalised channel scores across all groups; a group keeps as many
  channels as score above one global threshold, and at least ``floor`` of its width. CHIP
  scores are normalised per channel as ``CI_i / ||a_i||`` (mean channel independence over mean
  feature-map norm, in [0, 1]) divided by its value for independent Gaussian maps of the same
  shape (:func:`chance_ratio`); other criteria by their group mean. Width steps are then given
  back to the groups whose best removed channel scores highest.
* ``sensitivity``: each group alone is cut to each width of a ladder (its lowest-scored channels
  removed, every other group whole), BatchNorm statistics are re-estimated on ``bn_batches``
  batches (:func:`chip.recalibration.recalibrate_bn`) and the cross-entropy is measured on
  ``eval_batches`` held-out batches; a width's loss increase is taken as the largest measured at
  it or any wider ladder width (fewer channels never cost less). Widths then minimise the summed
  loss increase under the budget by a Lagrangian relaxation: for a multiplier ``lam`` each group takes the ladder width
  minimising ``dloss(w) - lam * saving(w)`` (saving: the group's own MACs or params saving), and
  ``lam`` is bisected to the smallest value whose exact joint count meets the budget; width steps
  are then given back where the linearly interpolated loss drops most per MAC (or param). With
  ``rounds > 1`` every group is measured again with the others at the last round's widths, and
  the widths solved again from those measurements.

Widths respect each group's structure (:meth:`chip.groups.ChannelGroup.width`) and ``round_to``;
the kept channels of a group are still its highest-scoring ones (``chip.planning``). The
sensitivity measurements are cached on disk (:func:`cache_dir`) under a hash of the model's
weights, the batches and the removed channels of every trial, so planning again at another
budget costs no evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .counting import WidthCounter
from .errors import ChipError
from .groups import ChannelGroup, GroupGraph
from .targets import ALLOCATIONS
from .utils import atomic_write, seed_everything

__all__ = ["ALLOCATIONS", "Allocation", "cache_dir", "solve"]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ChipError(
            "allocation 'sensitivity' needs a model returning (N, classes, ...) logits, got "
            f"{type(out).__name__}"
        )
    return out.double()


def _ce(out: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(out, y.long(), reduction="sum")


def _kl(out: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """sum over images of KL(softmax(ref) || softmax(out)) over the class dim (dim 1)."""
    return F.kl_div(out.log_softmax(1), ref.log_softmax(1), reduction="sum", log_target=True)


_LOSSES = {"ce": _ce, "kl": _kl}  # loss(logits, targets, the unpruned model's logits) summed


@dataclass(frozen=True)
class Allocation:
    """How a budget is spread over the groups (see the module docstring).

    ``ladder``: kept fractions each group is measured at (``sensitivity``); ``floor``: the least
    fraction of every group ``global`` keeps; ``bn_batches`` / ``eval_batches``: batches of the
    data for BatchNorm re-estimation and for the held-out loss (``sensitivity``, taken in that
    order from the start of the loader, after seeding the RNGs with ``seed`` so a shuffling or
    augmenting loader gives the same batches again; ``None`` leaves them alone); ``loss``: what
    ``sensitivity`` measures on the held-out batches, ``"kl"`` (KL divergence from the unpruned
    model's own predictions, in nats per image; the default) or ``"ce"`` (cross-entropy against
    the labels);
    ``rounds``: ``sensitivity`` rounds, each after the first measured around the previous
    round's widths (``docs/method.md`` section 3).
    """

    name: str = "uniform"
    ladder: tuple[float, ...] = (0.25, 0.5, 0.75)
    floor: float = 0.1
    bn_batches: int = 2
    eval_batches: int = 2
    seed: int | None = 0
    loss: str = "kl"
    rounds: int = 1

    @property
    def batches(self) -> int:
        """Batches of data ``sensitivity`` reads (BatchNorm re-estimation + held-out loss)."""
        return self.bn_batches + self.eval_batches

    def __post_init__(self):
        if self.name not in ALLOCATIONS:
            raise ChipError(
                f"unknown allocation {self.name!r}; expected one of {', '.join(ALLOCATIONS)}"
            )
        ladder = tuple(self.ladder)
        if not ladder or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in ladder
        ):
            raise ChipError(
                f"allocation ladder {self.ladder!r}: expected kept fractions in (0, 1), "
                "e.g. (0.25, 0.5, 0.75)"
            )
        object.__setattr__(self, "ladder", tuple(sorted(set(float(f) for f in ladder))))
        if not 0 < self.floor <= 1:
            raise ChipError(f"allocation floor {self.floor!r}: expected a fraction in (0, 1]")
        if self.loss not in _LOSSES:
            raise ChipError(f"allocation loss {self.loss!r}: expected one of {', '.join(_LOSSES)}")
        for key in ("bn_batches", "eval_batches", "rounds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChipError(f"allocation {key} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, spec) -> Allocation:
        """An :class:`Allocation` from one, a name, or a mapping of its fields."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, dict):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ChipError(
                    f"unknown allocation settings {sorted(unknown)}; expected "
                    f"{', '.join(cls.__dataclass_fields__)}"
                )
            return cls(**spec)
        raise ChipError(
            f"allocation {spec!r}: expected one of {', '.join(ALLOCATIONS)} or an Allocation"
        )


def rounding(round_to: int | Mapping[str, int], group: ChannelGroup) -> int:
    """``group``'s ``round_to``: one number for all, or ``{group: step}`` (missing: 1)."""
    return round_to.get(group.name, 1) if isinstance(round_to, Mapping) else round_to


class _Budget:
    """A ``kind`` ("macs" | "params" | "latency") budget of ``fraction`` of the unpruned model's;
    ``cost(widths)`` is the kept fraction of that count for group widths; ``table``: the
    measured :class:`chip.latency.LatencyTable` behind the plan, if any."""

    def __init__(
        self,
        kind: str,
        fraction: float,
        graph: GroupGraph,
        cost: Callable[[dict[str, int]], float],
        round_to: int | Mapping[str, int],
        table=None,
    ):
        self.kind, self.fraction, self.graph, self.cost = kind, fraction, graph, cost
        self.round_to, self.table = round_to, table

    def rt(self, g: ChannelGroup) -> int:
        return rounding(self.round_to, g)

    def kept(self, widths: dict[str, int]) -> float:
        return self.cost(widths)

    def fits(self, widths: dict[str, int]) -> bool:
        return self.kept(widths) <= self.fraction

    def step(self, g: ChannelGroup) -> int:
        return math.lcm(g.step, self.rt(g))

    def require(self, widths: dict[str, int], what: str) -> None:
        """ChipError unless ``widths`` (the fewest channels ``what`` allows) meet the budget."""
        smallest = self.kept(widths)
        if smallest > self.fraction:
            whole = (
                f" ({len(self.graph.skipped)} groups chip cannot prune are kept whole)"
                if self.graph.skipped
                else ""
            )
            raise ChipError(
                f"{self.kind} budget {self.fraction} cannot be met: keeping the fewest channels "
                f"{what} in every group still leaves {smallest:.3f} of the baseline{whole}; "
                f"expected a budget of at least {smallest:.3f}"
            )

    def give_back(
        self,
        widths: dict[str, int],
        priority: Callable[[ChannelGroup, int], Any],
        gains: bool = False,
    ):
        """Grow groups one width step at a time, the highest ``priority(group, width)`` first,
        while the budget holds. A step that does not fit never will (the counts grow with every
        width), so that group is done. With ``gains`` the priority is an expected gain: steps
        that gain nothing (<= 0) are taken only while the count is more than a point under the
        budget."""
        widths, done = dict(widths), set()
        while True:
            open_ = [g for g in self.graph if g.name not in done and widths[g.name] < g.channels]
            if gains and self.kept(widths) >= self.fraction - 0.01:
                open_ = [g for g in open_ if priority(g, widths[g.name]) > 0]
            if not open_:
                return widths
            g = max(open_, key=lambda g: priority(g, widths[g.name]))
            trial = {**widths, g.name: min(g.channels, widths[g.name] + self.step(g))}
            if self.fits(trial):
                widths = trial
            else:
                done.add(g.name)


# -- uniform -------------------------------------------------------------------------------------


def kept_width(group: ChannelGroup, rate: float, round_to: int) -> int:
    """Kept width of ``group`` at ``rate``: ``int(C * (1 - rate))``, at least 1, then
    :meth:`ChannelGroup.width` (its step, ``round_to``)."""
    return group.width(max(1, int(group.channels * (1.0 - rate))), round_to)


def _uniform(budget: _Budget, **_) -> tuple[dict[str, int], dict]:
    graph = budget.graph

    def widths_at(rate: float) -> dict[str, int]:
        return {g.name: kept_width(g, rate, budget.rt(g)) for g in graph}

    lo, hi = 0.0, 1.0 - 1e-9
    if budget.fits(widths_at(lo)):
        return widths_at(lo), {"uniform_rate": 0.0}
    budget.require(widths_at(hi), "chip allows")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if budget.fits(widths_at(mid)) else (mid, hi)
    start = widths_at(hi)
    order = {g.name: i for i, g in enumerate(graph)}

    def round_robin(g: ChannelGroup, width: int):  # fewest steps given back first, graph order
        return (-((width - start[g.name]) // budget.step(g)), -order[g.name])

    timed = budget.table is not None and budget.kind != "latency"
    priority = _count_per_ms(budget, start) if timed else round_robin
    return budget.give_back(start, priority), {"uniform_rate": hi}


def _count_per_ms(budget: _Budget, start: dict[str, int]) -> Callable[[ChannelGroup, int], float]:
    """Give-back priority of a MACs or params budget planned with a latency table
    (``round_to="auto"``): the count a group's next width step keeps per ms of predicted time it
    adds, the other groups at ``start``; a step predicted to add no time comes first."""
    table = budget.table

    def priority(g: ChannelGroup, width: int) -> float:
        a = {**start, g.name: width}
        b = {**start, g.name: min(g.channels, width + budget.step(g))}
        added = table.predict(b) - table.predict(a)
        return (budget.kept(b) - budget.kept(a)) / max(added, 1e-9 * table.base_ms)

    return priority


# -- global --------------------------------------------------------------------------------------


def normalised_scores(scores, group: str) -> torch.Tensor:
    """(C,) float64 scores of ``group`` comparable across groups.

    CHIP scores with feature-map norms: ``(CI_i / ||a_i||) / r(C, L)`` per hook point, averaged
    over the group's points whose maps have ``L > 1`` positions. ``CI_i / ||a_i||`` (mean CI over
    mean norm) lies in [0, 1]; ``r(C, L)`` is its mean for C independent Gaussian maps of L
    positions (:func:`chance_ratio`), which corrects for the capacity of the shape: at most
    ``L`` of ``C`` channels can be independent, so late, narrow-map layers score low whatever
    they compute. A group without such points (read only as a pooled vector, where every channel
    is dependent) and scores of other criteria: the scores over their group mean, times the mean
    normalised score of the groups that have norms (1 when none has)."""
    groups = getattr(scores, "groups", scores)
    s = groups[group].double().cpu()
    ratio = _ci_ratio(scores, group)
    if ratio is not None:
        return ratio
    others = [r for g in groups if (r := _ci_ratio(scores, g)) is not None]
    scale = float(torch.cat(others).mean()) if others else 1.0
    mean = s.abs().mean()
    return s / mean * scale if mean > 0 else torch.zeros_like(s)


@functools.lru_cache(maxsize=256)
def chance_ratio(channels: int, positions: int) -> float:
    """Mean ``CI_i / ||a_i||`` of ``channels`` independent standard Gaussian maps of
    ``positions`` values (4 seeded samples): the independence a layer of that shape shows by
    chance (about 1 when positions >> channels, about positions / channels when fewer)."""
    from .ci import channel_independence

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, channels, positions, generator=gen, dtype=torch.float64)
    ratio = channel_independence(a).mean(0) / a.norm(dim=2).mean(0)
    return float(ratio.mean())


def _ci_ratio(scores, group: str) -> torch.Tensor | None:
    """The shape-corrected ratio of :func:`normalised_scores` (None: no point with norms)."""
    point_norms = getattr(scores, "point_norms", {})
    positions = (getattr(scores, "meta", None) or {}).get("positions", {})
    labels = [lb for lb, g in getattr(scores, "point_group", {}).items() if g == group]
    ratios = []
    for lb in labels:
        if lb not in point_norms:
            continue
        ci, norms = scores.points[lb].double().cpu(), point_norms[lb].double().cpu()
        r = torch.where(norms > 0, ci / norms.clamp_min(1e-300), torch.zeros_like(ci))
        chance = chance_ratio(len(ci), positions[lb]) if lb in positions else 1.0
        ratios.append(r / max(chance, 1e-12))
    return torch.stack(ratios).mean(0) if ratios else None


def _global(budget: _Budget, scores=None, allocation: Allocation = Allocation(), **_):
    if scores is None:
        raise ChipError(
            "allocation 'global' ranks channel scores across groups; pass scores "
            "(chip score / chip.score)"
        )
    graph, rt = budget.graph, budget.rt
    ranked = {}  # group -> normalised scores, descending
    for g in graph:
        if g.name not in getattr(scores, "groups", scores):
            raise ChipError(f"no scores for group {g.name!r}; score the model again (chip score)")
        ranked[g.name] = torch.sort(normalised_scores(scores, g.name), descending=True).values
    floor = {
        g.name: g.width(max(1, math.ceil(allocation.floor * g.channels)), rt(g)) for g in graph
    }

    def width(g: ChannelGroup, t: float) -> int:
        k = int((ranked[g.name] >= t).sum())
        return g.channels if k == g.channels else max(floor[g.name], g.width(k, rt(g)))

    def widths_at(t: float) -> dict[str, int]:
        return {g.name: width(g, t) for g in graph}

    thresholds = torch.cat(list(ranked.values())).unique().tolist()  # ascending
    if budget.fits(widths_at(-math.inf)):
        return widths_at(-math.inf), {"floor": allocation.floor}
    budget.require(floor, f"the floor of {allocation.floor:g} of each group keeps")
    lo, hi = 0, len(thresholds)  # widths_at(thresholds[hi]) fits; thresholds[lo - 1] does not
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if budget.fits(widths_at(thresholds[mid])) else (mid + 1, hi)
    start = widths_at(thresholds[hi] if hi < len(thresholds) else math.inf)

    def next_channel(g: ChannelGroup, width: int) -> float:  # its best channel not kept
        return float(ranked[g.name][width]) if width < g.channels else -math.inf

    return budget.give_back(start, next_channel), {
        "floor": allocation.floor,
        "normalisation": "ci/norm" if getattr(scores, "point_norms", None) else "group mean",
    }


# -- sensitivity ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where sensitivity measurements are cached: ``$CHIP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/chip``, else ``~/.cache/chip``."""
    if os.environ.get("CHIP_CACHE_DIR"):
        return Path(os.environ["CHIP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chip"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _batches(data, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (inputs, targets) batches of ``data``; ChipError when fewer or
    unlabelled."""
    out = []
    for batch in data:
        if len(out) == count:
            break
        if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
            raise ChipError(
                "allocation 'sensitivity' measures a loss: the data must yield (inputs, targets) "
                f"batches, got a {type(batch).__name__}"
            )
        out.append((batch[0], batch[1]))
    if len(out) < count:
        raise ChipError(
            f"allocation 'sensitivity' needs {count} batches (BatchNorm re-estimation, then the "
            f"held-out loss) but the data gave {len(out)}; expected a longer loader"
        )
    return out


def _loss(model: nn.Module, batches, loss: str = "ce", reference=None) -> float:
    """Mean ``loss`` per target of ``model`` (eval mode) over ``batches``; ``reference``: the
    unpruned model's logits per batch (``"kl"``)."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            ref = reference[i] if reference is not None else None
            total += float(_LOSSES[loss](_logits(model, x), y, ref))
            n += y.numel()
    return total / max(n, 1)


def _ladder(group: ChannelGroup, allocation: Allocation, round_to: int) -> list[int]:
    """The widths below ``group.channels`` the group is measured at, ascending."""
    widths = {group.width(max(1, round(f * group.channels)), round_to) for f in allocation.ladder}
    return sorted(w for w in widths if w < group.channels)


def measure_sensitivity(
    model: nn.Module,
    graph: GroupGraph,
    scores,
    data,
    allocation: Allocation,
    round_to: int | Mapping[str, int] = 1,
    progress: bool = True,
    context: Mapping[str, int] | None = None,
) -> dict:
    """``{"base_loss", "loss": {group: [[width, loss increase], ...]}, "cached", "seconds"}``.

    Each trial is the unpruned ``model`` computing what the pruned one would
    (:func:`chip.prune.masked_forward_hooks`, the oracle :func:`chip.apply` is verified
    against) with its BatchNorm statistics re-estimated; the model's state is restored after
    every trial. Runs on the device of the model's parameters.

    ``context``: widths ``{group: width}`` the other groups are cut to during each group's
    trials (default: whole); a group's increase is then measured from the trial with that
    group whole and the others at ``context``.
    """
    from tqdm.auto import tqdm

    from .prune import masked_forward_hooks
    from .recalibration import BatchNormState, _batchnorms, recalibrate_bn
    from .utils import eval_mode

    t0 = time.perf_counter()
    device = next(iter(model.parameters())).device
    if allocation.seed is not None:
        seed_everything(allocation.seed)
    batches = _batches(data, allocation.batches)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    bn_part, eval_part = batches[: allocation.bn_batches], batches[allocation.bn_batches :]
    group_scores = getattr(scores, "groups", scores)

    def removed_at(g: ChannelGroup, w: int) -> list[int]:
        keep = set(g.choose(None if group_scores is None else group_scores.get(g.name), w))
        return [i for i in range(g.channels) if i not in keep]

    around = {
        g.name: removed_at(g, context[g.name])
        for g in graph
        if context is not None and context.get(g.name, g.channels) < g.channels
    }
    trials = []  # (group, width, removed channels)
    for g in graph:
        ladder = _ladder(g, allocation, rounding(round_to, g))
        for w in ladder + ([g.channels] if around else []):  # whole: the group's own base
            trials.append((g.name, w, removed_at(g, w)))

    h = hashlib.sha256(b"chip.sensitivity/1")
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    for x, y in batches:
        _hash_tensor(h, x)
        _hash_tensor(h, y)
    h.update(json.dumps([allocation.bn_batches, allocation.loss, trials, around]).encode())
    path = cache_dir() / f"sensitivity-{h.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            return {**record, "cached": True, "seconds": time.perf_counter() - t0}
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache file is measured again and rewritten

    saved = BatchNormState(_batchnorms(model))
    reference = None
    if allocation.loss == "kl":  # the model as given, its own BatchNorm statistics
        with eval_mode(model), torch.no_grad():
            reference = [_logits(model, x) for x, _ in eval_part]

    def trial_loss(removed: dict[str, list[int]]) -> float:
        handles = masked_forward_hooks(model, removed, graph) if removed else []
        try:
            recalibrate_bn(model, bn_part, len(bn_part))
            return _loss(model, eval_part, allocation.loss, reference)
        finally:
            for handle in handles:
                handle.remove()
            saved.restore()

    loss: dict[str, list[list[float]]] = {}
    bar = tqdm(total=len(trials) + 1, desc="sensitivity", unit="trial", disable=not progress)
    with eval_mode(model):  # every module leaves with its own training flag
        try:
            base = trial_loss(around)
            bar.update(1)
            measured = {}
            for name, w, removed in trials:
                others = {n: r for n, r in around.items() if n != name}
                measured[name, w] = trial_loss({**others, name: removed} if removed else others)
                bar.update(1)
            for name, cut in context.items() if around else ():  # the operating point itself
                measured.setdefault((name, cut), base)
            for (name, w), value in measured.items():
                if w < graph[name].channels:
                    own = measured[name, graph[name].channels] if around else base
                    loss.setdefault(name, []).append([w, value - own])
        finally:
            bar.close()
    record = {"base_loss": base, "loss": loss, "context": dict(context or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(record, f)
    return {**record, "cached": False, "seconds": time.perf_counter() - t0}


def _sensitivity(
    budget: _Budget,
    scores=None,
    allocation: Allocation = Allocation(),
    model: nn.Module | None = None,
    data=None,
    progress: bool = True,
    **_,
):
    graph = budget.graph
    full = {g.name: g.channels for g in graph}
    smallest = {g.name: (_ladder(g, allocation, budget.rt(g)) or [g.channels])[0] for g in graph}
    if budget.fits(full):
        return full, {"ladder": list(allocation.ladder)}
    budget.require(smallest, f"the ladder's smallest fraction ({min(allocation.ladder):g})")
    context, seconds, cached, rounds = None, 0.0, True, []
    for _ in range(allocation.rounds):  # each round measured around the last one's widths
        m = measure_sensitivity(
            model, graph, scores, data, allocation, budget.round_to, progress, context
        )
        widths, lam = _solve_sensitivity(budget, m, context or full, smallest)
        seconds, cached = seconds + m["seconds"], cached and m["cached"]
        rounds.append({"context": m["context"], "loss": m["loss"], "lagrange_multiplier": lam,
                       "base_loss": m["base_loss"]})  # fmt: skip
        context = widths
    record = {
        "ladder": list(allocation.ladder),
        "bn_batches": allocation.bn_batches,
        "eval_batches": allocation.eval_batches,
        "loss_kind": allocation.loss,
        "base_loss": rounds[0]["base_loss"],
        "loss": rounds[0]["loss"],
        "lagrange_multiplier": rounds[0]["lagrange_multiplier"],
        "cached": cached,
        "seconds": seconds,
    }
    if len(rounds) > 1:
        record["rounds"] = rounds[1:]
    return widths, record


def _solve_sensitivity(budget: _Budget, m: dict, around: dict[str, int], smallest):
    """(widths, Lagrange multiplier) from one measurement ``m`` made around ``around``."""
    graph = budget.graph
    curves = {}  # group -> [(width, loss increase, own saving)], the whole width first
    for g in graph:
        whole = budget.kept({**around, g.name: g.channels})
        points = sorted([(int(w), d) for w, d in m["loss"].get(g.name, [])], reverse=True)
        curve, worst = [(g.channels, 0.0, 0.0)], 0.0
        for w, d in points:  # fewer channels never cost less: the running max is the estimate
            worst = max(worst, d)
            curve.append((w, worst, whole - budget.kept({**around, g.name: w})))
        curves[g.name] = curve

    def widths_at(lam: float) -> dict[str, int]:
        return {n: min(c, key=lambda p: (p[1] - lam * p[2], -p[0]))[0] for n, c in curves.items()}

    lo, hi = 0.0, 1.0
    while not budget.fits(widths_at(hi)):
        hi *= 2
        if hi > 1e12:  # every group at its smallest ladder width fits (checked above)
            break
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if budget.fits(widths_at(mid)) else (mid, hi)
    start = widths_at(hi)

    def interpolated(name: str, w: float) -> float:
        pts = sorted((p[0], p[1]) for p in curves[name])
        return float(np.interp(w, [p[0] for p in pts], [p[1] for p in pts]))

    per_channel = {  # the group's own saving per channel (its cost is near-linear in its width)
        n: max(c[-1][2], 1e-12) / max(c[0][0] - c[-1][0], 1) for n, c in curves.items()
    }

    def loss_drop_per_cost(g: ChannelGroup, width: int) -> float:
        step = min(budget.step(g), g.channels - width)
        drop = interpolated(g.name, width) - interpolated(g.name, width + step)
        return drop / (per_channel[g.name] * step)

    if not budget.fits(start):  # a measured (latency) cost need not fall with every ladder step
        start = smallest
    return budget.give_back(start, loss_drop_per_cost, gains=True), hi


_SOLVERS = {"uniform": _uniform, "global": _global, "sensitivity": _sensitivity}


def solve(
    kind: str,
    fraction: float,
    graph: GroupGraph,
    counter: WidthCounter,
    round_to: int | Mapping[str, int],
    allocation: Allocation,
    latency=None,
    **context,
) -> tuple[dict[str, int], dict]:
    """Kept widths ``{group: width}`` meeting a ``kind`` budget of ``fraction`` with
    ``allocation``, and the record the plan keeps (``{"name": ..., ...}``).

    ``round_to``: one step for every group or ``{group: step}``. ``latency``: the
    :class:`chip.latency.LatencyTable` a ``"latency"`` budget is predicted with (with a MACs or
    params budget, ``uniform`` gives width steps back where they add the least predicted time). ``context``:
    ``scores`` (``global``, and the order of removal for ``sensitivity``), ``model``, ``data``
    and ``progress`` (``sensitivity``).

    Raises:
        ChipError: the budget cannot be met (the message says the least reachable fraction),
            or the allocation lacks what it needs (scores, data).
    """
    if kind == "latency":

        def cost(widths):
            return latency.predict(widths) / latency.base_ms
    else:
        index, base = (0, counter.base_params) if kind == "params" else (1, counter.base_macs)

        def cost(widths):
            return counter(widths)[index] / base

    budget = _Budget(kind, fraction, graph, cost, round_to, latency)
    widths, record = _SOLVERS[allocation.name](budget, allocation=allocation, **context)
    return widths, {"name": allocation.name, **record}
