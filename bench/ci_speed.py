"""Per-sample speed and accuracy of chip's channel independence (CI), against its floor.

Two tables, on ReLU'd Gaussian feature maps (about half the entries zero, like real activations):

1. **Floor**: for every hook-point shape of the zoo models and torchvision ResNet-50 (found by
   running ``chip.calibrate`` on them with a recording criterion), chip vs the floor of exact CI:
   one float64 Gram product (``A A^T``, or ``A^T A`` when HW < C) and one ``torch.linalg.eigh``
   per sample, on maps already in float64 (chip gets the float32 maps calibrate hands it).
   Interleaved repeats, best of each. Target: chip / floor <= 1.3 at every shape. When HW < C a
   second floor adds the product ``A V`` (maps onto the eigenvectors, as large as the Gram
   product) that every channel's spectral weights need.
2. **Reference**: at six shapes, chip vs

   * oracle -- ``chip.ci.channel_independence_oracle`` (one float64 SVD per sample and channel);
   * ref    -- the CHIP reference code's algorithm, re-implemented faithfully: maps rounded to 4
     decimals, float32, and for every (sample i, channel j) a clone of the WHOLE batch,
     row (i, j) zeroed, and ``torch.norm(t[i], p='nuc')``.

   The slow methods are timed on a subset of samples (and, for C > 64, of channels) and
   extrapolated to a full sample; the output says which subset. Accuracy is
   ``max |chip - oracle| / max CI`` over that subset (``ref err``: the same for the reference).
   Targets: >= 50x faster than the reference at the CIFAR shapes, <= 100 ms per sample at the
   ImageNet shapes.

Usage::

    python bench/ci_speed.py [--quick] [--threads N] [--repeats R] [--seed S] [--only floor|ref]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from chip.ci import channel_independence, channel_independence_oracle

# the models whose hook-point shapes the floor table covers (input size: the model's own)
FLOOR_ARCHS = ("resnet56", "resnet110", "vgg16_bn", "resnet50", "torchvision:resnet50")
FLOOR_TARGET = 1.3


@dataclass(frozen=True)
class Case:
    """One benchmark shape and the target it is judged against."""

    shape: tuple[int, int, int, int]
    kind: str  # "cifar" or "imagenet"


CASES = [
    Case((128, 16, 32, 32), "cifar"),
    Case((128, 32, 16, 16), "cifar"),
    Case((128, 64, 8, 8), "cifar"),
    Case((16, 256, 56, 56), "imagenet"),
    Case((16, 512, 28, 28), "imagenet"),
    Case((16, 2048, 7, 7), "imagenet"),
]

# kind -> (description, predicate on a result row)
TARGETS = {
    "cifar": (">=50x vs ref", lambda row: row["vs_ref"] >= 50.0),
    "imagenet": ("<=100 ms/sample", lambda row: row["chip_ms"] <= 100.0),
}


def best_time(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls, in seconds."""
    return min(timed(fn)[0] for _ in range(repeats))


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU is summed over this process's threads."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def reference_ci(fmaps: np.ndarray, samples, channels) -> np.ndarray:
    """The reference algorithm, restricted to ``samples`` x ``channels`` (float32, 4 decimals)."""
    conv_output = torch.tensor(np.round(fmaps, 4))
    x = conv_output.reshape(conv_output.shape[0], conv_output.shape[1], -1)
    ci = np.zeros((len(samples), len(channels)), dtype=np.float32)
    for row, i in enumerate(samples):
        reduced = np.zeros(len(channels), dtype=np.float32)
        for col, j in enumerate(channels):
            t = x.clone()
            t[i, j, :] = 0
            reduced[col] = torch.norm(t[i], p="nuc").item()
        ci[row] = torch.norm(x[i], p="nuc").item() - reduced
    return ci


def per_sample_ms(run, n_samples: int, n_channels: int, channels: int, repeats: int) -> float:
    """Extrapolate the per-sample time of a per-(sample, channel) method from a subset.

    ``run(k)`` evaluates ``k`` channels of ``n_samples`` samples; the time with ``k = 0`` (the
    per-sample work: rounding, full nuclear norm) is measured separately and not scaled.
    """
    fixed = best_time(lambda: run(0), repeats)
    total = best_time(lambda: run(n_channels), repeats)
    per_channel = max(total - fixed, 0.0) / (n_samples * n_channels)
    return 1e3 * (fixed / n_samples + per_channel * channels)


