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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from chip.counting import check_input_size, on_device
from chip.errors import ChipError
from chip.utils import AMP_DTYPES, device_dtype, eval_mode

__all__ = ["LatencyResult", "measure_latency"]

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
