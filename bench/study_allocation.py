"""Study: how a MACs budget is spread over the layers, chip's allocations against peers.

One CIFAR-style ResNet baseline (``resnet20``, 1 input channel) is trained on a seeded subset of
Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and evaluated on a seeded subset of its test
set. For two budgets (``flops=0.5``, ``flops=0.3``) and every seed, each method prunes the
baseline:

* ``chip-uniform`` / ``chip-global`` / ``chip-sensitivity``: CHIP scores (5 x 128 augmented
  training images, seeded) with each allocation of :mod:`chip.allocation` (default settings);
  ``chip-sensitivity-r3``: ``sensitivity`` with three rounds, each after the first measured
  around the last one's widths;
* ``l1-uniform``: filter-L1 scores, one uniform rate (the simplest baseline);
* ``tp-global`` / ``tp-local``: Torch-Pruning ``BasePruner`` + ``GroupMagnitudeImportance(p=2)``,
  global and per-layer, iterated until chip's MAC count meets the budget (``bench/peers.py``);
* ``fastnas``: NVIDIA ModelOpt FastNAS with a held-out loss score (``bench/peers.py``).

Every pruned model then gets the same BatchNorm re-estimation (``chip.recalibrate_bn``, 5 x 128
training images of the seed), test top-1, the same fine-tune (SGD, cosine, seeded order) and test
top-1 of its last epoch. Cells are cached as JSON in ``OUT_DIR/cells``: the study resumes, and
``--shard i/n`` runs every n-th cell so two 1-thread processes share a 2-core machine.

    python bench/study_allocation.py --baseline-only           # train the baseline once
    python bench/study_allocation.py --shard 0/2 --threads 1 & python bench/study_allocation.py --shard 1/2 --threads 1
    python bench/study_allocation.py --report-only             # docs/RESULTS.md section + plot
    python bench/study_allocation.py --scale full --device cuda  # full data and epochs (GPU)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import study_fashion_mnist as fm  # noqa: E402
from results_doc import write_section  # noqa: E402

import chip  # noqa: E402
from chip.counting import CONVENTION, count  # noqa: E402
from chip.criteria import score  # noqa: E402
from chip.data import build_loader, calibration_loader  # noqa: E402
from chip.groups import find_groups  # noqa: E402
from chip.planning import plan  # noqa: E402
from chip.prune import apply  # noqa: E402
from chip.recalibration import recalibrate_bn  # noqa: E402
from chip.train import TrainConfig, evaluate, fit  # noqa: E402
from chip.utils import seed_everything  # noqa: E402

BUDGETS = (0.5, 0.3)
# chip's methods: scores (criterion) and the allocation settings (chip.Allocation fields)
CHIP_METHODS = {
    "chip-uniform": ("chip", {"name": "uniform"}),
    "chip-global": ("chip", {"name": "global"}),
    "chip-sensitivity": ("chip", {"name": "sensitivity"}),
    "chip-sensitivity-r3": ("chip", {"name": "sensitivity", "rounds": 3}),
    "l1-uniform": ("l1", {"name": "uniform"}),
}
METHODS = (*CHIP_METHODS, "tp-global", "tp-local", "fastnas")
SENSITIVITY = ("chip-sensitivity", "chip-sensitivity-r3")  # the methods the targets are for
PEERS = ("tp-global", "tp-local", "fastnas")
CAL_BATCHES, CAL_BATCH_SIZE, BN_BATCHES = 5, 128, 5
FASTNAS_RATIOS = (0.25, 0.5, 0.75, 1.0)  # the same ladder as chip's sensitivity


@dataclass(frozen=True)
class Settings(fm.Settings):
    """Everything that defines the numbers (stored with the cache; a change is refused)."""

    baseline_epochs: int = 12
    finetune_epochs: int = 3
    seeds: int = 5
    train_subset: int | None = 12000
    val_subset: int | None = 5000
    finetune_subset: int | None = 6000  # fine-tune on the first N of a seeded permutation


SCALES = {
    "cpu": Settings(),
    "full": Settings(baseline_epochs=30, finetune_epochs=15, train_subset=None, val_subset=None,
                     finetune_subset=None),
    "smoke": Settings(baseline_epochs=1, finetune_epochs=1, seeds=1, train_subset=1024,
                      val_subset=256, finetune_subset=512),
}  # fmt: skip


class Study(fm.Study):
    """Data, baseline and cache layout of the Fashion-MNIST study; cells per (budget, method)."""

    def cell_path(self, budget: float, method: str, seed: int) -> Path:
        return self.cells_dir / f"flops{budget}-{method}-seed{seed}.json"

    def prune(self, base, budget: float, method: str, seed: int):
        """(pruned copy, plan record or None, planning seconds)."""
        train, _, _ = self.data
        model = copy.deepcopy(base)
        x = torch.zeros(self.input_size, device=self.device)
        t0 = time.perf_counter()
        if method in CHIP_METHODS:
            criterion, settings = CHIP_METHODS[method]
            # a cache per method: one method's measurements never shorten another's planning
            os.environ["CHIP_CACHE_DIR"] = str(self.out_dir / "cache" / method)
            loader = calibration_loader(train, CAL_BATCHES, CAL_BATCH_SIZE, seed)
            scores = score(model, loader, criterion, num_batches=CAL_BATCHES, seed=seed,
                           device=self.device, example_inputs=x, progress=False)  # fmt: skip
            data = calibration_loader(train, 4, CAL_BATCH_SIZE, seed + 1000)
            p = plan(model, scores, f"flops={budget}", input_size=self.input_size,
                     allocation=chip.planning.Allocation(**settings, seed=seed), data=data,
                     progress=False)  # fmt: skip
            seconds = time.perf_counter() - t0
            return apply(model, p, inplace=True), p, seconds
        if method.startswith("tp-"):
            pruned, _ = peers.tp_prune(model, x, budget, global_pruning=method == "tp-global")
        else:
            seed_everything(seed)
            loader = build_loader(train, 32, train=True, seed=seed)
            held_out = calibration_loader(train, 4, CAL_BATCH_SIZE, seed + 1000)
            pruned, _ = peers.fastnas_prune(model, loader, held_out, budget, x,
                                            ratios=FASTNAS_RATIOS)  # fmt: skip
        return pruned, None, time.perf_counter() - t0

    def run_cell(self, base, budget: float, method: str, seed: int) -> dict:
        train, _, _ = self.data
        t0 = time.perf_counter()
        pruned, p, plan_s = self.prune(base, budget, method, seed)
        pruned = pruned.to(self.device)
        counts = count(pruned, self.input_size)
        bn = calibration_loader(train, BN_BATCHES, CAL_BATCH_SIZE, seed + 2000)
        recalibrate_bn(pruned, bn, BN_BATCHES)
        _, val_loader = self.loaders(seed)
        subset = train
        if self.s.finetune_subset is not None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            subset = torch.utils.data.Subset(train, order[: self.s.finetune_subset].tolist())
        train_loader = build_loader(subset, self.s.batch_size, train=True, seed=seed)
        after_prune = evaluate(pruned, val_loader, self.device)["top1"]
        cfg = TrainConfig(epochs=self.s.finetune_epochs, lr=self.s.finetune_lr, weight_decay=5e-4,
                          warmup_epochs=0, batch_size=self.s.batch_size, seed=seed)  # fmt: skip
        work = self.out_dir / "work" / f"{budget}-{method}-{seed}"
        result = fit(pruned, train_loader, val_loader, cfg, work, device=self.device,
                     progress=self.progress)  # fmt: skip
        fm.shutil.rmtree(work, ignore_errors=True)
        return {
            "budget": budget,
            "method": method,
            "seed": seed,
            "params": counts.params,
            "macs": counts.macs,
            "widths": group_widths(base, pruned, self.input_size),
            "allocation": {k: v for k, v in (p.allocation if p else {}).items() if k != "loss"},
            "top1_pruned": after_prune,
            "top1_finetuned": result["history"][-1]["val_top1"],
            "plan_seconds": plan_s,
            "machine": fm.machine(),
            "seconds": time.perf_counter() - t0,
        }

    def run(self, methods=METHODS, shard=(0, 1)) -> None:
        if "fastnas" in methods and importlib.util.find_spec("modelopt") is None:
            print(  # before any cell: a shard must not die at its first FastNAS cell
                "study_allocation.py: fastnas needs NVIDIA ModelOpt: pip install "
                "nvidia-modelopt==0.47.0 requests huggingface_hub torchprofile==0.0.4 "
                "(or leave it out with --methods)",
                file=sys.stderr,
            )
            sys.exit(2)
        self.check_settings()
        base, record = self.baseline()
        print(f"baseline {self.s.arch}: best test top-1 {record['best_top1']:.2f}%", flush=True)
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        cells = [(s, b, m) for s in range(self.s.seeds) for b in BUDGETS for m in methods]
        for seed, budget, method in cells[shard[0] :: shard[1]]:
            path = self.cell_path(budget, method, seed)
            if path.is_file():
                continue
            cell = self.run_cell(base, budget, method, seed)
            fm._write_json(path, cell)
            print(
                f"flops={budget} {method:16s} seed {seed}: MACs {cell['macs'] / record['macs']:.3f}"
                f", pruned+BN {cell['top1_pruned']:.2f}% -> fine-tuned "
                f"{cell['top1_finetuned']:.2f}% (plan {cell['plan_seconds']:.1f} s, cell "
                f"{cell['seconds'] / 60:.1f} min)",
                flush=True,
            )


def group_widths(base, pruned, input_size) -> dict[str, int]:
    """Kept width of each of the baseline's channel groups, read from the pruned model's producer
    layer of the same name (out_channels / out_features)."""
    graph = find_groups(base, torch.zeros(input_size, device=next(base.parameters()).device),
                        check=False)  # fmt: skip
    modules = dict(pruned.named_modules())
    out = {}
    for g in graph:
        m = modules.get(g.name)
        out[g.name] = int(getattr(m, "out_channels", getattr(m, "out_features", g.channels)))
    graph.release()
    return out


# -- report --------------------------------------------------------------------------------------


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def _paired(seeds: dict, ref: dict, key: str) -> tuple[float, float] | None:
    """(mean, half 95 % interval) of the per-seed differences ``seeds - ref`` of ``top1_<key>``
    over the seeds both have (Student t); None below two seeds."""
    diffs = [seeds[s][f"top1_{key}"] - ref[s][f"top1_{key}"] for s in seeds if s in ref]
    if len(diffs) < 2:
        return None
    return statistics.fmean(diffs), _t95(len(diffs)) * statistics.stdev(diffs) / len(diffs) ** 0.5


def summarise(cells: list[dict]):
    """{(budget, method): {n, pruned (mean, std), finetuned, macs, plan_s, diff_* (paired against
    chip-uniform: mean, half CI), vs: {peer: {pruned, finetuned}} (the same against each peer,
    for the sensitivity methods)}}"""
    by = {}
    for c in cells:
        by.setdefault((c["budget"], c["method"]), {})[c["seed"]] = c
    out = {}
    for (budget, method), seeds in by.items():
        row = {"n": len(seeds), "macs": statistics.fmean(c["macs"] for c in seeds.values())}
        row["plan_s"] = statistics.fmean(c["plan_seconds"] for c in seeds.values())
        ref = by.get((budget, "chip-uniform"), {})
        for key in ("pruned", "finetuned"):
            vals = [c[f"top1_{key}"] for c in seeds.values()]
            row[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if method != "chip-uniform" and (d := _paired(seeds, ref, key)):
                row[f"diff_{key}"] = d
        if method in SENSITIVITY:
            row["vs"] = {
                peer: {
                    key: _paired(seeds, by[budget, peer], key) for key in ("pruned", "finetuned")
                }
                for peer in PEERS
                if (budget, peer) in by and _paired(seeds, by[budget, peer], "pruned")
            }
        out[budget, method] = row
    return out


def verdict_lines(rows) -> list[str]:
    """Per budget, the methods whose paired difference against chip-uniform is significant, and
    the issue's two targets for chip-sensitivity."""
    out = []
    for budget in BUDGETS:
        for key, when in (
            ("pruned", "right after pruning + BN"),
            ("finetuned", "after fine-tuning"),
        ):
            better = [m for m in METHODS if (d := rows.get((budget, m), {}).get(f"diff_{key}"))
                      and d[0] - d[1] > 0]  # fmt: skip
            worse = [m for m in METHODS if (d := rows.get((budget, m), {}).get(f"diff_{key}"))
                     and d[0] + d[1] < 0]  # fmt: skip
            out.append(
                f"* flops={budget}, {when}: better than uniform: {', '.join(better) or 'none'}; "
                f"worse: {', '.join(worse) or 'none'}"
            )
    for budget, method in ((b, m) for b in BUDGETS for m in SENSITIVITY):
        s = rows.get((budget, method), {})
        if not s:
            continue
        d = s.get("diff_pruned")
        beats = bool(d and d[0] - d[1] > 0)
        peers = [m for m in PEERS if (budget, m) in rows]
        behind = [
            m for m in peers if (v := s["vs"].get(m)) and v["finetuned"][0] + v["finetuned"][1] < 0
        ]
        out.append(
            f"* target, flops={budget}, {method}: beats uniform right after pruning by more than "
            f"the seed noise: **{'met' if beats else 'not met'}**; at least level with every peer "
            f"after fine-tuning (no paired interval below 0): "
            f"**{'not met' if behind else 'met'}**"
            + (f" (behind {', '.join(behind)})" if behind else "")
        )
    return out