def bench_case(case: Case, args) -> dict:
    """Time chip, the oracle and the reference on one shape; return one table row."""
    n, c, h, w = case.shape
    if args.quick:
        n = min(n, 16 if case.kind == "cifar" else 2)
    gen = torch.Generator().manual_seed(args.seed)
    fmaps = torch.randn(n, c, h, w, generator=gen).relu()
    sub_n = 1 if args.quick or case.kind == "imagenet" else 2
    sub_c = c if c <= 64 and not args.quick else min(c, args.channels)
    channels = np.linspace(0, c - 1, sub_c).round().astype(int).tolist()

    channel_independence(fmaps[:2])  # warm-up
    wall, cpu = min(timed(lambda: channel_independence(fmaps)) for _ in range(args.repeats))
    chip_ms, chip_cpu_ms = 1e3 * wall / n, 1e3 * cpu / n
    fast = channel_independence(fmaps[:sub_n])[:, channels]

    sub = fmaps[:sub_n]
    oracle_ms = per_sample_ms(
        lambda k: channel_independence_oracle(sub, channels[:k]), sub_n, sub_c, c, args.slow_repeats
    )
    oracle = channel_independence_oracle(sub, channels)

    maps = fmaps.numpy()
    samples = list(range(sub_n))
    ref_ms = per_sample_ms(
        lambda k: reference_ci(maps, samples, channels[:k]), sub_n, sub_c, c, args.slow_repeats
    )
    # the reference rounds the whole batch once: charge 1/N of it per sample, not 1/sub_n
    round_ms = 1e3 * best_time(lambda: torch.tensor(np.round(maps, 4)), args.slow_repeats)
    ref_ms -= round_ms / sub_n - round_ms / n
    ref = torch.from_numpy(reference_ci(maps, samples, channels)).double()

    scale = oracle.abs().max().item()
    row = {
        "shape": case.shape if not args.quick else (n, c, h, w),
        "kind": case.kind,
        "chip_ms": chip_ms,
        "chip_cpu_ms": chip_cpu_ms,
        "oracle_ms": oracle_ms,
        "ref_ms": ref_ms,
        "vs_oracle": oracle_ms / chip_ms,
        "vs_ref": ref_ms / chip_ms,
        "err": (fast - oracle).abs().max().item() / scale,
        "ref_err": (ref - oracle).abs().max().item() / scale,
        "subset": f"{sub_n}x{sub_c}",
    }
    desc, check = TARGETS[case.kind]
    row["target"] = f"{desc} {'PASS' if check(row) else 'FAIL'}"
    return row


def model_shapes(archs=FLOOR_ARCHS) -> list[tuple[int, int, int]]:
    """Every (C, H, W) (or (C, 1) for a linear layer's input) the models' hook points see."""
    import chip

    seen: set[tuple[int, ...]] = set()

    def record(fmaps):
        seen.add(tuple(fmaps.shape[1:]))
        return torch.zeros(fmaps.shape[:2])

    for arch in archs:
        size = 224 if ":" in arch else chip.models.arch_input_size(arch)[-1]
        model = chip.models.create(arch).eval()
        x = torch.randn(2, 3, size, size)
        chip.calibrate(model, [x], num_batches=1, criterion=record, progress=False)
    return sorted(seen, key=lambda s: (math.prod(s[1:]) < s[0], s[0], -math.prod(s[1:])))


def floor_fn(maps: torch.Tensor, weights: bool = False):
    """The floor of exact CI: one float64 Gram product and one eigh per sample.

    ``weights=True`` adds, when HW < C, the one product every channel's spectral weights need
    (``A V``: the maps onto the eigenvectors, as large as the Gram product itself).
    """
    smaller_gram = maps.shape[2] < maps.shape[1]

    def run():
        gram = maps.mT @ maps if smaller_gram else maps @ maps.mT
        _, vecs = torch.linalg.eigh(gram)
        if weights and smaller_gram:
            maps @ vecs

    return run


