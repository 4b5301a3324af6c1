"""Calibration: one streaming inference pass that scores every prunable channel.

``calibrate(model, loader)`` finds the model's channel groups (:mod:`chip.groups`), hooks the
input of every consumer layer (the tensor the pruned channels' readers see, docs/method.md section 1), runs the
model once over ``num_batches`` batches in eval mode under ``inference_mode`` and, inside the hooks,
turns each batch's maps into per-sample scores (channel independence by default) that are summed
in float64. No feature map outlives its hook call. Consumers that read the same tensor (e.g. the
first conv of a stage and its pad shortcut) are scored once.

The result, :class:`ChannelScores`, holds the mean score of every hook point and of every group
(the mean over the group's hook points, docs/method.md section 1 "coupled channels"). It saves to safetensors (no
pickle) and converts to and from the reference code's ``ci_conv{k}.npy`` files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .errors import ChipError
from .groups import GroupGraph, Member, find_groups
from .utils import atomic_write, eval_mode, require_data, resolve_device, seed_everything

__all__ = [
    "ChannelScores",
    "HookPoint",
    "calibrate",
    "first_batch",
    "hook_points",
    "reference_points",
]


# modules that hand their input on unchanged: never the "producer" of a tensor
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class HookPoint:
    """One tensor read by a group's consumers, labelled by the module that produced it.

    The label is the deepest module whose forward returned the tensor (ties: the latest, so an
    in-place ReLU wins over the BatchNorm before it), with ``:k`` appended when that module runs
    several times per forward (torchvision's Bottleneck reuses one ReLU). Pass-through modules
    (Identity, Dropout) are never producers. A tensor no module returned (e.g. a functional flatten
    or concatenation) is labelled ``"<consumer>:input"`` (``:input:k`` for the k-th call of a
    consumer called several times). When one tensor carries several groups' channels (a
    concatenation read by one conv), each group gets its own point, labelled ``"<label>[<group>]"``.

    ``calls`` lists every (consumer, call index) that reads the tensor; every call of a module
    called several times per forward (a shared head) is a separate point.
    """

    label: str
    group: str
    consumers: tuple[str, ...]
    calls: tuple[tuple[str, int], ...] = ()


def hook_points(
    model: nn.Module, graph: GroupGraph, example_inputs: torch.Tensor
) -> list[HookPoint]:
    """Trace one forward pass and list every group's hook points in execution order."""
    names = {m: n for n, m in model.named_modules() if n}
    produced: dict[int, list[tuple[int, int, str, int]]] = {}  # id -> (depth, seq, name, call)
    calls: dict[str, int] = {}
    keep_alive: list[torch.Tensor] = []
    reads: list[tuple[str, int, int]] = []  # (consumer, call, tensor id) in execution order
    read_calls: dict[str, int] = {}
    members: dict[str, list[tuple[str, Member]]] = {}
    for g in graph:
        for c in g.consumers:
            members.setdefault(c.name, []).append((g.name, c))
    seq = [0]

    def on_output(module, _inputs, output):
        if not isinstance(output, torch.Tensor) or isinstance(module, _PASS_THROUGH):
            return
        name = names[module]
        call = calls.get(name, 0)
        calls[name] = call + 1
        keep_alive.append(output)
        seq[0] += 1
        produced.setdefault(id(output), []).append((name.count(".") + 1, seq[0], name, call))

    def on_input(module, inputs):
        name = names[module]
        keep_alive.append(inputs[0])
        reads.append((name, read_calls.get(name, 0), id(inputs[0])))
        read_calls[name] = read_calls.get(name, 0) + 1

    handles = [m.register_forward_hook(on_output) for m in names]
    handles += [m.register_forward_pre_hook(on_input) for m, n in names.items() if n in members]
    try:
        with eval_mode(model), torch.inference_mode():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()

    groups_of_tensor: dict[int, set[str]] = {}
    for consumer, _, tid in reads:
        groups_of_tensor.setdefault(tid, set()).update(g for g, _ in members[consumer])
    by_key: dict[tuple[str, int], list[tuple[str, int]]] = {}
    labels: dict[tuple[str, int], str] = {}
    used: set[str] = set()
    for consumer, call, tid in reads:
        for group, _member in members[consumer]:
            key = (group, tid)
            if key not in by_key:
                by_key[key] = []
                if tid in produced:
                    _, _, name, pcall = max(produced[tid])
                    label = f"{name}:{pcall}" if calls[name] > 1 else name
                else:
                    label = f"{consumer}:input" + (f":{call}" if read_calls[consumer] > 1 else "")
                if len(groups_of_tensor[tid]) > 1:
                    label = f"{label}[{group}]"
                base, n = label, 1
                while label in used:
                    n += 1
                    label = f"{base}#{n}"
                used.add(label)
                labels[key] = label
            if (consumer, call) not in by_key[key]:
                by_key[key].append((consumer, call))
    return [
        HookPoint(labels[k], k[0], tuple(dict.fromkeys(c for c, _ in v)), tuple(v))
        for k, v in by_key.items()
    ]