def _machines(cells: list[dict]) -> str:
    """The machines (CPU, torch, threads) the cells ran on, as recorded in them."""
    seen = sorted({c["machine"] for c in cells if "machine" in c})
    old = sum("machine" not in c for c in cells)
    unknown = f"{old} cells written before the machine was recorded" if old else ""
    return "; ".join(filter(None, [*seen, unknown]))


def default_paragraph(rows) -> str:
    """Why the default allocation for budgets is what it is, with this study's numbers."""
    sens = [(b, rows[b, "chip-sensitivity"]) for b in BUDGETS if (b, "chip-sensitivity") in rows]
    if not sens or not all("diff_finetuned" in r for _, r in sens):
        return "Default for budgets: `uniform` (this study has no `chip-sensitivity` result yet)."
    after = ", ".join(f"{_pm(r['diff_finetuned'])} (flops={b})" for b, r in sens)
    before = ", ".join(f"{_pm(r['diff_pruned'])} (flops={b})" for b, r in sens)
    seconds = max(r["plan_s"] for _, r in sens)
    return (
        "Default for budgets: `uniform` stays the default, and `sensitivity` is the allocation "
        "to ask for when a few batches of labelled data are at hand. After fine-tuning, "
        f"`sensitivity` is {after} points from `uniform`; right after pruning it is {before}. "
        "It needs data, which `chip plan` alone does not have, and up to "
        f"{seconds:.0f} s of scoring and measurement per model here, so the default that works "
        "everywhere, costs nothing and loses at most a few tenths of a point after fine-tuning "
        "stays `uniform`. Its gain is largest where the pruned model is used with little or no "
        "fine-tuning."
    )


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for c in sorted(cells, key=lambda c: c["seed"]):
        first.setdefault((c["budget"], c["method"]), c)
    groups = list(next(iter(first.values()))["widths"])
    fig, axes = plt.subplots(len(BUDGETS), 1, figsize=(12, 3.2 * len(BUDGETS)), squeeze=False)
    for ax, budget in zip(axes[:, 0], BUDGETS):
        shown = [m for m in METHODS if (budget, m) in first]
        width = 0.8 / max(len(shown), 1)
        for i, m in enumerate(shown):
            w = first[budget, m]["widths"]
            ax.bar([j + i * width for j in range(len(groups))], [w[g] for g in groups], width,
                   label=m)  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("kept channels")
        ax.set_title(f"flops={budget}: kept width per group (seed 0)")
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(pair, digits=2) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def report(study: Study, results: Path) -> None:
    record = json.loads((study.out_dir / "baseline.json").read_text())
    cells = [json.loads(p.read_text()) for p in sorted(study.cells_dir.glob("*.json"))]
    if not cells:
        sys.exit(f"no cells in {study.cells_dir}; run the study first")
    rows = summarise(cells)
    figure = results.with_name("study_allocation.png")
    plot(cells, figure)
    s = study.s
    lines = [
        "## Budget allocation study: uniform, global, sensitivity and peers (Fashion-MNIST)",
        "",
        f"Written by `bench/study_allocation.py` from its cache (`{study.out_dir}`). "
        f"Machine: {_machines(cells)}.",
        "",
        f"Baseline: {s.arch} (1 input channel) trained {record['epochs']} epochs on "
        f"{s.train_subset or 'all'} training images; best top-1 **{record['best_top1']:.2f}%** on "
        f"{s.val_subset or 'all'} test images, {record['macs'] / 1e6:.2f}M MACs ({CONVENTION}).",
        "",
        f"Each cell prunes the baseline to the budget, re-estimates BatchNorm statistics on "
        f"{BN_BATCHES} x {CAL_BATCH_SIZE} training images (the same for every method), measures "
        f"top-1, fine-tunes {s.finetune_epochs} epochs on {s.finetune_subset or 'all'} of the "
        f"training images (SGD, cosine from lr {s.finetune_lr}, "
        f"batch {s.batch_size}) and measures top-1 of the last epoch. Mean ± std over seeds; "
        "Δ = paired difference against `chip-uniform` (same seed) with its 95 % interval "
        "(Student t). Planning time: scoring + planning (chip), pruning loop (peers); each chip "
        "method has its own measurement cache, so a seed's first budget measures from scratch "
        "and the second reuses what does not depend on the budget (`sensitivity`'s first "
        "round), as planning again does in use. Settings: `chip-sensitivity` is "
        "`chip.Allocation('sensitivity')` (KL loss, one round), `chip-sensitivity-r3` the same "
        "with `rounds=3`.",
        "",
        "| budget | method | MACs kept | top-1 pruned + BN | Δ | top-1 fine-tuned | Δ | plan s "
        "| seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for budget in BUDGETS:
        for m in METHODS:
            r = rows.get((budget, m))
            if r is None:
                continue
            d1 = _pm(r["diff_pruned"]) if "diff_pruned" in r else ""
            d2 = _pm(r["diff_finetuned"]) if "diff_finetuned" in r else ""
            lines.append(
                f"| flops={budget} | {m} | {r['macs'] / record['macs']:.3f} | {_pm(r['pruned'])} | "
                f"{d1} | {_pm(r['finetuned'])} | {d2} | {r['plan_s']:.1f} | {r['n']} |"
            )
    lines += [
        "",
        "chip's sensitivity allocations against each peer (paired Δ = chip − peer, same seed, "
        "95 % interval):",
        "",
        "| budget | method | peer | Δ pruned + BN | Δ fine-tuned |",
        "|---|---|---|---:|---:|",
    ]
    for budget, method in ((b, m) for b in BUDGETS for m in SENSITIVITY if (b, m) in rows):
        for peer, v in rows[budget, method].get("vs", {}).items():
            lines.append(
                f"| flops={budget} | {method} | {peer} | {_pm(v['pruned'])} | "
                f"{_pm(v['finetuned'])} |"
            )
    lines += [
        "",
        "What the intervals say (Δ against `chip-uniform`, 95 % interval excluding 0):",
        "",
    ]
    lines += verdict_lines(rows)
    lines += ["", default_paragraph(rows)]
    lines += [
        "",
        "Notes: FastNAS (ModelOpt) keeps the stem and the three residual streams of these CIFAR "
        "ResNets whole (it cannot prune through their option-A pad shortcut) and prunes only each "
        "block's inner conv; it lands below the budget (its MACs are in the table) and re-estimates "
        "BatchNorm statistics on 50 batches for every candidate it scores. Torch-Pruning's "
        "per-layer mode narrows all layers of one width together and undershoots the budget.",
    ]
    hours = (sum(c["seconds"] for c in cells) + record["seconds"]) / 3600
    lines += ["", f"![kept width per group]({figure.name})", ""]
    lines += [
        f"Compute: {hours:.2f} h of process time for the baseline and {len(cells)} cells.",
        "",
    ]
    lines += ["Commands (two 1-thread shards share the two cores):", "", "```"]
    lines += [
        "python bench/study_allocation.py --baseline-only --threads 2",
        "python bench/study_allocation.py --shard 0/2 --threads 1 & "
        "python bench/study_allocation.py --shard 1/2 --threads 1; wait",
        "python bench/study_allocation.py --report-only   # this section and its plot",
        "```",
    ]
    write_section(results, "study_allocation", "\n".join(lines))


def _shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n; exits 2 naming the expected form otherwise."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        print(f"study_allocation.py: --shard {text!r}: expected i/n with 0 <= i < n (0/2, 1/2)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return i, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path("runs/study_allocation"))
    ap.add_argument("--results", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="override the scale's seeds")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from the i-th")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=fm.DATA_ROOT)
    ap.add_argument("--baseline-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    shard = _shard(args.shard)  # before any work
    torch.set_num_threads(args.threads)
    settings = SCALES[args.scale]
    if args.seeds is not None:
        settings = replace(settings, seeds=args.seeds)
    cached = args.out_dir / "settings.json"
    if args.report_only and cached.is_file():
        settings = Settings(**json.loads(cached.read_text()))
    study = Study(args.out_dir, settings, torch.device(args.device), args.progress, args.data_root)
    if args.baseline_only:
        study.check_settings()
        study.baseline()
        return 0
    if not args.report_only:
        _, n = shard
        t0 = time.perf_counter()
        study.run(args.methods, shard)
        print(f"shard {args.shard} finished in {(time.perf_counter() - t0) / 60:.1f} min")
        if n > 1:
            return 0
    report(study, args.results)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
