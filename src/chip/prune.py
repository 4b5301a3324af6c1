"""Surgery: physically remove the channels a :class:`~chip.planning.PruningPlan` drops, verified.

Every group is pruned through Torch-Pruning's DependencyGraph (``chip.groups``), so coupled
channels (a residual stream, a depthwise conv and its neighbours, a flatten into a linear layer,
the branches of a concatenation) share one kept set, and BatchNorm statistics, biases and
classifier weights carry over. The option-A pad shortcut of the CIFAR ResNets is pruned by
:class:`chip.groups.PadShortcutPruner`.

**What the pruned model must compute** (``docs/method.md`` section 6): the original model whose
consumers do not see the removed channels (their inputs are zero there) and whose cross-channel
norms (GroupNorm, LayerNorm over channels) take their statistics over the kept channels only.
:func:`masked_forward_hooks` implements that definition the slow, obvious way on the unpruned
model; :func:`apply` checks every result against it in float64 before returning
(``verify=True``), and :func:`check_groups` uses it to refuse groups chip cannot prune correctly.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import ChipError
from .groups import ChannelGroup, GroupGraph, find_groups, retrace
from .planning import PruningPlan, WidthCounter, count_stats
from .utils import eval_mode, example_input, first_line, flat_outputs

__all__ = ["apply", "check_groups", "masked_forward_hooks", "probe_copy"]

VERIFY_RTOL = 1e-6  # float64 comparisons: exact surgery agrees to ~1e-14, a wrong one to ~1e-2


def apply(
    model: nn.Module,
    plan: PruningPlan,
    *,
    inplace: bool = False,
    graph: GroupGraph | None = None,
    verify: bool = True,
) -> nn.Module:
    """Return ``model`` with the channels ``plan`` removes physically gone.

    Args:
        model: the unpruned model the plan was made for.
        plan: from :func:`chip.plan` or :meth:`PruningPlan.load`.
        inplace: modify ``model`` itself instead of a deep copy.
        graph: a ``find_groups(model, x, check=False)`` result *for this very model object*
            (anything else is ignored and the model traced again).
        verify: before returning, run the pruned model and the masked original
            (:func:`masked_forward_hooks`) in float64 on a random input of ``plan.input_size``
            and compare their outputs and the plan's params/MACs with :func:`chip.count` of the
            result. Costs two float64 copies of the model and a few forward passes; very large
            models may skip it.

    Raises:
        ChipError: the plan does not fit the model (another architecture, already pruned, a
            group whose kept channels break its structure rules), or verification failed: the
            message names the group and its layers.

    The result carries ``chip_plan`` (the plan) plus the ``chip_arch`` / ``chip_kwargs`` of the
    original, so :func:`chip.save` can rebuild it. Every submodule keeps its own training flag.
    """
    plan.validate()
    given = graph
    pristine = model if not inplace else None
    if not inplace:
        model = copy.deepcopy(model)
        graph = None
    elif verify:
        pristine = copy.deepcopy(model)
    if graph is None or graph.dg is None or graph.model is not model:
        graph = find_groups(model, example_input(model, plan.input_size, zeros=True), check=False)
    _check_plan(model, plan, graph)
    removed = {name: plan.removed(name) for name in plan.groups if plan.removed(name)}
    failure = None
    try:
        graph.prune(removed)
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's errors become one line
        failure = f"Torch-Pruning cannot prune it ({first_line(exc, with_type=True)})"
    if failure is not None and not verify:
        raise ChipError(f"pruning failed: {failure}")
    try:
        if verify:
            stats = _verify(pristine, model, plan, removed, graph, failure)
            if stats is not None:  # an edited or hand-made plan: carry what it really prunes
                plan = dataclasses.replace(plan, stats={**plan.stats, **stats})
    except ChipError:
        if inplace:
            _restore(model, pristine)
        raise
    finally:
        if graph.model is model and graph is not given:
            graph.release()
    earlier = getattr(model, "chip_plan", None)
    if earlier is not None:  # pruned before: chip.save records every plan, in order
        model.chip_earlier_plans = [*getattr(model, "chip_earlier_plans", []), earlier]
    model.chip_plan = plan
    return model


def _restore(model: nn.Module, pristine: nn.Module) -> None:
    """Undo a failed in-place surgery: every module of ``model`` takes back the state of its
    twin in ``pristine`` (a deep copy made before; surgery adds or removes no modules), and
    keeps its own children, so references into ``model`` stay valid."""
    twins = dict(pristine.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        state = {k: v for k, v in twins[name].__dict__.items() if k != "_modules"}
        module.__dict__.update(state)


def _check_plan(model: nn.Module, plan: PruningPlan, graph: GroupGraph) -> None:
    arch = getattr(model, "chip_arch", None)
    if plan.arch is not None and arch is not None and plan.arch != arch:
        raise ChipError(
            f"the plan is for {plan.arch!r} but the model is {arch!r}; "
            "was the plan made for another architecture?"
        )
    known = {g.name for g in graph.all_groups}
    unknown = [name for name in plan.groups if name not in known]
    missing = [
        name for name in graph.by_name if name not in plan.groups and name not in plan.skipped
    ]
    if unknown or missing:  # a plan covers every group of the model it was made for
        raise ChipError(
            f"plan and model groups differ (only in the plan: {unknown[:4]}, only in "
            f"the model: {missing[:4]}); was the plan made for another architecture?"
        )
    for name, gplan in plan.groups.items():
        group = graph[name]
        if group.channels != gplan.channels:
            raise ChipError(
                f"group {name!r} has {group.channels} channels but the plan expects "
                f"{gplan.channels}; is the model already pruned?"
            )
        if gplan.kept < gplan.channels:
            if name in graph.skipped:
                raise ChipError(
                    f"group {name!r} cannot be pruned: {graph.skipped[name]}; keep it whole"
                )
            group.check_keep(gplan.keep)


# -- the oracle ---------------------------------------------------------------------------------


def masked_forward_hooks(model: nn.Module, removed, graph: GroupGraph) -> list:
    """Make ``model`` compute what the pruned model must compute (the module docstring).

    ``removed`` is a :class:`PruningPlan` or ``{group name: removed channel indices}``. Consumers
    get a forward pre-hook zeroing the removed positions of their input (offsets after a
    concatenation and flatten spreads come from each member's index table); GroupNorm and
    channel LayerNorm members get a forward hook recomputing them over the kept channels.
    Returns the hook handles (call ``.remove()`` on each to undo).
    """
    modules = dict(model.named_modules())
    zero: dict[tuple[str, int], torch.Tensor] = {}
    norms: dict[tuple[str, int], torch.Tensor] = {}
    for (name, axis, kind), positions in _removed_positions(removed, graph).items():
        if kind == "in":
            zero[name, axis] = positions
        elif isinstance(modules.get(name), (nn.GroupNorm, nn.LayerNorm)):
            norms[name, axis] = positions
    handles = []
    for (name, axis), positions in zero.items():
        handles.append(modules[name].register_forward_pre_hook(_zero_input_hook(axis, positions)))
    for (name, axis), positions in norms.items():
        handles.append(modules[name].register_forward_hook(_masked_norm_hook(axis, positions)))
    return handles


def _removed_positions(removed, graph: GroupGraph) -> dict[tuple[str, int, str], torch.Tensor]:
    """``{(member name, axis, kind): sorted unique positions}`` the removal takes away, from
    each member's index table; ``removed`` as in :func:`masked_forward_hooks`."""
    if isinstance(removed, PruningPlan):
        removed = {n: removed.removed(n) for n in removed.groups}
    parts: dict[tuple[str, int, str], list[torch.Tensor]] = {}
    for name, idxs in removed.items():
        if not len(idxs):
            continue
        rows = torch.as_tensor(list(idxs), dtype=torch.long)
        for m in graph[name].members:
            parts.setdefault((m.name, m.axis, m.kind), []).append(m.index[rows].flatten())
    return {key: torch.cat(p).unique() for key, p in parts.items()}


def _zero_input_hook(axis: int, positions: torch.Tensor):
    def hook(_module, inputs):
        x = inputs[0].clone()
        x.index_fill_(axis % x.dim(), positions.to(x.device), 0)
        return (x, *inputs[1:])

    return hook


def _masked_norm_hook(axis: int, removed: torch.Tensor):
    def hook(module, inputs, _output):
        x = inputs[0].movedim(axis, -1)
        keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        keep[removed.to(x.device)] = False
        out = torch.zeros_like(x)
        if isinstance(module, nn.GroupNorm):
            blocks = keep.view(module.num_groups, -1)
            for g, block in enumerate(blocks):
                idx = torch.nonzero(block).flatten() + g * blocks.shape[1]
                out[..., idx] = _normalise(x[..., idx], module, idx, dims=tuple(range(1, x.dim())))
        else:
            idx = torch.nonzero(keep).flatten()
            out[..., idx] = _normalise(x[..., idx], module, idx, dims=(-1,))
        return out.movedim(-1, axis)

    return hook


def _normalise(x: torch.Tensor, module: nn.Module, idx: torch.Tensor, dims) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over ``dims`` (biased variance), then the kept affine."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    y = (x - mean) / torch.sqrt(var + module.eps)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        y = y * weight[idx]
    if bias is not None:
        y = y + bias[idx]
    return y


class _LayerPrints:
    """Random projections of what every module outputs (its kept channels), call by call.

    A pruned model can match the masked original at its output and still compute something
    else inside: a binarised, thresholded or argmax output hides a wrong channel mapping. So
    the comparison also covers every module's output. In the masked original, a module that
    writes a group's channels (a ``kind="out"`` member) is compared on its kept positions only
    (``cut``); every other output must match as it is whenever the pruned model's has the same
    shape (an output that lost channels without being a member cannot be lined up, and is
    skipped). Each output is reduced to two random projections (:meth:`_project`), so memory
    stays small whatever the model and the cost is about one pass over each output.
    """

    BLOCK = 4096  # outputs are cut into blocks of this many values for the projections

    def __init__(self, model: nn.Module, cut: Mapping[str, list[tuple[int, torch.Tensor]]]):
        self.prints: dict[str, list[tuple[torch.Size, torch.Tensor, float]]] = {}
        gen = torch.Generator().manual_seed(0)
        vectors = torch.randn(self.BLOCK, 2, generator=gen, dtype=torch.float64)
        self.vectors = vectors / vectors.norm(dim=0)
        self.handles = [
            module.register_forward_hook(self._hook(name, cut.get(name, ())))
            for name, module in model.named_modules()
        ]

    def _hook(self, name: str, cuts):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            t = output.detach()
            for axis, positions in cuts:
                keep = torch.ones(t.shape[axis], dtype=torch.bool, device=t.device)
                keep[positions.to(t.device)] = False
                t = t.index_select(axis, torch.nonzero(keep).flatten())
            self.prints.setdefault(name, []).append((t.shape, *self._project(t)))

        return hook

    def _project(self, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Two projections of ``t`` (flattened, cut into BLOCK-long rows, each row projected
        on the same two random unit vectors, rows weighted by distinct weights in [1, 2]) and its
        norm. Same values give the same projections; different ones almost surely do not."""
        flat = t.reshape(-1).double()
        norm = float(flat.norm())
        whole = flat.numel() // self.BLOCK * self.BLOCK
        vectors = self.vectors.to(flat.device)
        rows = flat[:whole].view(-1, self.BLOCK) @ vectors
        tail = flat[whole:] @ vectors[: flat.numel() - whole]  # the last, shorter row
        rows = torch.cat([rows, tail[None]])
        weights = torch.linspace(1, 2, len(rows), dtype=torch.float64, device=flat.device)
        return (weights @ rows).cpu(), norm

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def mismatch(self, other: _LayerPrints) -> str | None:
        """The first module whose output differs between ``self`` (the masked original) and
        ``other`` (the pruned model), as a reason; None when every comparable output agrees."""
        for name, calls in self.prints.items():
            for (shape, proj, norm), theirs in zip(calls, other.prints.get(name, ())):
                if theirs[0] != shape or not shape.numel():
                    continue
                error = float((proj - theirs[1]).abs().max()) / max(norm, 1e-300)
                if not error <= VERIFY_RTOL:
                    return (
                        f"pruning it changes what {name or 'the model'!r} computes (max relative "
                        f"error {error:.2g}) even where the model's output does not show it"
                    )
        return None


# reasons that are crashes: every set holding the culprit crashes again, prints or not
_CRASHES = (
    "the pruned model does not run",
    "Torch-Pruning cannot prune it",
    "pruning it changes the shape",
    "chip cannot mask its channels",
)


def _output_cuts(removed, graph: GroupGraph) -> dict[str, list[tuple[int, torch.Tensor]]]:
    cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (name, axis, kind), positions in _removed_positions(removed, graph).items():
        if kind == "out":
            cuts.setdefault(name, []).append((axis, positions))
    return cuts


def _masked_reference(
    model, removed, graph, x, inside: bool = True
) -> tuple[list[torch.Tensor], _LayerPrints | None]:
    """The masked original's outputs on ``x`` and, if ``inside``, its layer prints (``model``
    in eval mode)."""
    handles = masked_forward_hooks(model, removed, graph)
    prints = _LayerPrints(model, _output_cuts(removed, graph)) if inside else None
    try:
        return flat_outputs(model(x)), prints
    finally:
        if prints is not None:
            prints.remove()
        for h in handles:
            h.remove()


# -- checking groups (refuse, don't guess) ------------------------------------------------------


def probe_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 deep copy of ``model`` with random weights, for structural checks.

    Matrices get N(0, 1/fan_in) entries, vectors U(0.5, 1.5) (positive: safe for norm scales and
    variances), BatchNorm/InstanceNorm running statistics mean N(0, 0.1^2) and variance
    U(0.5, 1.5). Random weights make every channel matter (a trained or zero-initialised branch
    could hide a wrong mapping); the values are irrelevant to the structure being checked.
    """
    work = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in work.parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                fresh = torch.randn(p.shape, generator=gen, dtype=p.dtype) * p[0].numel() ** -0.5
            else:
                fresh = torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5
            p.copy_(fresh)
        for m in work.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase)) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return work


