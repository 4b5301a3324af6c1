"""Is the calibration set large enough? Score disjoint halves (thirds, ...) and compare.

The paper claims a few batches suffice to rank channels. :func:`stability` tests that claim on the
user's own model and data: the calibration batches are split into ``k`` disjoint subsets (batch
``i`` goes to subset ``i % k``), each subset is scored on its own (one group graph shared by all)
and, per group, every pair of subsets is compared by

* the Spearman rank correlation of their score vectors (average ranks for ties; ``nan`` when a
  vector is constant), and
* the overlap ``|A ∩ B| / n`` of the kept sets at ``rate`` (``n`` = kept width, the sets being the
  top-``n`` channels by each subset's scores, chosen exactly as :func:`chip.plan` chooses them).

High correlation and overlap mean the kept channels would not change with other calibration
images; low values mean more batches are needed. Subset ``j`` is scored with seed ``seed + j``
(this matters only for the ``random`` criterion, whose subsets are then independent draws: the
expected correlation is 0, a floor to read the others against).

The batches are held in memory while the subsets are scored (5 x 128 CIFAR images: 8 MB).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from .calibration import split_batch
from .criteria import get_criterion, score
from .errors import ChipError
from .groups import find_groups
from .planning import kept_width
from .utils import atomic_write, device_dtype

__all__ = ["GroupStability", "StabilityReport", "average_ranks", "spearman", "stability"]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    x = torch.as_tensor(x).detach().to(torch.float64).flatten().cpu()
    order = torch.argsort(x, stable=True)
    _, counts = torch.unique_consecutive(x[order], return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each run's last element
    run_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = torch.repeat_interleave(run_rank, counts)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson on average ranks); ``nan`` if either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.numel() != rb.numel():
        raise ChipError(
            f"spearman needs vectors of equal length, got {ra.numel()} and {rb.numel()}"
        )
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


@dataclass
class GroupStability:
    """Pairwise agreement of one group's scores across the subsets."""

    name: str
    channels: int
    kept: int
    spearman_mean: float
    spearman_min: float
    overlap_mean: float
    overlap_min: float


@dataclass
class StabilityReport:
    """Per-group agreement between ``k`` disjoint calibration subsets (see the module docstring)."""

    k: int
    rate: float
    criterion: str
    batches_per_subset: list[int]
    samples_per_subset: list[int]
    groups: list[GroupStability] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Means over groups (nan correlations left out) and the worst group's values."""
        rho = [g.spearman_mean for g in self.groups if not math.isnan(g.spearman_mean)]
        rho_min = [g.spearman_min for g in self.groups if not math.isnan(g.spearman_min)]
        return {
            "spearman_mean": sum(rho) / len(rho) if rho else float("nan"),
            "spearman_min": min(rho_min) if rho_min else float("nan"),
            "overlap_mean": sum(g.overlap_mean for g in self.groups) / max(1, len(self.groups)),
            "overlap_min": min((g.overlap_min for g in self.groups), default=float("nan")),
        }

    def to_dict(self) -> dict:
        """Plain JSON-ready data (``nan`` becomes ``None``)."""

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        d = asdict(self)
        d["groups"] = [{k: clean(v) for k, v in g.items()} for g in d["groups"]]
        d["summary"] = {k: clean(v) for k, v in self.summary().items()}
        return d

    def save(self, path) -> None:
        """Write :meth:`to_dict` as JSON (atomically)."""
        with atomic_write(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """A plain-text table, one row per group plus a summary row."""
        width = max([len("group")] + [len(g.name) for g in self.groups])
        head = f"{'group':<{width}}  channels  kept  spearman(mean/min)  overlap(mean/min)"
        lines = [
            f"stability: {self.k} disjoint subsets of {self.batches_per_subset} batches "
            f"({self.samples_per_subset} images), criterion {self.criterion}, rate {self.rate}",
            head,
        ]
        for g in self.groups:
            lines.append(
                f"{g.name:<{width}}  {g.channels:>8}  {g.kept:>4}  "
                f"{g.spearman_mean:>8.3f}/{g.spearman_min:<8.3f}  "
                f"{g.overlap_mean:>7.3f}/{g.overlap_min:<7.3f}"
            )
        s = self.summary()
        lines.append(
            f"{'all groups':<{width}}  {'':>8}  {'':>4}  "
            f"{s['spearman_mean']:>8.3f}/{s['spearman_min']:<8.3f}  "
            f"{s['overlap_mean']:>7.3f}/{s['overlap_min']:<7.3f}"
        )
        return "\n".join(lines)


def _collect(loader: Iterable, num_batches: int) -> list[torch.Tensor]:
    batches = []
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        batches.append(split_batch(batch))
    return batches


def _overlap(group, a: torch.Tensor, b: torch.Tensor, kept: int) -> float:
    """Share of the ``kept`` channels both score vectors keep (under the group's rules)."""
    return len(set(group.choose(a, kept)) & set(group.choose(b, kept))) / kept


def stability(
    model: nn.Module,
    loader: Iterable,
    k: int = 2,
    *,
    num_batches: int = 5,
    rate: float = 0.5,
    criterion: str = "chip",
    seed: int = 0,
    device=None,
    progress: bool = False,
) -> StabilityReport:
    """Split the first ``num_batches`` batches of ``loader`` into ``k`` subsets and compare scores.

    Raises :class:`ChipError` unless ``2 <= k <= `` the number of batches the loader yields (at
    most ``num_batches``) and ``0 <= rate < 1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ChipError(f"stability needs k >= 2 subsets, got {k!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ChipError(f"stability rate must be in [0, 1), got {rate}")
    get_criterion(criterion)
    if num_batches < k:
        raise ChipError(f"stability needs at least k={k} batches, got num_batches={num_batches}")
    batches = _collect(loader, num_batches)
    if len(batches) < k:
        raise ChipError(
            f"stability needs at least k={k} batches but the loader yielded "
            f"{len(batches)}; expected k <= number of calibration batches"
        )
    subsets = [batches[j::k] for j in range(k)]
    device_, dtype = device_dtype(model)
    graph = find_groups(model, batches[0][:2].to(device=device_, dtype=dtype), check=False)
    scores = [
        score(
            model,
            subset,
            criterion,
            num_batches=len(subset),
            seed=seed + j,
            device=device,
            graph=graph,
            progress=progress,
        )
        for j, subset in enumerate(subsets)
    ]
    report = StabilityReport(
        k=k,
        rate=float(rate),
        criterion=criterion,
        batches_per_subset=[len(s) for s in subsets],
        samples_per_subset=[sum(int(b.shape[0]) for b in s) for s in subsets],
    )
    for g in graph:
        vecs = [s.groups[g.name] for s in scores]
        kept = kept_width(g, float(rate), 1)
        rho = [spearman(a, b) for a, b in itertools.combinations(vecs, 2)]
        over = [_overlap(g, a, b, kept) for a, b in itertools.combinations(vecs, 2)]
        finite = [r for r in rho if not math.isnan(r)]
        report.groups.append(
            GroupStability(
                name=g.name,
                channels=g.channels,
                kept=kept,
                spearman_mean=sum(finite) / len(finite) if finite else float("nan"),
                spearman_min=min(finite) if finite else float("nan"),
                overlap_mean=sum(over) / len(over),
                overlap_min=min(over),
            )
        )
    return report