def _gather(x: torch.Tensor, consumer: Member) -> torch.Tensor:
    """The group's channels out of a consumer's input: (N, C, ...) maps.

    The consumer's channel axis (1, or -1 for linear layers and channels-last tensors) is moved
    to dim 1 first; a flattened (N, F) input gives (N, C, r) (each channel spans r features).
    """
    if consumer.axis % x.dim() != 1:
        x = x.movedim(consumer.axis, 1)
    if consumer.is_identity and x.dim() > 2 and x.shape[1] == consumer.index.shape[0]:
        return x
    index = consumer.index.to(x.device)
    if x.dim() == 2:
        return x[:, index]
    return x.index_select(1, index[:, 0])


class _Accumulator:
    """Per-hook-point float64 score sums; owned by one calibrate call (no global state).

    One forward pre-hook per consumer module counts that module's calls within the batch and
    scores the points whose first reader is this call.
    """

    def __init__(self, points: list[HookPoint], criterion, graph: GroupGraph, norms: bool = False):
        self.criterion = criterion
        self.sums: dict[str, torch.Tensor | None] = {p.label: None for p in points}
        # per-channel feature-map norm sums ||a_i|| (CHIP scores: the global allocation's scale)
        self.norm_sums: dict[str, torch.Tensor | None] | None = (
            {p.label: None for p in points} if norms else None
        )
        self.positions: dict[str, int] = {}  # hook point -> positions per channel map
        self.counts: dict[str, int] = {p.label: 0 for p in points}
        self.dispatch: dict[str, dict[int, list[tuple[str, Member]]]] = {}
        for p in points:
            consumer, call = p.calls[0]
            member = next(c for c in graph[p.group].consumers if c.name == consumer)
            self.dispatch.setdefault(consumer, {}).setdefault(call, []).append((p.label, member))
        self.calls: dict[str, int] = {}

    def hook(self, consumer: str):
        def _hook(_module, inputs):
            call = self.calls.get(consumer, 0)
            self.calls[consumer] = call + 1
            for label, member in self.dispatch[consumer].get(call, ()):
                fmaps = _gather(inputs[0], member)
                scores = self.criterion(fmaps).to(torch.float64)
                _add(self.sums, label, scores.sum(0))
                self.counts[label] += scores.shape[0]
                if self.norm_sums is not None and fmaps[0, 0].numel() > 1:
                    # one position per channel (a pooled vector) makes every channel dependent:
                    # no meaningful scale there, so such points record no norms
                    norms = fmaps.flatten(2).norm(dim=2)
                    _add(self.norm_sums, label, norms.to(torch.float64).sum(0))
                    self.positions[label] = fmaps[0, 0].numel()

        return _hook

    def next_batch(self) -> None:
        self.calls.clear()


def _group_means(vectors: dict[str, torch.Tensor], point_group: dict[str, str]):
    """``{group: mean of its hook points' vectors}`` (float64)."""
    members: dict[str, list[torch.Tensor]] = {}
    for label, vec in vectors.items():
        members.setdefault(point_group[label], []).append(vec.to(torch.float64))
    return {g: torch.stack(v).mean(0) for g, v in members.items()}


def _add(sums: dict, label: str, total: torch.Tensor) -> None:
    prev = sums[label]
    sums[label] = total if prev is None else prev + total


