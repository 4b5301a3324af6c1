"""Sensitivity settings against uniform, right after pruning + BatchNorm re-estimation.

A quick companion of ``bench/study_allocation.py`` (same baseline, data, scores and BatchNorm
re-estimation; no fine-tuning): for each seed and budget (``flops=0.5``, ``flops=0.3``) the
baseline is planned with each variant below, pruned, its BatchNorm statistics re-estimated on
5 x 128 training images, and its test top-1 measured. Prints mean +- std per variant and the
paired difference against ``uniform`` with its 95 % interval (Student t). Rows are appended to
``OUT_DIR/variants.jsonl`` (a rerun skips the rows it has), so two 1-thread processes can share a
2-core machine (``--seeds 0,2,4`` and ``--seeds 1,3``).

    python bench/study_allocation.py --baseline-only --threads 2   # the baseline, once
    python bench/allocation_variants.py --threads 1 --seeds 0,2,4 & \\
        python bench/allocation_variants.py --threads 1 --seeds 1,3; wait
    python bench/allocation_variants.py --report-only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_allocation as sa  # noqa: E402

from chip.criteria import score  # noqa: E402
from chip.data import calibration_loader  # noqa: E402
from chip.planning import Allocation, plan  # noqa: E402
from chip.prune import apply  # noqa: E402
from chip.recalibration import recalibrate_bn  # noqa: E402
from chip.train import evaluate  # noqa: E402

FINE = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
# variant -> chip.Allocation fields (the seed is added per run)
VARIANTS = {
    "uniform": {"name": "uniform"},
    "ce": {"name": "sensitivity", "loss": "ce"},
    "kl": {"name": "sensitivity", "loss": "kl"},
    "ce-8-batches": {"name": "sensitivity", "loss": "ce", "bn_batches": 4, "eval_batches": 8},
    "kl-8-batches": {"name": "sensitivity", "loss": "kl", "bn_batches": 4, "eval_batches": 8},
    "ce-r2": {"name": "sensitivity", "loss": "ce", "rounds": 2},
    "kl-r2": {"name": "sensitivity", "loss": "kl", "rounds": 2},
    "kl-r3": {"name": "sensitivity", "loss": "kl", "rounds": 3},
    "kl-r5": {"name": "sensitivity", "loss": "kl", "rounds": 5},
    "kl-fine-r2": {"name": "sensitivity", "loss": "kl", "rounds": 2, "ladder": FINE},
    "kl-fine-r3": {"name": "sensitivity", "loss": "kl", "rounds": 3, "ladder": FINE},
    "kl-r3-8-batches": {"name": "sensitivity", "rounds": 3, "bn_batches": 4, "eval_batches": 4},
}


def run(study, variants, seeds, out: Path) -> None:
    base, _ = study.baseline()
    train, _, _ = study.data
    _, val_loader = study.loaders(0)
    done = {(r["variant"], r["seed"], r["budget"]) for r in rows(out)}
    x = torch.zeros(study.input_size)
    for seed in seeds:
        loader = calibration_loader(train, sa.CAL_BATCHES, sa.CAL_BATCH_SIZE, seed)
        scores = score(copy.deepcopy(base), loader, "chip", num_batches=sa.CAL_BATCHES,
                       seed=seed, example_inputs=x, progress=False)  # fmt: skip
        for name in variants:
            allocation = Allocation(**VARIANTS[name], seed=seed)
            count = allocation.batches if allocation.name == "sensitivity" else 4
            data = calibration_loader(train, count, sa.CAL_BATCH_SIZE, seed + 1000)
            for budget in sa.BUDGETS:
                if (name, seed, budget) in done:
                    continue
                t0 = time.perf_counter()
                p = plan(copy.deepcopy(base), scores, f"flops={budget}", input_size=study.input_size,
                         allocation=allocation, data=data, progress=False)  # fmt: skip
                pruned = apply(copy.deepcopy(base), p)
                bn = calibration_loader(train, sa.BN_BATCHES, sa.CAL_BATCH_SIZE, seed + 2000)
                recalibrate_bn(pruned, bn, sa.BN_BATCHES)
                row = {
                    "variant": name,
                    "seed": seed,
                    "budget": budget,
                    "top1": evaluate(pruned, val_loader, "cpu")["top1"],
                    "macs": p.stats["macs_kept"],
                    "widths": p.widths(),
                    "seconds": time.perf_counter() - t0,
                }
                print(f"{name:12s} seed {seed} flops={budget}: {row['top1']:.2f}%", flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []


def report(out: Path) -> None:
    by: dict[tuple[float, str], dict[int, float]] = {}
    for r in rows(out):
        by.setdefault((r["budget"], r["variant"]), {})[r["seed"]] = r["top1"]
    print(
        f"{'budget':>8s} {'variant':12s} {'n':>2s} {'top1 pruned + BN':>17s} {'diff vs uniform':>17s}"
    )
    for (budget, name), seeds in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        vals = list(seeds.values())
        ref = by.get((budget, "uniform"), {})
        diffs = [seeds[s] - ref[s] for s in seeds if s in ref]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        diff = "-"
        if name != "uniform" and len(diffs) > 1:
            half = sa._t95(len(diffs)) * statistics.stdev(diffs) / len(diffs) ** 0.5
            diff = f"{statistics.fmean(diffs):+.2f} ± {half:.2f}"
        print(f"{budget:8.1f} {name:12s} {len(vals):2d} {statistics.fmean(vals):8.2f} ± "
              f"{spread:5.2f} {diff:>17s}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path("runs/study_allocation"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out_dir / "variants.jsonl"
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"allocation_variants.py: unknown variants {unknown}; expected {list(VARIANTS)}")
    if not args.report_only:
        study = sa.Study(args.out_dir, sa.SCALES["cpu"], torch.device("cpu"), False)
        run(study, variants, [int(s) for s in args.seeds.split(",")], out)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