def check_groups(
    model: nn.Module, graph: GroupGraph, example_inputs: torch.Tensor, *, seed: int = 0
) -> dict[str, str]:
    """Groups of ``graph`` chip cannot prune correctly, with the reason (``{}`` if none).

    ``graph`` is the unchecked graph of ``graph.model``, a :func:`probe_copy` of ``model`` with
    ``seed``; it is pruned in place. Every group loses about half of its units (within its
    structure rules); the pruned copy must run, match the masked original
    (:func:`masked_forward_hooks`) to ``VERIFY_RTOL`` and have the params/MACs the plan's counter
    predicts (the counter is left in ``graph.counter``). If it does not, bisection on fresh probe
    copies finds the groups at fault: a handful of extra copies per bad group.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(example_inputs.shape), generator=gen, dtype=torch.float64)
    candidates = list(graph.groups)
    if not candidates:
        return {}
    removal = {g.name: _probe_removal(g, gen) for g in candidates}
    x = x.to(next(iter(graph.model.parameters())).device) if list(graph.model.parameters()) else x
    counter = graph.counter = WidthCounter(graph.model, graph, tuple(x.shape))

    reason = _trial(graph.model, graph, removal, x, counter)
    if reason is None:
        return {}
    template = probe_copy(model, seed)  # random weights once; every bisection trial clones them

    def trial(names: Sequence[str], inside: bool) -> str | None:
        work = copy.deepcopy(template)
        subset = {n: removal[n] for n in names}
        return _trial(work, retrace(graph, work, x), subset, x, counter, inside)

    return _bisect([g.name for g in candidates], reason, trial, graph)


def _probe_removal(group: ChannelGroup, gen: torch.Generator) -> list[int]:
    """About half of the group's units in every cell, drawn at random (at least one)."""
    removed: list[int] = []
    for cell in range(group.num_cells):
        ids = torch.nonzero(group.unit_cell == cell).flatten()
        n = max(1, len(ids) // 2)
        pick = ids[torch.randperm(len(ids), generator=gen)[:n]]
        removed += group.units[pick].flatten().tolist()
    return sorted(removed)


def _bisect(names: list[str], reason: str, trial: Callable, graph: GroupGraph) -> dict[str, str]:
    """The groups of a failing set that fail on their own, with reasons (binary splitting).

    ``search`` is only called on sets known to fail. When the first half passes, the failure is
    in the second half (tested only when it is split further); sets that fail only together are
    refused as a whole. What is left is re-checked until it passes. ``trial(names, inside)``
    compares layer prints only when ``inside``: not while searching a crash (the cheaper
    trial), always otherwise and in the re-check.
    """
    bad: dict[str, str] = {}

    def search(subset: list[str], why: str) -> None:
        if len(subset) == 1:
            bad[subset[0]] = _explain(graph[subset[0]], why)
            return
        first, second = subset[: len(subset) // 2], subset[len(subset) // 2 :]
        inside = not why.startswith(_CRASHES)  # a crash is searched without layer prints
        first_why = trial(first, inside)
        if first_why is not None:
            search(first, first_why)
            second_why = trial(second, inside)
        else:
            second_why = why if len(second) > 1 else trial(second, inside)
        if second_why is not None:
            search(second, second_why)
        elif first_why is None:  # only fails together: refuse all of them
            for name in subset:
                bad[name] = _explain(graph[name], f"together with other groups, {why}")

    search(names, reason)
    while True:
        rest = [n for n in names if n not in bad]
        if not rest:
            return bad
        why = trial(rest, True)
        if why is None:
            return bad
        search(rest, why)


def _explain(group: ChannelGroup, why: str) -> str:
    unusual = group.unusual_ops()
    hint = f"; its channels pass through {', '.join(unusual[:3])}" if unusual else ""
    return f"{why}{hint}"


def _trial(
    work: nn.Module,
    graph: GroupGraph,
    removed: Mapping[str, list[int]],
    x: torch.Tensor,
    counter: WidthCounter | None,
    inside: bool = True,
) -> str | None:
    """Prune ``work`` (a float64 copy) by ``removed``; None if it matches the masked original
    (also inside, by :class:`_LayerPrints`, if ``inside``). ``graph`` (the graph of ``work``)
    is released afterwards."""
    try:
        return _check_pruned(work, graph, removed, x, counter, inside)
    finally:
        graph.release()


def _check_pruned(work, graph, removed, x, counter, inside=True) -> str | None:
    with eval_mode(work), torch.no_grad():
        try:
            reference, prints = _masked_reference(work, removed, graph, x, inside)
        except Exception as exc:  # noqa: BLE001
            return f"chip cannot mask its channels ({first_line(exc, with_type=True)})"
        if not _informative(reference):
            return "chip cannot check it: the masked model's output is zero or not finite"
        try:
            graph.prune(removed)
        except Exception as exc:  # noqa: BLE001 - any failure is a reason to refuse the group
            return f"Torch-Pruning cannot prune it ({first_line(exc, with_type=True)})"
    why = _mismatch(reference, prints, work, x)
    if why is not None:
        return why
    if counter is not None:
        from .counting import count

        widths = {g.name: g.channels - len(removed.get(g.name, ())) for g in counter.groups_list}
        predicted = counter(widths)
        measured = count(work, tuple(x.shape))
        if predicted != (measured.params, measured.macs):
            return (
                f"chip cannot count its params/MACs exactly (predicted {predicted}, measured "
                f"{(measured.params, measured.macs)})"
            )
    return None


def _relative_error(reference: list[torch.Tensor], output: list[torch.Tensor]) -> float | None:
    """max |a - b| / max |a| over all outputs; None if the shapes differ."""
    if len(reference) != len(output) or any(a.shape != b.shape for a, b in zip(reference, output)):
        return None
    worst = 0.0
    for a, b in zip(reference, output):
        scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-300)
        worst = max(worst, float((a.double() - b.double()).abs().max()) / scale if a.numel() else 0)
    return worst


def _verify(
    pristine: nn.Module,
    pruned: nn.Module,
    plan: PruningPlan,
    removed: Mapping[str, list[int]],
    graph: GroupGraph,
    failure: str | None,
) -> dict[str, Any] | None:
    """The pruned model against the masked original, in float64; ChipError naming the group.
    Returns :func:`_verify_counts`' stats for a plan whose own are wrong, else None.

    Models already in float64 are compared as they are, others through float64 copies. When the
    original's output carries no information (all zero, as with a zero-initialised head, or not
    finite) the same removal is checked on a :func:`probe_copy` with random weights instead.
    ``graph`` names the groups (a trace of the same architecture); ``failure`` is a pruning error
    already met, which sends the search for the culprit straight to bisection.
    """
    x = example_input(pristine, plan.input_size).double()
    why = failure
    if why is None:
        reference = _float64(pristine)
        with eval_mode(reference), torch.no_grad():
            try:
                expected, prints = _masked_reference(reference, removed, graph, x)
            except Exception as exc:  # noqa: BLE001
                raise ChipError(
                    f"cannot verify the pruned model: the original does not run in "
                    f"float64 ({first_line(exc, with_type=True)}); pass verify=False"
                ) from None
        del reference
        if _informative(expected):
            why = _mismatch(expected, prints, _float64(pruned), x)
        else:
            work = probe_copy(pristine)
            why = _trial(work, retrace(graph, work, x), removed, x, None)
    if why is None:
        return _verify_counts(pristine, pruned, plan, graph)

    template = probe_copy(pristine)

    def trial(names, inside):
        work = copy.deepcopy(template)
        subset = {n: removed[n] for n in names}
        return _trial(work, retrace(graph, work, x), subset, x, None, inside)

    bad = _bisect(list(removed), why, trial, graph)
    name, reason = next(iter(bad.items()))
    layers = ", ".join(dict.fromkeys(m.name for m in graph[name].members))
    raise ChipError(
        f"verification failed for group {name!r} (layers {layers[:200]}): {reason}; "
        "keep that group whole (rate 0 in a per-layer target) or report it"
    )


def _float64(model: nn.Module) -> nn.Module:
    """``model`` itself if every floating tensor in it is float64, else a float64 deep copy."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == torch.float64 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).double()


def _informative(outputs: list[torch.Tensor]) -> bool:
    """Outputs that can reveal a wrong model: finite and not all zero."""
    return (
        bool(outputs)
        and all(bool(torch.isfinite(t).all()) for t in outputs)
        and any(bool(t.abs().max() > 0) for t in outputs if t.numel())
    )


def _mismatch(
    expected: list[torch.Tensor],
    prints: _LayerPrints | None,
    candidate: nn.Module,
    x: torch.Tensor,
) -> str | None:
    """Why ``candidate`` does not compute ``expected`` and, inside, ``prints`` (if given; None
    when it does)."""
    with eval_mode(candidate), torch.no_grad():
        theirs = _LayerPrints(candidate, {}) if prints is not None else None
        try:
            output = flat_outputs(candidate(x))
        except Exception as exc:  # noqa: BLE001
            return f"the pruned model does not run ({first_line(exc, with_type=True)})"
        finally:
            if theirs is not None:
                theirs.remove()
    error = _relative_error(expected, output)
    if error is None:
        return "pruning it changes the shape of the model's output"
    if not error <= VERIFY_RTOL:  # also catches NaN
        return f"pruning it changes what the model computes (max relative error {error:.2g})"
    return prints.mismatch(theirs) if prints is not None else None


def _verify_counts(
    pristine: nn.Module, pruned: nn.Module, plan: PruningPlan, graph: GroupGraph
) -> dict[str, Any] | None:
    """chip's analytic counts for the plan's widths (what :func:`chip.plan` reports) must equal
    :func:`chip.count` of the pruned model. Returns None when ``plan.stats`` already says so,
    else the stats it should carry (an edited or hand-made plan; :func:`count_stats`)."""
    from .counting import count

    measured = count(pruned, plan.input_size)
    keys = ("base_params", "base_macs", "params", "macs")
    if (plan.stats.get("params"), plan.stats.get("macs")) == (measured.params, measured.macs):
        if all(isinstance(plan.stats.get(k), int) for k in keys):
            return None  # what chip.plan reported
    counter = WidthCounter(pristine, graph, plan.input_size)
    predicted = counter(plan.widths())
    if predicted != (measured.params, measured.macs):
        raise ChipError(
            f"the pruned model has {measured.params} params and {measured.macs} MACs "
            f"but chip predicted {predicted[0]} and {predicted[1]}; this is a chip bug: "
            "please report it"
        )
    return count_stats(counter, measured.params, measured.macs)