def split_batch(batch) -> torch.Tensor:
    x = batch
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = next(
            (batch[k] for k in ("image", "images", "input", "inputs", "x") if k in batch), None
        )
    if not isinstance(x, torch.Tensor):
        raise ChipError(
            f"cannot find the inputs in a batch of type {type(batch).__name__}; "
            "expected a tensor, an (inputs, targets) pair or a dict with an 'image' key"
        )
    return x


@dataclass(repr=False)
class ChannelScores:
    """Mean per-channel scores of every group and hook point of one model.

    ``groups[name]`` is the (C,) float64 mean score of group ``name`` (keep the largest);
    ``points[label]`` the mean score at one hook point; ``point_group[label]`` its group.
    CHIP scores also carry ``norms[name]``: the (C,) mean L2 norm ``||a_i||`` of each channel's
    feature map (per sample, over positions; mean over samples and the group's hook points),
    the scale ``CI_i <= ||a_i||`` that makes scores comparable across groups
    (:mod:`chip.allocation`, ``global``); ``point_norms`` the same per hook point.
    """

    groups: dict[str, torch.Tensor]
    points: dict[str, torch.Tensor] = field(default_factory=dict)
    point_group: dict[str, str] = field(default_factory=dict)
    num_samples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    point_norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        meta = self.meta or {}
        return (
            f"ChannelScores({len(self.groups)} groups, {len(self.points)} hook points, "
            f"criterion {meta.get('criterion')}, {self.num_samples} samples, "
            f"arch {meta.get('arch')}; .table() lists them)"
        )

    def table(self) -> str:
        """One line per group: channels and the min / mean / max score."""
        width = max([len("group")] + [len(n) for n in self.groups])
        lines = [f"{'group':<{width}}  channels  {'min':>10}  {'mean':>10}  {'max':>10}"]
        for name, v in self.groups.items():
            v = v.double()
            lines.append(
                f"{name:<{width}}  {v.numel():>8}  {float(v.min()):>10.4g}  "
                f"{float(v.mean()):>10.4g}  {float(v.max()):>10.4g}"
            )
        return "\n".join(lines)

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.groups[group]

    def __contains__(self, group: str) -> bool:
        return group in self.groups

    @classmethod
    def from_points(
        cls,
        points: dict[str, torch.Tensor],
        point_group: dict[str, str],
        point_norms: dict[str, torch.Tensor] | None = None,
        **kw,
    ):
        """Group scores (and norms) as the mean of each group's hook-point vectors
        (docs/method.md section 1)."""
        point_norms = dict(point_norms or {})
        return cls(
            groups=_group_means(points, point_group),
            points=dict(points),
            point_group=dict(point_group),
            norms=_group_means(point_norms, point_group),
            point_norms=point_norms,
            **kw,
        )

    # -- persistence (safetensors: tensors + JSON metadata, no pickle) ---------------------------
    def save(self, path) -> None:
        from safetensors.torch import save as st_save

        tensors = {f"group/{k}": v.contiguous().cpu() for k, v in self.groups.items()}
        tensors.update({f"point/{k}": v.contiguous().cpu() for k, v in self.points.items()})
        tensors.update({f"norm/{k}": v.contiguous().cpu() for k, v in self.point_norms.items()})
        header = {
            "format": "chip.ChannelScores/1",
            "point_group": json.dumps(self.point_group),
            "num_samples": str(self.num_samples),
            "meta": json.dumps(self.meta),
        }
        with atomic_write(path) as f:
            f.write(st_save(tensors, metadata=header))

    @classmethod
    def load(cls, path) -> ChannelScores:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ChipError(
                f"scores file not found: {path} (expected a file written by `chip score`)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ChipError(
                f"cannot read scores file {path}: {exc} (expected safetensors)"
            ) from None
        if header.get("format") != "chip.ChannelScores/1":
            raise ChipError(
                f"{path} is not a chip scores file (expected one written by `chip score`)"
            )
        point_group = json.loads(header["point_group"])
        point_norms = {k[5:]: v for k, v in tensors.items() if k.startswith("norm/")}
        return cls(
            groups={k[6:]: v for k, v in tensors.items() if k.startswith("group/")},
            points={k[6:]: v for k, v in tensors.items() if k.startswith("point/")},
            point_group=point_group,
            num_samples=int(header["num_samples"]),
            meta=json.loads(header["meta"]),
            norms=_group_means(point_norms, point_group),
            point_norms=point_norms,
        )

    # -- reference layout (ci_conv{k}.npy) -------------------------------------------------------
    def export_reference(self, directory, arch: str) -> list[Path]:
        """Write ``ci_conv{k}.npy`` in the reference's numbering for ``arch`` (an architecture
        registered with reference points, :func:`reference_points`).

        Hook points the reference has but chip does not score (the last stage's final block
        output, which chip reads through the global pool) are skipped; returns the written paths.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for k, label in enumerate(reference_points(arch), start=1):
            if label in self.points:
                path = directory / f"ci_conv{k}.npy"
                with atomic_write(path) as f:
                    np.save(f, self.points[label].cpu().numpy())
                written.append(path)
        return written

    @classmethod
    def from_reference(cls, directory, arch: str, points: Iterable[HookPoint]) -> ChannelScores:
        """Read the reference's ``ci_conv{k}.npy`` files for ``arch`` (an architecture registered
        with reference points, :func:`reference_points`).

        ``points`` are the model's hook points (:func:`hook_points`), which assign each file to its
        group. Reference files chip has no hook point for are ignored.
        """
        directory = Path(directory)
        files = {
            int(m.group(1)): p
            for p in directory.glob("ci_conv*.npy")
            if (m := re.fullmatch(r"ci_conv(\d+)\.npy", p.name))
        }
        if not files:
            raise ChipError(
                f"no ci_conv{{k}}.npy files in {directory} (expected the reference's CI dir)"
            )
        point_group = {p.label: p.group for p in points}
        loaded = {}
        for k, label in enumerate(reference_points(arch), start=1):
            if k in files and label in point_group:
                loaded[label] = torch.from_numpy(np.load(files[k], allow_pickle=False)).double()
        return cls.from_points(
            loaded,
            {lb: point_group[lb] for lb in loaded},
            meta={"source": f"reference:{directory}", "arch": arch, "criterion": "chip"},
        )


def reference_points(arch: str) -> list[str]:
    """The reference code's hooked layers for a zoo arch, in its ``ci_conv{k}`` order.

    They are registered with the model (:attr:`chip.models.ModelInfo.reference_points`): hook-point
    labels as :func:`hook_points` names them, ``ci_conv{k}.npy`` being the ``k``-th (from 1).
    """
    from .models import get_model_info, list_models

    infos = [get_model_info(name) for name in list_models()]
    table = {
        info.name: info.reference_points for info in infos if info.reference_points is not None
    }
    if arch not in table:
        raise ChipError(
            f"no reference CI layout for arch {arch!r}; expected one of {sorted(table)}"
        )
    return list(table[arch])


def first_batch(loader) -> torch.Tensor:
    """The inputs of the first batch of ``loader`` (at most two samples), to trace a model on."""
    try:
        first = next(iter(loader))
    except StopIteration:
        raise ChipError(
            "the calibration loader is empty; expected at least one batch of images"
        ) from None
    return split_batch(first)[:2]


def calibrate(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 5,
    device=None,
    seed: int | None = 0,
    criterion: str | Callable[[torch.Tensor], torch.Tensor] = "chip",
    graph: GroupGraph | None = None,
    progress: bool = True,
) -> ChannelScores:
    """Score every prunable channel of ``model`` in one inference pass over ``loader``.

    The data pass behind :func:`chip.score` (the one scoring entry point, for every criterion);
    call it directly for a custom per-map criterion.

    Args:
        model: any torchvision-style CNN (left in the mode and on the device it came in).
        loader: yields tensors, ``(inputs, targets)`` pairs or dicts with an ``image`` key.
        num_batches: how many batches to use (the paper: 5 x 128 training images).
        device: where to run (default: CUDA if available, else CPU).
        seed: seeds the RNGs before the pass so augmentation in the loader is reproducible
            (``None`` leaves them alone).
        criterion: the name of a data criterion of :data:`chip.criteria.CRITERIA` (``"chip"``,
            ``"hrank"``) or a callable mapping (N, C, ...) maps to (N, C) per-sample scores
            (larger = keep).
        graph: precomputed :func:`chip.groups.find_groups` result for this model.
        progress: show a tqdm bar over batches.

    Under ``torchrun`` the per-rank sums are all-reduced, so every rank gets the same scores.
    """
    if num_batches < 1:
        raise ChipError(f"num_batches must be >= 1, got {num_batches}")
    require_data(model)
    if isinstance(criterion, str):
        from .criteria import get_criterion

        entry = get_criterion(criterion)
        if not entry.needs_data:
            raise ChipError(
                f"criterion {criterion!r} is computed from the weights, not from data; "
                "use chip.score(model, loader, criterion)"
            )
        score_fn = entry.fn
    else:
        score_fn = criterion
    if seed is not None:
        seed_everything(seed)
    device = resolve_device(device)
    original_device = next(iter(model.parameters())).device
    flags = [(m, m.training) for m in model.modules()]
    example = first_batch(loader).to(device)
    handles = []
    seen = 0
    own_graph = graph is None
    try:
        model.to(device)
        graph = graph if graph is not None else find_groups(model, example, check=False)
        points = hook_points(model, graph, example)
        acc = _Accumulator(points, score_fn, graph, norms=criterion == "chip")
        for consumer in acc.dispatch:
            module = model.get_submodule(consumer)
            handles.append(module.register_forward_pre_hook(acc.hook(consumer)))
        model.eval()
        from tqdm.auto import tqdm

        from .distributed import is_main_process

        bar = tqdm(
            total=num_batches,
            desc="calibrate",
            unit="batch",
            disable=not progress or not is_main_process(),
        )
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                x = split_batch(batch).to(device, non_blocking=True)
                model(x)
                seen += x.shape[0]
                acc.next_batch()
                bar.update(1)
        bar.close()
    finally:  # the model leaves as it came: no hooks, same flags, same device
        if own_graph and graph is not None:
            graph.release()
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
        model.to(original_device)

    sums, counts, norm_sums = _all_reduce(acc, device)
    missing = [lb for lb, s in sums.items() if s is None or counts[lb] == 0]
    if missing:
        raise ChipError(
            f"hook points never ran during calibration: {missing[:5]} (is the loader empty?)"
        )
    means = {lb: (sums[lb] / counts[lb]).cpu() for lb in sums}
    norms = {lb: (v / counts[lb]).cpu() for lb, v in (norm_sums or {}).items() if v is not None}
    return ChannelScores.from_points(
        means,
        {p.label: p.group for p in points},
        norms,
        num_samples=int(next(iter(counts.values()))) if counts else 0,
        meta={
            "arch": getattr(model, "chip_arch", None),
            "criterion": criterion
            if isinstance(criterion, str)
            else getattr(criterion, "__name__", "custom"),
            "positions": dict(acc.positions),
            "num_batches": num_batches,
            "samples_this_rank": seen,
            "seed": seed,
            "chip_version": __version__,
            "torch_version": torch.__version__,
        },
    )


def _all_reduce(acc: _Accumulator, device):
    """Per-rank score sums, sample counts and norm sums (``None`` unless scored) summed across
    ranks in one collective (no-op outside torch.distributed)."""
    from .distributed import all_reduce_sum, get_world_size

    if get_world_size() <= 1:
        return acc.sums, acc.counts, acc.norm_sums
    missing = [label for label, s in acc.sums.items() if s is None]
    if missing:
        raise ChipError(f"hook point {missing[0]} received no data on this rank")
    labels = list(acc.sums)
    normed = [lb for lb in labels if acc.norm_sums is not None and acc.norm_sums[lb] is not None]
    counts = torch.tensor([float(acc.counts[lb]) for lb in labels], dtype=torch.float64)
    parts = [acc.sums[lb].to(device, torch.float64) for lb in labels]
    parts += [acc.norm_sums[lb].to(device, torch.float64) for lb in normed]
    flat = torch.cat(parts + [counts.to(device)])
    all_reduce_sum(flat)
    *parts, counts = torch.split(flat, [p.numel() for p in parts] + [len(labels)])
    sums = dict(zip(labels, parts[: len(labels)]))
    norm_sums = dict(zip(normed, parts[len(labels) :])) if acc.norm_sums is not None else None
    return sums, {lb: int(c) for lb, c in zip(labels, counts.tolist())}, norm_sums