def bench_floor(shape: tuple[int, ...], args) -> dict:
    """chip / floor at one (C, *spatial) shape, interleaved repeats, best of each."""
    c, length = shape[0], math.prod(shape[1:])
    n = args.floor_samples or max(4, min(128, (2**24) // (c * length)))
    if args.quick:
        n = min(n, 8)
    gen = torch.Generator().manual_seed(args.seed)
    maps = torch.randn(n, c, length, generator=gen).relu()
    runs = {
        "floor": floor_fn(maps.double()),
        "weights": floor_fn(maps.double(), weights=True),
        "chip": lambda: channel_independence(maps),
    }
    best = dict.fromkeys(runs, math.inf)
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn)[0])
    ratio = best["chip"] / best["floor"]
    return {
        "shape": (c, *shape[1:]),
        "samples": n,
        "floor_ms": 1e3 * best["floor"] / n,
        "weights_ms": 1e3 * best["weights"] / n,
        "chip_ms": 1e3 * best["chip"] / n,
        "ratio": ratio,
        "ratio_weights": best["chip"] / best["weights"],
        "target": f"<={FLOOR_TARGET} {'PASS' if ratio <= FLOOR_TARGET else 'FAIL'}",
    }


def floor_table(args) -> None:
    print(
        "\nchip vs the floor (float64 Gram + eigh per sample) at every hook-point shape of "
        + ", ".join(FLOOR_ARCHS)
    )
    header = (
        f"{'shape (C,H,W)':<18}{'N':>5}{'floor ms':>10}{'+AV ms':>9}{'chip ms':>10}"
        f"{'chip/floor':>12}{'chip/(+AV)':>12}  target"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for shape in model_shapes():
        r = bench_floor(shape, args)
        rows.append(r)
        print(
            f"{str(r['shape']):<18}{r['samples']:>5}{r['floor_ms']:>10.3f}{r['weights_ms']:>9.3f}"
            f"{r['chip_ms']:>10.3f}{r['ratio']:>12.2f}{r['ratio_weights']:>12.2f}  {r['target']}",
            flush=True,
        )
    worst = max(rows, key=lambda r: r["ratio"])
    passed = sum(r["ratio"] <= FLOOR_TARGET for r in rows)
    print(
        f"{passed}/{len(rows)} shapes within {FLOOR_TARGET}x; worst {worst['ratio']:.2f} at "
        f"{worst['shape']}; ms = wall ms per sample; +AV = the floor plus, when HW < C, the "
        "product A V that any per-channel weight needs"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and subsets (smoke)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for chip")
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats for oracle/ref")
    parser.add_argument(
        "--channels", type=int, default=6, help="channels timed for the slow methods when C > 64"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("floor", "ref"), default=None, help="one table only")
    parser.add_argument(
        "--floor-samples",
        type=int,
        default=None,
        help="samples per floor timing (default: by size)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load avg {load:.1f}; ReLU'd Gaussian float32 maps; "
        f"wall time, best of {args.repeats} (chip) / {args.slow_repeats} (oracle, ref)"
    )
    if args.only != "ref":
        floor_table(args)
    if args.only != "floor":
        reference_table(args)


def reference_table(args) -> None:
    print("\noracle/ref: timed on a subset 'samples x channels' and extrapolated to a full sample")
    header = (
        f"{'shape (N,C,H,W)':<20}{'chip ms':>9}{'(cpu)':>8}{'oracle ms':>12}{'ref ms':>12}"
        f"{'x oracle':>10}{'x ref':>9}{'err':>10}{'ref err':>10}{'subset':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for case in CASES:
        r = bench_case(case, args)
        print(
            f"{str(r['shape']):<20}{r['chip_ms']:>9.2f}{r['chip_cpu_ms']:>8.2f}"
            f"{r['oracle_ms']:>12.1f}"
            f"{r['ref_ms']:>12.1f}{r['vs_oracle']:>10.0f}{r['vs_ref']:>9.0f}"
            f"{r['err']:>10.1e}{r['ref_err']:>10.1e}{r['subset']:>8}  {r['target']}",
            flush=True,
        )
    print(
        "ms = wall ms per sample; (cpu) = chip's process CPU ms per sample, all threads; "
        "err = max|chip - oracle| / max CI;\nref err = the same for the reference "
        "(float32, maps rounded to 4 decimals)"
    )


if __name__ == "__main__":
    main()
