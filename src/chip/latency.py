"""Inference latency of a model: median (and p10/p90) wall time of repeated forward passes.

    >>> r = measure_latency(model, (64, 3, 32, 32), device="cuda", channels_last=True, amp="fp16")
    >>> print(r)   # median 1.23 ms (p10 1.20, p90 1.31) over 30 runs, batch 64, cuda:0, ...

Runs under ``torch.inference_mode`` with the model in eval mode (each submodule's mode is restored
afterwards); the input is generated once from a fixed seed; on CUDA every timed run is bracketed by
CUDA events and synchronised. A model that must move device or memory format is measured on a copy,
so the caller's model is never modified.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from chip.counting import check_input_size, on_device
from chip.errors import ChipError
from chip.utils import AMP_DTYPES, device_dtype, eval_mode

__all__ = [
    "LatencyResult",
    "LatencyTable",
    "compare_models",
    "compare_widths",
    "detect_step",
    "first_channels_plan",
    "interleaved_ms",
    "latency_table",
    "measure_latency",
    "measure_table",
    "measure_widths",
    "meet_latency",
    "table_key",
]

_SEED = 0

_AMP_DEFAULT = {"cuda": torch.float16, "cpu": torch.bfloat16}


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one forward pass of a batch, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    device: str
    threads: int

    @property
    def images_per_s(self) -> float:
        """Throughput at the median latency."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        """JSON-serialisable dict, including ``images_per_s``."""
        return {**asdict(self), "images_per_s": self.images_per_s}

    def __str__(self) -> str:
        return (
            f"median {self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}) "
            f"over {self.repeats} runs, batch {self.batch_size}, {self.device}, "
            f"{self.threads} threads, {self.images_per_s:.1f} img/s"
        )


def _amp_dtype(amp, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (None/False: off; True: device default; a dtype or name)."""
    if amp is None or amp is False:
        return None
    if amp is True:
        if device.type not in _AMP_DEFAULT:
            raise ChipError(
                f"amp=True has no default dtype on {device.type}; pass 'fp16' or 'bf16'"
            )
        return _AMP_DEFAULT[device.type]
    if isinstance(amp, torch.dtype) and amp in AMP_DTYPES.values():
        return amp
    if isinstance(amp, str) and amp in AMP_DTYPES:
        return AMP_DTYPES[amp]
    raise ChipError(
        f"bad amp {amp!r}; expected None, True, torch.float16/bfloat16 or one of "
        f"{', '.join(AMP_DTYPES)} (the training modes)"
    )


def _check_counts(warmup, repeats, min_time_s) -> None:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(warmup) or warmup < 0:
        raise ChipError(f"bad warmup {warmup!r}; expected an integer >= 0")
    if not is_int(repeats) or repeats < 1:
        raise ChipError(f"bad repeats {repeats!r}; expected an integer >= 1")
    if min_time_s is not None and (isinstance(min_time_s, bool) or not min_time_s >= 0):
        raise ChipError(f"bad min_time_s {min_time_s!r}; expected None or a number >= 0")


def _check_timeable(device) -> None:
    if torch.device(device).type == "meta":
        raise ChipError(
            "latency cannot be measured on the meta device (it holds no data); "
            "use --device cpu or cuda"
        )


