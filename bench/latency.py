"""Measured inference latency of pruned vs unpruned models: does the MAC cut show up as speed?

Models (chip zoo; ``resnet50`` has torchvision's layout):

* ``resnet56`` (CIFAR, 32x32): unpruned and the paper's ``[0.]+[0.15]*2+[0.4]*27`` plan;
* ``resnet50`` (ImageNet, ``--image-size``, default 224): unpruned, a ``flops=0.5`` budget, and the
  same budget with ``round_to=8`` (hardware-friendly widths).

Channels are chosen by RANDOM scores: which channels are kept does not change the shapes, so the
latency is the same as with CHIP scores. Every model is timed with :func:`chip.measure_latency`
(``torch.inference_mode``, eval mode, warm-up runs, median of the timed runs) at batch 1 and at
``--batch`` (default 64). To damp drift on a shared machine the models are timed in interleaved
rounds and each latency is the median of the per-round medians.

The target checked per pruned row: at the large batch, ``latency ratio <= 1.3 * MACs ratio``
(pruned / unpruned), i.e. the measured speed-up is at least ~77 % of the MAC reduction.

    python bench/latency.py                          # full run
    python bench/latency.py --quick --threads 1      # a quick look (fewer repeats, 112x112)
    python bench/latency.py --image-size 112 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

import torch

import chip.models as M
from chip.counting import count
from chip.groups import find_groups
from chip.latency import measure_latency
from chip.planning import plan
from chip.prune import apply

TARGET_FACTOR = 1.3  # latency ratio must be <= TARGET_FACTOR * MACs ratio at the large batch


@dataclass(frozen=True)
class Variant:
    """One row of the table: a zoo model, pruned with ``target`` (None: unpruned)."""

    arch: str
    target: str | None = None
    round_to: int = 1

    @property
    def label(self) -> str:
        if self.target is None:
            return "unpruned"
        return self.target + (f" round_to={self.round_to}" if self.round_to > 1 else "")


VARIANTS = [
    Variant("resnet56"),
    Variant("resnet56", "[0.]+[0.15]*2+[0.4]*27"),
    Variant("resnet50"),
    Variant("resnet50", "flops=0.5"),
    Variant("resnet50", "flops=0.5", round_to=8),
]


def build(variant: Variant, size: int, seed: int = 0) -> torch.nn.Module:
    """The zoo model, pruned by ``variant`` with random scores (seeded)."""
    model = M.create(variant.arch).eval()
    if variant.target is None:
        return model
    input_size = (1, 3, size, size)
    graph = find_groups(model, torch.zeros(input_size))
    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in graph}
    p = plan(
        model, scores, variant.target, round_to=variant.round_to, input_size=input_size, graph=graph
    )
    return apply(model, p, inplace=True, graph=graph)


def time_models(
    models: dict[Variant, torch.nn.Module],
    sizes: dict[str, int],
    batch: int,
    rounds: int,
    warmup: int,
    repeats: int,
) -> dict[Variant, float]:
    """Median over ``rounds`` interleaved rounds of each model's median latency (ms)."""
    per_round: dict[Variant, list[float]] = {v: [] for v in models}
    for r in range(rounds):
        for v, model in models.items():
            size = sizes[v.arch]
            res = measure_latency(model, (batch, 3, size, size), warmup=warmup, repeats=repeats)
            per_round[v].append(res.median_ms)
            print(
                f"  round {r + 1}/{rounds} batch {batch:3d} {v.arch:9s} {v.label:28s} "
                f"{res.median_ms:10.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    return {v: statistics.median(ts) for v, ts in per_round.items()}


def table(rows: list[dict], batch: int) -> str:
    """Plain-text table of the measured rows."""
    head = (
        f"{'model':9s} {'input':>7s} {'plan':28s} {'params':>11s} {'MACs':>14s} "
        f"{'MACs ratio':>10s} {'b1 ms':>9s} {f'b{batch} ms':>10s} {'lat b1':>7s} "
        f"{f'lat b{batch}':>8s}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = (
            f"{r['latency_ratio_b1']:7.3f} {r['latency_ratio_big']:8.3f}  "
            f"{'PASS' if r['pass'] else 'FAIL'}"
            if r["pruned"]
            else f"{'-':>7s} {'-':>8s}  -"
        )
        lines.append(
            f"{r['model']:9s} {r['input']:>7s} {r['plan']:28s} {r['params']:11,d} {r['macs']:14,d} "
            f"{r['macs_ratio']:10.3f} {r['latency_b1_ms']:9.2f} {r['latency_big_ms']:10.2f} {ratios}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds/repeats and 112x112 ResNet-50 inputs (a rough look)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice)",
    )
    ap.add_argument("--batch", type=int, default=64, help="the large batch size (default 64)")
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="ResNet-50 input side (default 224; 112 with --quick)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per round (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per round (default 3)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    sizes = {"resnet56": 32, "resnet50": args.image_size or (112 if quick else 224)}
    rounds = args.rounds or (1 if quick else 3)
    repeats = args.repeats or (3 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)

    models = {v: build(v, sizes[v.arch]) for v in VARIANTS}
    counts = {v: count(m, (1, 3, sizes[v.arch], sizes[v.arch])) for v, m in models.items()}
    lat1 = time_models(models, sizes, 1, rounds, warmup, repeats)
    lat_big = time_models(models, sizes, args.batch, rounds, max(1, warmup // 2), repeats)

    rows = []
    for v in VARIANTS:
        base = Variant(v.arch)
        macs_ratio = counts[v].macs / counts[base].macs
        ratio1, ratio_big = lat1[v] / lat1[base], lat_big[v] / lat_big[base]
        rows.append(
            dict(
                model=v.arch,
                input=f"{sizes[v.arch]}x{sizes[v.arch]}",
                plan=v.label,
                pruned=v.target is not None,
                params=counts[v].params,
                macs=counts[v].macs,
                macs_ratio=macs_ratio,
                latency_b1_ms=lat1[v],
                latency_big_ms=lat_big[v],
                batch=args.batch,
                latency_ratio_b1=ratio1,
                latency_ratio_big=ratio_big,
                **{"pass": ratio_big <= TARGET_FACTOR * macs_ratio},
            )
        )
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; scores random; "
        f"{rounds} rounds x {repeats} runs (warm-up {warmup}); latencies = median of round "
        f"medians; MACs = conv+linear, batch 1; target: latency ratio at batch {args.batch} "
        f"<= {TARGET_FACTOR} x MACs ratio"
    )
    print(table(rows, args.batch))
    if args.json:
        from chip.utils import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
