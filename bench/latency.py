"""Measured inference latency of pruned vs unpruned models: does the MAC cut show up as speed?

Models: ``resnet56`` (chip zoo, CIFAR, 32x32), ``resnet50`` (chip zoo, torchvision's layout,
``--image-size``, default 224) and torchvision ``mobilenet_v3_large`` (same size). For each batch
size (1 and ``--batch``, default 64) every model is pruned four ways, with chip's latency table
measured at that batch on this machine (``chip.latency.latency_table``, cached):

* ``unpruned``, and ``unpruned, second copy``: a fresh copy of it, whose measured ratio (ideally
  1) is the error of the measurement itself;
* ``flops=0.5`` with ``round_to=1`` and with ``round_to=auto`` (per group, the channel step at
  which the measured time drops);
* ``latency=0.5``: keep half of the measured latency;
* ``fewest channels``: every group at the fewest channels chip allows (no plan): the share of the
  latency that width pruning cannot remove (per-op overhead, un-prunable layers). If the rest
  shrank with the MACs, ``flops=0.5`` could not measure below ``(floor + 1) / 2``.

Channels are chosen by RANDOM scores: which channels are kept does not change the shapes, so the
latency is the same as with CHIP scores. In each of ``--rounds`` rounds every model is timed
in turn with its unpruned model (:func:`chip.latency.interleaved_ms`: ``torch.inference_mode``,
eval mode, warm-up runs, then at least ``--repeats`` turns each and ``--min-time`` seconds in
all, a short run repeated to fill 20 ms per turn), the order of the models reversed every other
round; a latency ratio is the median over the rounds of the median ratio of adjacent turns (the
machine's drift cancels), a latency the median over the rounds of the median turn. Targets:
with ``round_to=auto`` the latency ratio is at most 1.1 x the MACs ratio; ``latency=0.5`` is met within 5 % either way
(0.475 <= ratio <= 0.525: a plan far below the budget has thrown away channels it could keep).
The prediction error of chip's table is printed for every pruned row; a ``round_to=auto`` row
says which plan chip kept after timing it against the plan ``round_to=1`` gives (``kept: auto``
or ``step 1``).

    python bench/latency.py                          # full run
    python bench/latency.py --quick --threads 1      # a quick look (fewer repeats, 112x112)
    python bench/latency.py --models resnet56 --json out.json
    bash bench/gpu.sh --latency                      # the same on CUDA (--device cuda)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

import torch
import torchvision

import chip.models as M
from chip.counting import count
from chip.errors import ChipError
from chip.groups import find_groups
from chip.latency import compare_models, first_channels_plan
from chip.planning import plan
from chip.prune import apply

AUTO_FACTOR = 1.1  # round_to=auto: latency ratio <= AUTO_FACTOR * MACs ratio
LATENCY_SLACK = 1.05  # latency=F: achieved ratio within F * (1 +- (LATENCY_SLACK - 1))
BUILDERS = {
    "resnet56": lambda: M.create("resnet56"),
    "resnet50": lambda: M.create("resnet50"),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(weights=None),
}


@dataclass(frozen=True)
class Variant:
    """One row: a model pruned with ``target`` (None: unpruned) and ``round_to``."""

    arch: str
    target: str | None = None
    round_to: int | str = 1

    @property
    def label(self) -> str:
        if self.target is None:
            return "unpruned"
        return self.target + (f" round_to={self.round_to}" if self.round_to != 1 else "")


FEWEST = "fewest channels"
COPY = "unpruned, second copy"  # the measurement's own error: its ratio should be 1
PLANS = [(None, 1), (COPY, 1), ("flops=0.5", 1), ("flops=0.5", "auto"), ("latency=0.5", 1),
         (FEWEST, 1)]  # fmt: skip


def build(variant: Variant, size: int, batch: int, device: str = "cpu", seed: int = 0):
    """(model pruned by ``variant`` with random scores, planned and timed on ``device``; plan
    or None)."""
    model = BUILDERS[variant.arch]().eval().to(device)
    if variant.target in (None, COPY):  # the copy: a second fresh unpruned model
        return model, None
    input_size = (1, 3, size, size)
    graph = find_groups(model, torch.zeros(input_size, device=device))
    if variant.target == FEWEST:
        fewest = first_channels_plan(graph, {g.name: g.width(1) for g in graph}, input_size)
        return apply(model, fewest, inplace=True, graph=graph), None
    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in graph}
    p = plan(model, scores, variant.target, round_to=variant.round_to, input_size=input_size,
             graph=graph, latency_batch=batch)  # fmt: skip
    return apply(model, p, inplace=True, graph=graph), p


def time_models(
    models: dict[Variant, torch.nn.Module],
    sizes: dict[str, int],
    batch: int,
    rounds: int,
    warmup: int,
    repeats: int,
    min_time_s: float,
) -> dict[Variant, tuple[float, float]]:
    """Per variant, (latency in ms, ratio to its unpruned model), each the median over ``rounds``
    rounds. In a round every other model is timed in turn with its architecture's unpruned model
    (:func:`chip.latency.compare_models`: adjacent turns a few ms apart, the ratio the median of
    the turns' ratios, so the machine's drift cancels), the order reversed every other round."""
    ms: dict[Variant, list[float]] = {v: [] for v in models}
    ratios: dict[Variant, list[float]] = {v: [] for v in models}
    for r in range(rounds):
        for v in [v for v in models if v.target is not None][:: 1 if r % 2 == 0 else -1]:
            base, size = Variant(v.arch), sizes[v.arch]
            base_ms, v_ms, ratio = compare_models(models[base], models[v], (batch, 3, size, size),
                                                  min_time_s=min_time_s, warmup=warmup,
                                                  repeats=repeats)  # fmt: skip
            ms[base].append(base_ms)
            ms[v].append(v_ms)
            ratios[v].append(ratio)
            print(
                f"  round {r + 1}/{rounds} batch {batch:3d} {v.arch:9s} {v.label:28s} "
                f"{ms[v][-1]:10.2f} ms, ratio {ratios[v][-1]:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return {
        v: (statistics.median(ms[v]), statistics.median(ratios[v]) if ratios[v] else 1.0)
        for v in models
    }


def table(rows: list[dict]) -> str:
    """Plain-text table of the measured rows."""
    head = (
        f"{'model':18s} {'batch':>5s} {'plan':26s} {'MACs ratio':>10s} {'ms':>9s} "
        f"{'lat ratio':>9s} {'lat/MACs':>8s} {'pred err':>8s}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        per_mac = (
            "-" if r["plan"] in (FEWEST, COPY) else f"{r['latency_ratio'] / r['macs_ratio']:.3f}"
        )
        extra = (
            f"{r['latency_ratio']:9.3f} {per_mac:>8s} "
            f"{_percent(r['prediction_error']):>8s}  {r['target']}"
            + (f" (kept: {r['kept']})" if r.get("kept") else "")
            if r["pruned"]
            else f"{'-':>9s} {'-':>8s} {'-':>8s}  -"
        )
        lines.append(
            f"{r['model']:18s} {r['batch']:5d} {r['plan']:26s} {r['macs_ratio']:10.3f} "
            f"{r['latency_ms']:9.2f} {extra}"
        )
    return "\n".join(lines)


def _percent(x: float) -> str:
    return f"{x:+.1%}" if x == x else "-"  # NaN: no latency table behind the plan


def _verdict(v: Variant, macs_ratio: float, ratio: float) -> str:
    if v.round_to == "auto":
        return "PASS" if ratio <= AUTO_FACTOR * macs_ratio else "FAIL"
    if v.target and v.target.startswith("latency="):  # within 5 % either way: no over-pruning
        f = float(v.target.split("=")[1])
        return "PASS" if abs(ratio - f) <= f * (LATENCY_SLACK - 1) else "FAIL"
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds/repeats, 112x112 inputs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=64, help="the large batch size (default 64)")
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--image-size", type=int, default=None, help="ImageNet models' input side")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="turns per model and round (default 10)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per round (default 3)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="timed seconds per pair of models and round, at least (default 1)")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--device", default="cpu", help="where to plan and time (cpu, cuda)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("latency.py: CUDA is not available (--device cpu times on the CPU)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    quick = args.quick
    big = args.image_size or (112 if quick else 224)
    sizes = {a: 32 if a == "resnet56" else big for a in args.models}
    rounds = args.rounds or (1 if quick else 3)
    repeats = args.repeats or (3 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    min_time = args.min_time if args.min_time is not None else (0.0 if quick else 1.0)
    rows = []
    for batch in (1, args.batch):
        variants = [Variant(a, t, r) for a in args.models for t, r in PLANS]
        built = {}
        for v in list(variants):
            try:
                built[v] = build(v, sizes[v.arch], batch, args.device)
            except ChipError as e:  # e.g. a latency budget the fewest channels cannot reach
                print(f"batch {batch} {v.arch} {v.label}: not planned: {e}", file=sys.stderr)
                variants.remove(v)
        models = {v: m for v, (m, _) in built.items()}
        lat = time_models(models, sizes, batch, rounds, warmup, repeats, min_time)
        for v in variants:
            base = Variant(v.arch)
            size = (1, 3, sizes[v.arch], sizes[v.arch])
            macs_ratio = count(models[v], size).macs / count(models[base], size).macs
            ratio = lat[v][1]
            p = built[v][1]
            pruned = v.target is not None
            pred = p.stats.get("latency") if p is not None else None
            predicted = pred["predicted_ms"] / pred["base_ms"] if pred else float("nan")
            rows.append(
                dict(
                    model=v.arch,
                    input=f"{sizes[v.arch]}x{sizes[v.arch]}",
                    plan=v.label,
                    batch=batch,
                    pruned=pruned,
                    macs_ratio=macs_ratio,
                    latency_ms=lat[v][0],
                    latency_ratio=ratio,
                    predicted_ratio=predicted,
                    prediction_error=(predicted - ratio) / ratio,
                    target=_verdict(v, macs_ratio, ratio),
                    kept=(pred or {}).get("round_to_check", {}).get("kept"),
                    latency_rounds=(pred or {}).get("rounds"),  # chip's asked -> measured
                )  # fmt: skip
            )
    print(
        f"torch {torch.__version__}, {where}; scores random; "
        f"{rounds} rounds x {repeats} turns, at least {min_time:g} s (warm-up {warmup}); "
        f"ratios = median over rounds of the median ratio of adjacent turns, latencies = "
        f"median of round medians; MACs = conv+linear, batch 1; targets: round_to=auto latency "
        f"ratio <= {AUTO_FACTOR} x MACs ratio; latency=F achieved within {LATENCY_SLACK - 1:.0%} of F"
    )
    print(table(rows))
    if args.json:
        from chip.utils import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