def _make_input(
    size: tuple[int, ...], device: torch.device, dtype: torch.dtype, memory_format
) -> torch.Tensor:
    """Standard-normal input from a private, fixed-seed generator (global RNG untouched)."""
    gen = torch.Generator().manual_seed(_SEED)
    x = torch.randn(size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


def _cpu_timer(run: Callable[[], object]) -> float:
    """Milliseconds of one ``run()`` by ``perf_counter``."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000.0


def _cuda_timer(run: Callable[[], object]) -> float:
    """Milliseconds of one ``run()`` between synchronised CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


# device type -> timer of one run (default: perf_counter)
_TIMERS = {"cuda": _cuda_timer}


def measure_latency(
    model: nn.Module,
    input_size,
    *,
    device=None,
    warmup: int = 10,
    repeats: int = 30,
    min_time_s: float | None = None,
    channels_last: bool = False,
    amp=None,
) -> LatencyResult:
    """Median latency (ms) of ``model`` on a batch of ``input_size`` = (batch, channels, *spatial).

    Args:
        device: where to run (default: where the model is); a model elsewhere runs on a copy.
        warmup: untimed runs first.
        repeats: timed runs (at least); with ``min_time_s``, runs continue until the timed total
            reaches it, and ``result.repeats`` says how many ran.
        channels_last: run a channels-last copy on a channels-last input (4-D inputs only).
        amp: None/False (off), True (fp16 on CUDA, bf16 on CPU), or a dtype / ``"fp16"`` / ``"bf16"``
            for ``torch.autocast``.
    """
    size = check_input_size(input_size)
    _check_counts(warmup, repeats, min_time_s)
    _check_timeable(device if device is not None else device_dtype(model)[0])
    if channels_last and len(size) != 4:
        raise ChipError(f"channels_last needs a 4-D input_size (N, C, H, W), got {size}")
    memory_format = torch.channels_last if channels_last else None
    work = on_device(model, device, memory_format)
    dev, dtype = device_dtype(work)
    amp_dtype = _amp_dtype(amp, dev)
    x = _make_input(size, dev, dtype, memory_format)
    autocast = (
        torch.autocast(dev.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    timer = _TIMERS.get(dev.type, _cpu_timer)

    def run():
        return work(x)

    times: list[float] = []
    with torch.inference_mode(), eval_mode(work), autocast:
        for _ in range(warmup):
            run()
        while len(times) < repeats or (min_time_s is not None and sum(times) < min_time_s * 1e3):
            times.append(timer(run))
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return LatencyResult(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        repeats=len(times),
        batch_size=size[0],
        device=str(dev),
        threads=torch.get_num_threads(),
    )


# -- latency cost model: measured time saved per (group, kept width) -------------------------------

_STEPS = (2, 4, 8, 16, 32, 64)  # channel steps round_to="auto" considers
_STEP_TOLERANCE = 0.25  # rounding up within a block: at most this share of the jump between blocks
_STEP_AGREE = 0.8  # the share of widths that must cost no time rounded up
_SAMPLE_MS = 1.0  # a layer timing's sample lasts at least this long (runs looped)
_MAX_LOOP = 256
_TABLE_FORMAT = 5  # raised whenever measure_table or detect_step changes what a table holds
_FINE = 33  # widths measured one step apart below each group's full width (step detection)
_TIMED = (nn.modules.conv._ConvNd, nn.Linear)  # the layers the table times


def _layer_time(module: nn.Module, shape: tuple[int, ...], out_c: int, in_c: int) -> float:
    """Median ms of ``module``'s operation with ``out_c`` output and ``in_c`` input channels on a
    random input shaped like ``shape`` (its channel dim replaced), weights sliced; warm-up first."""
    weight = module.weight.detach()
    device, dtype = weight.device, weight.dtype
    if isinstance(module, nn.Linear):
        x = torch.randn((*shape[:-1], in_c), device=device, dtype=dtype)
        w = weight[:out_c, :in_c]

        def run():
            return torch.nn.functional.linear(x, w)
    else:
        depthwise = module.groups == module.in_channels == module.out_channels
        groups = in_c if depthwise else module.groups
        x = torch.randn((shape[0], in_c, *shape[2:]), device=device, dtype=dtype)
        w = weight[:out_c, : 1 if depthwise else in_c // groups]
        conv = getattr(torch.nn.functional, f"conv{w.dim() - 2}d")
        kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

        def run():
            return conv(x, w, None, groups=groups, **kw)

    with torch.inference_mode():
        return _median_ms(run, _TIMERS.get(device.type, _cpu_timer))


def _median_ms(run: Callable[[], object], timer: Callable, samples: int = 5) -> float:
    """Median ms of one ``run()`` over ``samples`` timed samples, after two warm-up runs.

    A sample times ``k`` back-to-back runs and divides by ``k``, the least power of two (at most
    ``_MAX_LOOP``) for which a first run's time fills ``_SAMPLE_MS`` (as ``timeit`` autoranges):
    an operation of a few microseconds timed alone is mostly clock and scheduler jitter.
    """
    for _ in range(2):
        run()
    one = max(timer(run), 1e-6)
    k = 1
    while k * one < _SAMPLE_MS and k < _MAX_LOOP:
        k *= 2

    loop = functools.partial(_repeat, run, k)
    return float(np.median([timer(loop) / k for _ in range(samples)]))


@dataclass
class LatencyTable:
    """Measured latency of every conv/linear layer at the widths of the groups it touches.

    ``layers[name]`` is ``{"ms": time whole, "sides": [[group, [[width, ms], ...]], ...]}``: for
    each group the layer writes or reads, its time with that group at each measured width (the
    rest whole). ``base_ms`` is the whole unpruned model's latency, ``steps[group]`` the channel
    step at which the group's layers' time actually drops (1: every channel), ``key`` what the
    table is valid for (:func:`table_key`).

    A plan's latency is predicted as ``rest + sum(ms * prod(side ratios))``: each layer's time
    scales by the measured ratio of each side it touches (exact when time is a product of an
    output-width and an input-width term, as for compute-bound convolutions). ``rest`` is the
    time of every other operation (norms, activations, adds, pooling, call overhead):
    ``base_ms - sum(ms)`` for the whole model, and linear in the kept share of the groups'
    activations (``rest["weights"]``: per group, its producers' output elements and channels),
    fitted to one measured model with every group at half width (``rest["half_ms"]``); where the
    layers alone promise more than that model saves, all savings are scaled to match it. Without
    that measurement (``rest`` empty) the other operations keep their time. :func:`chip.plan`
    reports the prediction; compare it with :func:`measure_latency` of the pruned model.
    """

    base_ms: float
    layers: dict[str, dict]
    steps: dict[str, int]
    key: dict
    rest: dict = field(default_factory=dict)

    def _layer_ms(self, widths: Mapping[str, int]) -> float:
        total = 0.0
        for layer in self.layers.values():
            scale = 1.0
            for group, curve in layer["sides"]:
                w, t = zip(*curve)
                if group in widths and t[-1] > 0:  # each side against its own full-width time
                    scale *= float(np.interp(widths[group], w, t)) / t[-1]
            total += layer["ms"] * scale
        return total

    def _kept_activations(self, widths: Mapping[str, int]) -> float:
        weights = self.rest["weights"]
        total = sum(e for e, _ in weights.values())
        kept = sum(e * widths.get(g, c) / c for g, (e, c) in weights.items())
        return kept / total if total > 0 else 1.0

    @functools.cached_property
    def _fit(self) -> tuple[float, float, float, float]:
        """(ms of the other operations for the whole model, ms they lose per unit of activation
        share removed, the share of the predicted savings that is real, the unscaled prediction
        of the whole model); computed once per table, as every prediction needs them.

        The half-width measurement first sets the slope of the other operations. When the layers
        alone already promise more than the measured saving (isolated layers run faster per
        channel than in the model, as with several threads on a CPU), the slope stays 0 and the
        savings are scaled down instead, so that the half-width prediction is the measured time.
        """
        rest = max(0.0, self.base_ms - self._layer_ms({}))
        if not self.rest:
            return rest, 0.0, 1.0, self._raw({}, rest, 0.0)
        half = self.rest["half_widths"]
        rest_half = max(0.0, self.rest["half_ms"] - self._layer_ms(half))
        # never slower with fewer activations (a noisy half-width timing can say otherwise)
        slope = max(0.0, (rest - rest_half) / (1.0 - self.rest["a_half"]))
        whole = self._raw({}, rest, slope)
        promised = whole - self._raw(half, rest, slope)
        measured = self.base_ms - self.rest["half_ms"]
        share = min(1.0, measured / promised) if measured > 0 and promised > 0 else 1.0
        return rest, slope, share, whole

    def _raw(self, widths: Mapping[str, int], rest: float, slope: float) -> float:
        if slope > 0:
            rest = max(0.0, rest - slope * (1.0 - self._kept_activations(widths)))
        return rest + self._layer_ms(widths)

    def predict(self, widths: Mapping[str, int]) -> float:
        """Predicted ms of the model with these group widths (groups not named stay whole)."""
        rest, slope, share, whole = self._fit
        saved = whole - self._raw(widths, rest, slope)
        return self.base_ms - share * saved  # the whole model is the measured base_ms

    def to_dict(self) -> dict:
        return asdict(self)


def detect_step(widths: Sequence[int], times: Sequence[float], channels: int, unit: int = 1) -> int:
    """The largest channel step ``s`` (a multiple of ``unit`` among 2, 4, ..., 64 and below
    ``channels``, else ``unit``) at which rounding a width up to a multiple costs no time.

    No time means: of the measured widths ``w > s`` that are not multiples of ``s``, at least
    ``_STEP_AGREE`` (80 %) take at least the time of the next multiple ``ceil(w / s) * s`` (when
    measured) less a quarter of the median jump between consecutive measured multiples, and that
    jump is positive. A multiple may be faster than the widths below it (oneDNN on one CPU
    measured here: 48 channels 10 % faster than 33-47, which are padded to 48 and take a slower
    kernel). Widths below ``s`` are not compared: rounding to ``s`` keeps at least ``s``
    channels, and below the first block time often still falls channel by channel (oneDNN CPU
    convolutions measured here: flat in blocks of 16 above 16 channels, linear below). The share
    rather than every width tolerates an outlier timing; a curve that falls with every channel
    (linear) agrees on about a quarter of the widths and gives ``unit``.
    """
    t = dict(zip(widths, times))
    best = unit
    for s in _STEPS:
        if s % unit or s >= channels:
            continue
        pairs = [(w, -(-w // s) * s) for w in t if w > s and w % s and -(-w // s) * s in t]
        multiples = sorted(w for w in t if w % s == 0)
        jumps = [abs(t[b] - t[a]) for a, b in zip(multiples, multiples[1:]) if b - a == s]
        if not pairs or not jumps:
            continue
        jump = float(np.median(jumps))
        flat = sum(t[up] - t[w] <= _STEP_TOLERANCE * jump for w, up in pairs)
        if jump > 0 and flat >= _STEP_AGREE * len(pairs):
            best = s
    return best


def first_channels_plan(graph, widths: Mapping[str, int], input_size):
    """A :class:`chip.PruningPlan` cutting every group of ``graph`` to ``widths`` (its first
    channels; which ones does not change the shapes, so neither the latency)."""
    from .planning import GroupPlan, PruningPlan

    groups = {g.name: GroupPlan(g.channels, g.choose(None, widths[g.name])) for g in graph}
    size = (1, *tuple(input_size)[1:])
    return PruningPlan(groups, input_size=size, skipped=dict(graph.skipped))


def _pruned_ms(
    model: nn.Module, graph, widths: dict[str, int], input_size, min_time_s: float | None = None
) -> float:
    """Median ms of :func:`_pruned_copy` of ``model``."""
    pruned = _pruned_copy(model, graph, widths, input_size)
    return measure_latency(
        pruned, input_size, warmup=3, repeats=10, min_time_s=min_time_s
    ).median_ms


Compare = Callable[[dict | None, dict | None], tuple[float, float, float]]


def meet_latency(
    solve_at: Callable[[float], tuple[dict[str, int], dict]],
    fraction: float,
    compare: Compare,
    *,
    rounds: int = 6,
    tolerance: float = 0.03,
) -> tuple[dict[str, int], dict, dict]:
    """Meet a ``latency=fraction`` budget as measured, not only as predicted.

    ``solve_at(f)`` returns ``(widths, record)`` for a predicted budget ``f``; ``compare(a, b)``
    times the model pruned to widths ``a`` and ``b`` (``None``: unpruned) against each other and
    returns ``(ms of a, ms of b, ratio b / a)`` (:func:`compare_widths`: the two timed in turns,
    the ratio the median over adjacent turns, so that the machine's drift cancels). Each
    round compares the unpruned model with the solved widths, and aims the next at the middle
    of the band
    ``[fraction * (1 - tolerance), fraction]``: proportionally after the first round, then along
    the secant through the last two (asked, measured) points, kept inside the bracket of asked
    budgets that measured below and above the band once there is one; a budget the solver cannot reach
    is halved towards the last one that worked. It stops inside the band or after ``rounds``
    measurements, and returns the widest widths measured at most ``fraction`` (else the fastest,
    with a :class:`ChipWarning` naming the ratio reached), their record, and
    ``{"measured_base_ms", "measured_ratio", "rounds": [{"asked", "measured", "base_ms"}]}``.
    """
    from .errors import ChipError, ChipWarning

    aim = fraction * (1 - tolerance / 2)
    asked, history, best, tries = fraction, [], None, 0
    while len(history) < rounds and tries < 2 * rounds:
        tries += 1
        try:
            widths, record = solve_at(asked)
        except ChipError:
            if not history:
                raise
            asked = (asked + history[-1]["asked"]) / 2  # the correction went past the reachable
            continue
        base, _, ratio = compare(None, widths)
        history.append({"asked": asked, "measured": ratio, "base_ms": base})
        met = ratio <= fraction
        rank = (met, sum(widths.values()) if met else -ratio)
        if best is None or rank > best[0]:
            best = (rank, widths, record, ratio)
        if fraction * (1 - tolerance) <= ratio <= fraction:
            break
        asked = asked * aim / ratio
        if len(history) >= 2:  # secant through the last two points, when it slopes upwards
            (a0, m0), (a1, m1) = ((h["asked"], h["measured"]) for h in history[-2:])
            if a1 != a0 and (m1 - m0) / (a1 - a0) > 0:
                asked = a1 + (aim - m1) * (a1 - a0) / (m1 - m0)
        asked = _bracketed(asked, history, fraction, aim, tolerance)
        asked = min(1.0, max(asked, 1e-3))
    _, widths, record, ratio = best
    base = float(np.median([h["base_ms"] for h in history]))
    if ratio > fraction * (1 + tolerance):
        warnings.warn(
            f"latency={fraction:g}: the fastest plan found measures {ratio:.3f} of the unpruned "
            f"latency after {len(history)} measured rounds; it is returned as is (a larger "
            "--latency-batch or a looser budget may be reachable)",
            ChipWarning,
            stacklevel=3,
        )
    return widths, record, {"measured_base_ms": base, "measured_ratio": ratio, "rounds": history}


def faster_widths(
    compare: Compare, auto: dict[str, int], plain: dict[str, int]
) -> tuple[str, dict]:
    """Which of two plans' widths measures faster: ``auto`` (``round_to="auto"``: the table's
    steps and its give-back) or ``plain`` (what ``round_to=1`` gives for the same target, no
    latency table); ``compare`` as for :func:`meet_latency`.

    ``"step 1"`` wins only when the median ratio of its turns to auto's adjacent turns is
    strictly below 1. Returns ``(winner, {"auto_ms", "step1_ms", "kept"})``: a table predicts,
    and at a small batch its plan can measure slower (ResNet-56 and ResNet-50 at batch 1 on one
    CPU thread: 3-10 % slower than ``round_to=1``), and ``round_to="auto"`` must never cost
    time.
    """
    auto_ms, step1_ms, ratio = compare(auto, plain)
    winner = "step 1" if ratio < 1 else "auto"
    return winner, {"auto_ms": auto_ms, "step1_ms": step1_ms, "kept": winner}


def _bracketed(asked: float, history: list[dict], fraction: float, aim: float, tol: float) -> float:
    """``asked``, kept inside the bracket the rounds so far have found: between the largest
    budget asked that measured below the band ``[fraction * (1 - tol), fraction]`` and the
    smallest that measured above it (interpolated in that bracket, its middle when the
    interpolation falls outside), so that a correction never repeats an overshoot."""
    below = [h for h in history if h["measured"] < fraction * (1 - tol)]
    above = [h for h in history if h["measured"] > fraction]
    if not below or not above:
        return asked
    lo = max(below, key=lambda h: h["asked"])
    hi = min(above, key=lambda h: h["asked"])
    if not lo["asked"] < hi["asked"]:
        return asked  # measurements out of order (noise): leave the secant's choice
    if lo["asked"] < asked < hi["asked"]:
        return asked
    (a0, m0), (a1, m1) = (lo["asked"], lo["measured"]), (hi["asked"], hi["measured"])
    inside = a0 + (aim - m0) * (a1 - a0) / (m1 - m0)
    return inside if a0 < inside < a1 else (a0 + a1) / 2


def measure_widths(model: nn.Module, graph, input_size) -> Callable[[dict | None], float]:
    """Median ms of ``model`` (``None``) or of a copy pruned to the given widths, at
    ``input_size`` on the model's device and thread count (at least 0.5 s of runs)."""

    def measure(widths: dict | None) -> float:
        if widths is None:
            return measure_latency(
                model, input_size, warmup=3, repeats=10, min_time_s=0.5
            ).median_ms
        return _pruned_ms(model, graph, widths, input_size, min_time_s=0.5)

    return measure


def compare_widths(model: nn.Module, graph, input_size, min_time_s: float = 1.0) -> Compare:
    """``compare`` for :func:`meet_latency` and :func:`faster_widths`: ``compare(a, b)`` times
    ``model`` (widths ``None``) or copies pruned to widths ``a`` and ``b`` with
    :func:`interleaved_ms` and returns ``(median ms of a, median ms of b, ratio)``, the ratio
    the median of ``b / a`` over adjacent turns (:func:`compare_models`)."""

    def build(widths):
        return model if widths is None else _pruned_copy(model, graph, widths, input_size)

    def compare(a: dict | None, b: dict | None) -> tuple[float, float, float]:
        return compare_models(build(a), build(b), input_size, min_time_s=min_time_s)

    return compare


def compare_models(a: nn.Module, b: nn.Module, input_size, **timing) -> tuple[float, float, float]:
    """``(median ms of a, median ms of b, ratio)`` of two models timed in turns by
    :func:`interleaved_ms` on one input of ``input_size`` = (batch, channels, *spatial), batch
    included (``timing``: its keyword arguments), the ratio the median of ``b / a`` over
    adjacent turns."""
    ta, tb = interleaved_ms([a, b], input_size, **timing)
    ratio = float(np.median(np.asarray(tb) / np.asarray(ta)))
    return float(np.median(ta)), float(np.median(tb)), ratio


def _pruned_copy(model: nn.Module, graph, widths: dict[str, int], input_size) -> nn.Module:
    """A copy of ``model`` with every group cut to ``widths`` (its first channels)."""
    from .prune import apply

    return apply(model, first_channels_plan(graph, widths, input_size), verify=False)


def interleaved_ms(
    models: Sequence[nn.Module], input_size, *, min_time_s: float = 1.0, warmup: int = 3,
    repeats: int = 10, block_ms: float = 20.0,
) -> list[list[float]]:  # fmt: skip
    """Ms per run of ``models`` timed in turn (A, B, A, B, ...) on one input of ``input_size`` =
    (batch, channels, *spatial), batch included, on the first model's device, in eval and inference mode, after ``warmup`` untimed runs of each,
    until each has had ``repeats`` turns and all turns together last ``min_time_s`` seconds.

    A turn times one run, or, for a model whose run is shorter than ``block_ms``, one untimed run
    (the caches warm again after the other model's turn) and then ``k`` runs timed together and
    divided by ``k``, the least ``k`` for which they fill ``block_ms``: run by run, ResNet-56 at
    batch 1 read 6-13 % slower than timed alone. One list of times per model, in order:
    ``times[1][i] / times[0][i]`` compares two turns a few milliseconds apart, so a machine
    slowing down or speeding up (a neighbour's job, frequency scaling) weighs on both alike,
    where two medians taken one after the other can differ by 10-20 % on a shared VM."""
    size = check_input_size(input_size)
    dev, dtype = device_dtype(models[0])
    x = _make_input(size, dev, dtype, None)
    timer = _TIMERS.get(dev.type, _cpu_timer)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        turns = []
        for m in models:
            stack.enter_context(eval_mode(m))
            run = functools.partial(m, x)
            for _ in range(warmup):
                run()
            one = max(timer(run), 1e-6)
            k = 1 if one >= block_ms else math.ceil(block_ms / one)
            turns.append((run, k))
        spent = 0.0
        while len(times[0]) < repeats or spent < min_time_s * 1e3:
            for t, (run, k) in zip(times, turns):
                if k > 1:
                    run()  # untimed: warms the caches after the other model's turn
                ms = timer(functools.partial(_repeat, run, k))
                spent += ms
                t.append(ms / k)
    return times


def _repeat(run: Callable[[], object], k: int) -> None:
    """``run()`` ``k`` times (one timed sample of ``k`` runs)."""
    for _ in range(k):
        run()


def _channels(module: nn.Module) -> tuple[int, int]:
    """(output, input) channels of a conv or linear layer."""
    out_c = getattr(module, "out_channels", getattr(module, "out_features", 0))
    return out_c, getattr(module, "in_channels", getattr(module, "in_features", 0))


def _group_widths(group, channels: int) -> list[int]:
    """Widths a group is timed at: the top ``_FINE`` steps, then a coarse grid down to one step."""
    step = group.step
    fine = {channels - i * step for i in range(_FINE) if channels - i * step >= step}
    grid = max(step, (channels // 16) // step * step)
    return sorted(fine | set(range(step, channels + 1, grid)) | {channels})


def measure_table(
    model: nn.Module,
    graph,
    input_size,
    *,
    time_layer: Callable[[nn.Module, tuple, int, int], float] | None = None,
    base_ms: float | None = None,
) -> LatencyTable:
    """Time every conv/linear layer of every group at the group's candidate widths.

    Args:
        model: the unpruned model, on the device (and with the threads) to measure on.
        graph: its :func:`chip.groups.find_groups` result.
        input_size: (batch, C, H, W) the latency is for.
        time_layer: ms of one layer at (output, input) channels on an input shaped like the
            given one (default: :func:`_layer_time`, real timing; tests pass a fake).
        base_ms: the whole model's latency (default: the mean of two :func:`measure_latency`
            runs of it, either side of the half-width model that fits the other operations'
            slope; with a ``time_layer`` given, the sum of its times of every conv/linear
            layer).
    """
    _check_timeable(device_dtype(model)[0])
    if base_ms is None and time_layer is not None:
        base_ms = -1.0  # summed below, once the layers' input shapes are known
    time_layer = time_layer or _layer_time
    shapes: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}

    outputs: dict[str, int] = {}

    def record(module, inputs):
        shapes.setdefault(names[module], tuple(inputs[0].shape))

    def record_out(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs.setdefault(names[module], output.numel())

    layers = [m for m in model.modules() if isinstance(m, _TIMED)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    handles += [m.register_forward_hook(record_out) for m in layers]
    try:
        dev, dtype = device_dtype(model)
        with torch.inference_mode(), eval_mode(model):
            model(_make_input(check_input_size(input_size), dev, dtype, None))
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    table: dict[str, dict] = {}
    steps = {}
    for g in graph:
        widths = _group_widths(g, g.channels)
        total = dict.fromkeys(widths, 0.0)
        writes = {m.name for m in g.members if m.kind == "out"}
        for member in g.members:
            module = modules.get(member.name)
            if member.name not in shapes or not isinstance(module, _TIMED):
                continue
            if getattr(module, "transposed", False):  # its time stays with the rest
                continue
            if member.kind == "in" and member.name in writes:  # a depthwise conv: its "out"
                continue  # side already narrows both of its sides
            out_c, in_c = _channels(module)
            per = member.index.shape[1]  # a flatten spreads a channel over `per` features
            layer = table.setdefault(member.name, {"ms": None, "sides": []})
            curve = []
            for w in widths:
                removed = (g.channels - w) * per
                if member.kind == "out":
                    depthwise = getattr(module, "groups", 1) == in_c == out_c
                    args = (out_c - removed, in_c - removed if depthwise else in_c)
                else:
                    args = (out_c, in_c - removed)
                ms = time_layer(module, shapes[member.name], *args)
                curve.append([w, ms])
                total[w] += ms
            layer["ms"] = curve[-1][1]  # the whole width is measured last
            layer["sides"].append([g.name, curve])
        steps[g.name] = detect_step(widths, [total[w] for w in widths], g.channels, g.step)
    rest = {}
    if base_ms is None:
        half = {g.name: g.width(max(1, g.channels // 2)) for g in graph}
        weights = {
            g.name: [sum(outputs.get(m.name, 0) for m in g.members if m.kind == "out"), g.channels]
            for g in graph
        }
        rest = {"half_widths": half, "weights": weights}
        measure = measure_widths(model, graph, input_size)
        before = measure(None)  # A-B-A: the whole model either side of the half-width one
        rest["half_ms"] = measure(half)
        base_ms = (before + measure(None)) / 2
        rest["a_half"] = LatencyTable(base_ms, {}, {}, {}, rest)._kept_activations(half)
        if not rest["a_half"] < 0.95:  # too little of the activations narrowed to fit a slope
            rest = {}
    elif base_ms == -1.0:
        base_ms = sum(
            time_layer(m, shapes[n], *_channels(m)) for n, m in modules.items() if n in shapes
        )
    key = {
        "input_size": list(input_size),
        "device": str(device_dtype(model)[0]),
        "hardware": _hardware(device_dtype(model)[0]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return LatencyTable(base_ms, table, steps, key, rest)


def _hardware(device: torch.device) -> str:
    """The GPU's or CPU's model name (a cache shared between machines must not mix them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def table_key(model: nn.Module, input_size, time_layer=None) -> dict:
    """What a :class:`LatencyTable` is valid for: the model's layer shapes, the input size with
    its batch, the device, the thread count, the torch version (and a non-default timer), and
    ``_TABLE_FORMAT``: how chip measures and reads a table (a change measures again)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
    return {
        "model": h.hexdigest()[:24],
        "input_size": [int(n) for n in input_size],
        "device": str(device_dtype(model)[0]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timer": getattr(time_layer, "__qualname__", "default"),
        "format": _TABLE_FORMAT,
    }


def latency_table(model: nn.Module, graph, input_size, *, time_layer=None) -> LatencyTable:
    """:func:`measure_table`, cached on disk (``chip.allocation.cache_dir()``) under
    :func:`table_key`: a table measured once is reused until one of its keys changes."""
    from .allocation import cache_dir
    from .utils import atomic_write

    key = table_key(model, input_size, time_layer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"latency-{digest}.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            return LatencyTable(d["base_ms"], d["layers"], d["steps"], d["key"], d["rest"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            pass  # measured again and rewritten
    table = measure_table(model, graph, input_size, time_layer=time_layer)
    table.key = key
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(table.to_dict(), f)
    return table
