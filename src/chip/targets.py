"""Pruning targets as text and data, parsed without torch (``chip.config`` validates with them).

A target is one of (``docs/method.md`` section 3)

* a sparsity string of the reference code, ``term ('+' term)*`` with term ``[rate]`` or
  ``[rate]*count``, e.g. ``"[0.]+[0.15]*2+[0.4]*27"`` (a zoo architecture gives each position its
  groups);
* a uniform rate ``0.3`` (the fraction of every group's channels removed);
* a per-layer mapping ``{"layer1.0.conv1": 0.5, ...}``;
* a budget ``"flops=0.5"`` / ``"macs=0.5"`` / ``"params=0.6"`` (the fraction of the unpruned model's
  count to keep).

:func:`parse_target` classifies one; :func:`parse_sparsity` reads a sparsity string into rates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ChipError

__all__ = ["ALLOCATIONS", "describe", "parse_sparsity", "parse_target"]

# how a budget is spread over the groups (chip.allocation has the solvers)
ALLOCATIONS = ("uniform", "global", "sensitivity")

_TERM = re.compile(r"\s*\[\s*(?P<rate>[^\]]*?)\s*\]\s*(?:\*\s*(?P<count>[^+\s]*)\s*)?")
_RATE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_PLUS = re.compile(r"(?<![eE])\+")  # term separator; not the sign of an exponent (1e+0)
_MAX_RATES = 10_000  # far above any architecture; stops '[0.1]*99999999999' from allocating
_FORM = "expected terms like [0.4] or [0.4]*27 joined by '+', rates in [0, 1)"


def parse_sparsity(text: str) -> list[float]:
    """Parse ``term ('+' term)*`` (term = ``[rate]`` or ``[rate]*count``) into a list of rates."""
    if not isinstance(text, str) or not text.strip():
        raise ChipError(f"empty sparsity string; {_FORM}")
    rates: list[float] = []
    for i, part in enumerate(_PLUS.split(text)):
        m = _TERM.fullmatch(part)
        if m is None:
            raise ChipError(f"cannot parse sparsity term {i + 1} {part.strip()!r}; {_FORM}")
        raw_rate, raw_count = m.group("rate"), m.group("count")
        if not _RATE.fullmatch(raw_rate):
            raise ChipError(f"bad rate {raw_rate!r} in sparsity term {i + 1}; {_FORM}")
        rate = float(raw_rate)
        if not 0.0 <= rate < 1.0:
            raise ChipError(f"rate {rate} in sparsity term {i + 1} is outside [0, 1); {_FORM}")
        count = 1
        if raw_count is not None:
            if not raw_count.isdigit() or int(raw_count) < 1:
                raise ChipError(
                    f"bad repeat count {raw_count!r} in sparsity term {i + 1}; "
                    "expected a positive integer after '*'"
                )
            count = int(raw_count)
        if len(rates) + count > _MAX_RATES:
            raise ChipError(
                f"sparsity string is longer than {_MAX_RATES} rates (term {i + 1}); "
                "expected one rate per prunable position of the architecture"
            )
        rates.extend([rate] * count)
    return rates


_BUDGET = re.compile(r"\s*(flops|macs|params|latency)\s*=\s*(\S+)\s*")
# the paper's FLOPs are MACs; latency: of the unpruned model's, measured (chip.latency)
_BUDGET_KINDS = {"flops": "macs", "macs": "macs", "params": "params", "latency": "latency"}


def _budget(name: str, fraction) -> tuple[str, float]:
    """("macs" | "params", fraction) of a budget, checked."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = -1.0
    if isinstance(fraction, bool) or not 0.0 < value <= 1.0:
        raise ChipError(
            f"budget {name}={fraction!r}: expected a fraction of the baseline to keep in (0, 1]"
        )
    return _BUDGET_KINDS[name], value


def describe(target) -> str:
    """The text a plan records for ``target``: ``flops=0.5`` for a budget mapping, the string or
    number as given otherwise."""
    if isinstance(target, Mapping) and len(target) == 1 and set(target) <= set(_BUDGET_KINDS):
        ((name, fraction),) = target.items()
        return f"{name}={fraction}"
    return str(target)


def parse_target(target) -> tuple[str, Any]:
    """Classify a target: ("sparsity", str) | ("uniform", rate) | ("layers", dict) |
    ("budget", (kind, fraction))."""
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        rate = float(target)
        if not 0.0 <= rate < 1.0:
            raise ChipError(
                f"uniform rate {rate} is outside [0, 1); expected the fraction of channels to remove"
            )
        return "uniform", rate
    if isinstance(target, Mapping):
        keys = set(target)
        if keys and keys <= set(_BUDGET_KINDS):
            if len(keys) != 1:
                raise ChipError("give one budget (flops=, macs= or params=), not several")
            ((name, fraction),) = target.items()
            return "budget", _budget(name, fraction)
        return "layers", dict(target)
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("["):
            return "sparsity", text
        m = _BUDGET.fullmatch(text)
        if m:
            return "budget", _budget(m.group(1), m.group(2))
        try:
            return parse_target(float(text))
        except ValueError:
            pass
    raise ChipError(
        f"cannot understand target {target!r}; expected a sparsity string '[0.]+[0.4]*27', a rate like 0.3, "
        "a {layer: rate} mapping or a budget 'flops=0.5' / 'params=0.6'"
    )
