"""Study on real data: CHIP vs HRank vs L1 vs random channel scores on Fashion-MNIST.

One CIFAR-style ResNet baseline (default ``resnet20``, 1 input channel) is trained on the full
Fashion-MNIST training set (Debian's ``dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist)
and evaluated on the 10,000 test images. Then, for two targets

* ``sparsity``: the widths of the paper's ResNet-56 string ``[0.]+[0.15]*2+[0.4]*27`` (stem 0,
  stage-1/2 streams 0.15, every block's inner conv 0.4), written for the chosen depth through
  :data:`chip.planning.SPARSITY_LAYOUTS` (for resnet20: ``[0.]+[0.15]*2+[0.4]*9``);
* ``flops``: a budget of 50 % of the baseline MACs (``flops=0.5``),

and each criterion (chip, hrank, l1, random) and seed, a cell scores the baseline's channels
(5 x 128 augmented training images drawn with that seed), prunes, measures test top-1 right after
pruning, fine-tunes for a fixed number of epochs (cosine, seeded data order) and measures test
top-1 again (last epoch: no selection on the test set). The baseline is shared by all cells and
is the best test epoch of its training (the paper's convention).

Every finished cell is cached as JSON in ``OUT_DIR/cells``; an interrupted study resumes where it
stopped (an interrupted baseline continues from its ``last.pt``). ``--report-only`` writes
``docs/RESULTS.md`` and its plot from the cache without training anything.

    python bench/study_fashion_mnist.py                      # the study (~2 h on 2 CPU cores)
    python bench/study_fashion_mnist.py --report-only        # docs/RESULTS.md from the cache
    python bench/study_fashion_mnist.py --smoke              # everything tiny, in a temp dir

After the cells, the baseline's score stability (``chip.stability``: 10 x 128 images split into
K = 2 and K = 10 disjoint subsets, chip / hrank / random) is measured once and cached too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chip.counting import CONVENTION, count
from chip.criteria import CRITERIA as CRITERIA_TABLE
from chip.criteria import score
from chip.data import build_data, build_loader, calibration_loader
from chip.models import create
from chip.planning import SPARSITY_LAYOUTS, plan
from chip.prune import apply
from chip.train import TrainConfig, evaluate, fit, load_training_state
from chip.utils import atomic_write, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however it is loaded
from results_doc import marked_sections  # noqa: E402

CRITERIA = tuple(CRITERIA_TABLE)
PAPER_STRING = "[0.]+[0.15]*2+[0.4]*27"  # ResNet-56 (n=9): stem, 2 streams, 27 inner rates
DATA_ROOT = "/usr/share/datasets/fashion-mnist"
CAL_BATCHES, CAL_BATCH_SIZE = 5, 128
# stability of the baseline's scores: STABILITY_BATCHES calibration batches split into K disjoint
# subsets (K=2: each subset is the study's 5 x 128 images; K=10: one batch of 128 each)
STABILITY_BATCHES, STABILITY_KS = 10, (2, 10)
STABILITY_CRITERIA = ("chip", "hrank", "random")  # l1 needs no images: identical subsets
STABILITY_RATE = 0.5


@dataclass(frozen=True)
class Settings:
    """Everything that defines the study's numbers (stored with the cache; a change is refused)."""

    arch: str = "resnet20"
    baseline_epochs: int = 15
    baseline_lr: float = 0.1
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    batch_size: int = 128
    seeds: int = 3
    train_subset: int | None = None
    val_subset: int | None = None


SMOKE = Settings(baseline_epochs=1, finetune_epochs=1, seeds=1, train_subset=512, val_subset=256)


def sparsity_string(arch: str) -> str:
    """The paper's ResNet-56 rates (stem 0, streams 0.15, inner 0.4) for another CIFAR ResNet."""
    inner = len(SPARSITY_LAYOUTS[arch]()) - 3
    return f"[0.]+[0.15]*2+[0.4]*{inner}"


def targets(arch: str) -> dict[str, str]:
    """Target name -> chip.plan target."""
    return {"sparsity": sparsity_string(arch), "flops": "flops=0.5"}


# ------------------------------------------------------------------------------------ scoring


def score_channels(model, loader, criterion: str, seed: int, device):
    """Channel scores of ``criterion`` through the library's one scoring entry point."""
    return score(
        model, loader, criterion, num_batches=CAL_BATCHES, seed=seed, device=device, progress=False
    )


# ------------------------------------------------------------------------------------- study


class Study:
    """The cached study in ``out_dir``: baseline, cells and the report."""

    def __init__(
        self,
        out_dir: Path,
        settings: Settings,
        device: torch.device,
        progress: bool,
        data_root: str | Path = DATA_ROOT,
    ):
        self.out_dir, self.s, self.device, self.progress = out_dir, settings, device, progress
        self.data_root = data_root
        self.cells_dir = out_dir / "cells"
        self._data = None

    # -- data / models -------------------------------------------------------------------------
    @property
    def data(self):
        if self._data is None:
            self._data = build_data(
                "fashion-mnist",
                self.data_root,
                train_subset=self.s.train_subset,
                val_subset=self.s.val_subset,
                seed=0,
            )
        return self._data

    def loaders(self, seed: int):
        train, val, _ = self.data
        return (
            build_loader(train, self.s.batch_size, train=True, seed=seed),
            build_loader(val, 256, train=False),
        )

    def new_model(self) -> torch.nn.Module:
        seed_everything(0)
        info = self.data[2]
        return create(self.s.arch, num_classes=info.num_classes, in_channels=info.in_channels)

    @property
    def input_size(self) -> tuple[int, ...]:
        info = self.data[2]
        return (1, info.in_channels, *info.image_size)

    # -- cache -----------------------------------------------------------------------------------
    def check_settings(self) -> None:
        """Write settings.json, or refuse to mix cells computed with other settings."""
        path = self.out_dir / "settings.json"
        mine = asdict(self.s)
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                sys.exit(f"{path} holds other settings ({theirs}); use another --out-dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, mine)

    def cell_path(self, target: str, criterion: str, seed: int) -> Path:
        return self.cells_dir / f"{target}-{criterion}-seed{seed}.json"

    def cells(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.cells_dir.glob("*.json"))]

    # -- estimate --------------------------------------------------------------------------------
    def estimate(self) -> dict:
        """Seconds per training image and per test image, measured on a few batches."""
        model = self.new_model().to(self.device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        train_loader, val_loader = self.loaders(0)
        batches = iter(train_loader)
        x, y = next(batches)  # warm-up batch (not timed)
        loss = torch.nn.functional.cross_entropy(model(x.to(self.device)), y.to(self.device))
        loss.backward()
        n, t0 = 0, time.perf_counter()
        for _, (x, y) in zip(range(6), batches):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(
                model(x.to(self.device)), y.to(self.device)
            ).backward()
            opt.step()
            n += len(x)
        train_s = (time.perf_counter() - t0) / max(n, 1)
        model.eval()
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for _, (x, _y) in zip(range(4), val_loader):
                model(x.to(self.device))
                n += len(x)
        return {"train_s_per_image": train_s, "eval_s_per_image": (time.perf_counter() - t0) / n}

    def print_estimate(self) -> float:
        e = self.estimate()
        train, val, _ = self.data
        epoch = len(train) * e["train_s_per_image"] + len(val) * e["eval_s_per_image"]
        pruned_epoch = 0.6 * epoch  # ~50 % of the MACs; small convs do not scale perfectly
        n_cells = len(targets(self.s.arch)) * len(CRITERIA) * self.s.seeds
        cell = self.s.finetune_epochs * pruned_epoch + 2 * len(val) * e["eval_s_per_image"] + 20
        total = self.s.baseline_epochs * epoch + n_cells * cell
        print(
            f"estimate: {e['train_s_per_image'] * 1e3:.2f} ms per training image, baseline "
            f"epoch {epoch / 60:.1f} min x {self.s.baseline_epochs}, {n_cells} cells x "
            f"{cell / 60:.1f} min -> {total / 3600:.2f} h in all (before cached parts)",
            flush=True,
        )
        return total

    # -- baseline --------------------------------------------------------------------------------
    def baseline(self) -> tuple[torch.nn.Module, dict]:
        """The trained baseline (best test epoch) and its record (cached in baseline.json)."""
        out = self.out_dir / "baseline"
        record_path = self.out_dir / "baseline.json"
        model = self.new_model()
        if not record_path.is_file():
            cfg = TrainConfig(
                epochs=self.s.baseline_epochs,
                lr=self.s.baseline_lr,
                weight_decay=5e-4,
                warmup_epochs=1,
                batch_size=self.s.batch_size,
                seed=0,
            )
            train_loader, val_loader = self.loaders(0)
            t0 = time.perf_counter()
            result = fit(
                model,
                train_loader,
                val_loader,
                cfg,
                out,
                device=self.device,
                resume=True,
                progress=self.progress,
            )
            counts = count(model, self.input_size)
            _write_json(
                record_path,
                {
                    "arch": self.s.arch,
                    "epochs": cfg.epochs,
                    "best_top1": result["best_top1"],
                    "best_epoch": result["best_epoch"],
                    "params": counts.params,
                    "macs": counts.macs,
                    "seconds": time.perf_counter() - t0,
                },
            )
        load_training_state(out / "best.pt", model)
        return model.to(self.device).eval(), json.loads(record_path.read_text())

    # -- cells -----------------------------------------------------------------------------------
    def run_cell(self, base: torch.nn.Module, target: str, criterion: str, seed: int) -> dict:
        """Score, prune, evaluate, fine-tune, evaluate one (target, criterion, seed)."""
        import copy

        train, val, _ = self.data
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        loader = calibration_loader(train, CAL_BATCHES, CAL_BATCH_SIZE, seed)
        seed_everything(seed)  # the random criterion draws from the global RNG
        scores = score_channels(model, loader, criterion, seed, self.device)
        score_s = time.perf_counter() - t0
        p = plan(model, scores, targets(self.s.arch)[target], input_size=self.input_size)
        pruned = apply(model, p, inplace=True)
        counts = count(pruned, self.input_size)
        train_loader, val_loader = self.loaders(seed)
        after_prune = evaluate(pruned.to(self.device), val_loader, self.device)["top1"]
        cfg = TrainConfig(
            epochs=self.s.finetune_epochs,
            lr=self.s.finetune_lr,
            weight_decay=5e-4,
            warmup_epochs=0,
            batch_size=self.s.batch_size,
            seed=seed,
        )
        work = self.out_dir / "work" / f"{target}-{criterion}-seed{seed}"
        shutil.rmtree(work, ignore_errors=True)
        result = fit(
            pruned, train_loader, val_loader, cfg, work, device=self.device, progress=self.progress
        )
        shutil.rmtree(work, ignore_errors=True)
        if work.parent.is_dir() and not any(work.parent.iterdir()):
            work.parent.rmdir()
        history = result["history"]
        return {
            "target": target,
            "target_spec": p.target,
            "criterion": criterion,
            "seed": seed,
            "params": counts.params,
            "macs": counts.macs,
            "widths": p.widths(),
            "top1_pruned": after_prune,
            "top1_finetuned": history[-1]["val_top1"],
            "top1_finetuned_best": result["best_top1"],
            "finetune_epochs": cfg.epochs,
            "score_seconds": score_s,
            "seconds": time.perf_counter() - t0,
        }

    def stability(self, base: torch.nn.Module) -> dict:
        """``chip.stability`` of the baseline's scores per criterion and K (cached)."""
        from chip.stability import stability

        path = self.out_dir / "stability.json"
        if path.is_file():
            return json.loads(path.read_text())
        train, _, _ = self.data
        t0 = time.perf_counter()
        rows = []
        available = min(STABILITY_BATCHES, -(-len(train) // CAL_BATCH_SIZE))
        ks = [k for k in STABILITY_KS if k <= available]
        if len(ks) < len(STABILITY_KS):
            print(f"stability: only {available} calibration batches; K={ks} only", flush=True)
        batches = list(calibration_loader(train, STABILITY_BATCHES, CAL_BATCH_SIZE, seed=0))
        for criterion in STABILITY_CRITERIA:
            for k in ks:
                report = stability(
                    base,
                    batches,
                    k,
                    num_batches=STABILITY_BATCHES,
                    rate=STABILITY_RATE,
                    criterion=criterion,
                    seed=0,
                    device=self.device,
                )
                rows.append(report.to_dict())
                s = report.summary()
                print(
                    f"stability {criterion:6s} k={k:<2d} ({report.samples_per_subset[0]} images "
                    f"per subset): spearman {s['spearman_mean']:.3f} (min {s['spearman_min']:.3f}), "
                    f"overlap {s['overlap_mean']:.3f} (min {s['overlap_min']:.3f})",
                    flush=True,
                )
        result = {
            "batches": STABILITY_BATCHES,
            "batch_size": CAL_BATCH_SIZE,
            "rate": STABILITY_RATE,
            "reports": rows,
            "seconds": time.perf_counter() - t0,
        }
        _write_json(path, result)
        return result

    def run(self, criteria=CRITERIA, skip_unavailable: bool = False) -> None:
        self.check_settings()
        self.print_estimate()
        base, record = self.baseline()
        print(
            f"baseline {self.s.arch}: best test top-1 {record['best_top1']:.2f}% "
            f"(epoch {record['best_epoch']} of {record['epochs']})",
            flush=True,
        )
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        for target in targets(self.s.arch):
            for criterion in criteria:
                for seed in range(self.s.seeds):
                    path = self.cell_path(target, criterion, seed)
                    if path.is_file():
                        continue
                    try:
                        cell = self.run_cell(base, target, criterion, seed)
                    except ValueError as exc:  # ChipError: e.g. a criterion not there yet
                        if not skip_unavailable:
                            raise
                        print(f"skipped {target}/{criterion}: {exc}", flush=True)
                        continue
                    _write_json(path, cell)
                    print(
                        f"{target:8s} {criterion:6s} seed {seed}: pruned {cell['top1_pruned']:.2f}% "
                        f"-> fine-tuned {cell['top1_finetuned']:.2f}% "
                        f"({cell['seconds'] / 60:.1f} min)",
                        flush=True,
                    )
        self.stability(base)


# ------------------------------------------------------------------------------------ report


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(cells: list[dict]) -> dict[tuple[str, str], dict]:
    """(target, criterion) -> mean/std of top-1 after pruning and after fine-tuning."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by_key.setdefault((c["target"], c["criterion"]), []).append(c)
    out = {}
    for key, group in by_key.items():
        out[key] = {
            "n": len(group),
            "pruned": _mean_std([c["top1_pruned"] for c in group]),
            "finetuned": _mean_std([c["top1_finetuned"] for c in group]),
            "params": group[0]["params"],
            "macs": group[0]["macs"],
            "target_spec": group[0]["target_spec"],
        }
    return out


# row of the plot -> (cell key, title, full 0-100 axis?)
PLOT_ROWS = (
    ("pruned", "right after pruning (no fine-tuning)", True),
    ("finetuned", "after the fixed-length fine-tune", False),
)


def plot(agg: dict, baseline_top1: float, path: Path) -> None:
    """Mean +- std top-1 per criterion: rows after pruning / after fine-tuning, one column per
    target; the fine-tuned row is zoomed (points with error bars, no bars on a cut axis)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(t for t, _ in agg))
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.0), squeeze=False)
    for col, target in enumerate(names):
        crit = [c for c in CRITERIA if (target, c) in agg]
        for row, (key, title, full) in enumerate(PLOT_ROWS):
            ax = axes[row][col]
            means = [agg[(target, c)][key][0] for c in crit]
            stds = [agg[(target, c)][key][1] for c in crit]
            ax.errorbar(
                range(len(crit)),
                means,
                yerr=stds,
                fmt="o",
                ms=7,
                capsize=5,
                color="#2b7bba",
                label="mean ± std over seeds",
            )
            ax.axhline(baseline_top1, color="black", ls="--", lw=1, label="unpruned baseline")
            if full:
                ax.set_ylim(0, 100)
            else:
                lo = min(m - s for m, s in zip(means, stds))
                hi = max(max(m + s for m, s in zip(means, stds)), baseline_top1)
                pad = max(0.5, 0.15 * (hi - lo))
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_xticks(range(len(crit)), crit)
            ax.set_xlim(-0.5, len(crit) - 0.5)
            ax.set_ylabel("test top-1 (%)")
            ax.set_title(f"{target} ({agg[(target, crit[0])]['target_spec']}): {title}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[-1][col].set_xlabel("channel score criterion")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def ranking_lines(agg: dict) -> list[str]:
    """One line per target and stage: the criteria ordered by mean top-1, best first."""
    lines = ["", "Order of the means (the std column says which gaps exceed the seed noise):", ""]
    for target in dict.fromkeys(t for t, _ in agg):
        for key, stage in (("pruned", "right after pruning"), ("finetuned", "after fine-tuning")):
            means = [(c, a[key][0]) for (t, c), a in agg.items() if t == target]
            order = " > ".join(f"{c} {m:.2f}" for c, m in sorted(means, key=lambda r: -r[1]))
            lines.append(f"* `{target}`, {stage}: {order}")
    if any(c == "l1" for _, c in agg):
        lines += [
            "",
            "l1 reads only the weights, so its pruned model is the same for every seed "
            "(std 0 right after pruning); the seed still changes its fine-tuning order.",
        ]
    return lines


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def stability_lines(stab: dict, arch: str) -> list[str]:
    """RESULTS.md section: how much the baseline's scores change with the calibration images."""
    lines = [
        "",
        f"## Is {CAL_BATCHES} x {CAL_BATCH_SIZE} images enough? Score stability on the baseline",
        "",
        f"`chip.stability` (what `chip score --stability K` prints) on the {arch} baseline: "
        f"{stab['batches']} x {stab['batch_size']} augmented training images (seed 0) split into K "
        "disjoint subsets, each scored on its own; per layer group, every pair of subsets is "
        "compared by the Spearman correlation of the score vectors and by the overlap of the "
        f"channels each would keep at rate {stab['rate']}. Means over groups, and the worst "
        "group. `random` draws independent scores per subset: its values are the chance floor.",
        "",
        "| criterion | K | images per subset | Spearman mean | Spearman worst group "
        "| kept overlap mean | kept overlap worst group |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in stab["reports"]:
        sm = r["summary"]
        lines.append(
            f"| {r['criterion']} | {r['k']} | {r['samples_per_subset'][0]} | "
            f"{_num(sm['spearman_mean'])} | {_num(sm['spearman_min'])} | "
            f"{_num(sm['overlap_mean'])} | {_num(sm['overlap_min'])} |"
        )
    chip_k2 = next((r for r in stab["reports"] if r["criterion"] == "chip" and r["k"] == 2), None)
    if chip_k2 is not None:
        lines += [
            "",
            f"Per group, chip, K=2 ({chip_k2['samples_per_subset'][0]} images per "
            "subset, the study's calibration size):",
            "",
            "| group | channels | kept | Spearman | kept overlap |",
            "|---|---:|---:|---:|---:|",
        ]
        for g in chip_k2["groups"]:
            lines.append(
                f"| {g['name']} | {g['channels']} | {g['kept']} | "
                f"{_num(g['spearman_mean'])} | {_num(g['overlap_mean'])} |"
            )
    return lines


def write_results(
    study: Study, results: Path, command: str, gpu_table: Path | None, report_command: str
) -> Path:
    """docs/RESULTS.md (and its plot) from the cached cells."""
    record_path = study.out_dir / "baseline.json"
    if not record_path.is_file():
        sys.exit(f"no baseline in {study.out_dir}; run the study first")
    record = json.loads(record_path.read_text())
    cells = study.cells()
    agg = aggregate(cells)
    s = study.s
    figure = results.with_name("study_fashion_mnist.png")
    if agg:
        plot(agg, record["best_top1"], figure)
    lines = [
        "# Results",
        "",
        "## Fashion-MNIST study: CHIP vs HRank vs L1 vs random",
        "",
        f"Written by `bench/study_fashion_mnist.py` from its cache (`{study.out_dir}`).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Baseline: {s.arch} (1 input channel, 10 classes) trained {record['epochs']} epochs on the "
        f"{'full ' if s.train_subset is None else ''}training set; best test top-1 "
        f"**{record['best_top1']:.2f}%** (epoch {record['best_epoch']}), "
        f"{record['params'] / 1e6:.3f}M params, {record['macs'] / 1e6:.2f}M MACs ({CONVENTION}, "
        f"input 1x28x28); {record['seconds'] / 60:.0f} min.",
        "",
        f"Each cell: scores on {CAL_BATCHES} x {CAL_BATCH_SIZE} augmented training images (seeded), "
        f"prune, test top-1, fine-tune {s.finetune_epochs} epoch(s) (SGD, cosine from lr "
        f"{s.finetune_lr}, batch {s.batch_size}, seeded order), test top-1 of the last epoch. "
        f"Mean ± std over {s.seeds} seeds; the seed changes the calibration images, the random "
        "scores and the fine-tuning order (the baseline is shared). The fine-tune is short on "
        "purpose (the paper fine-tunes CIFAR models for 400 epochs): it measures how much of the "
        "accuracy each criterion's choice keeps and recovers quickly, not the final accuracies "
        "a long fine-tune reaches.",
        "",
        f"`sparsity` = the widths of the paper's ResNet-56 `{PAPER_STRING}` written for {s.arch} "
        f"as `{sparsity_string(s.arch)}`; `flops` = keep at most 50% of the baseline MACs.",
        "",
        "| target | criterion | params | MACs | top-1 after pruning | top-1 after fine-tuning "
        "| seeds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (target, crit), a in sorted(
        agg.items(), key=lambda kv: (kv[0][0], CRITERIA.index(kv[0][1]))
    ):
        lines.append(
            f"| {target} | {crit} | {a['params'] / 1e6:.3f}M | {a['macs'] / 1e6:.2f}M | "
            f"{_fmt(a['pruned'])} | {_fmt(a['finetuned'])} | {a['n']} |"
        )
    lines += ranking_lines(agg)
    if agg:
        lines += ["", f"![top-1 per criterion]({figure.name})"]
    stab_path = study.out_dir / "stability.json"
    stab = json.loads(stab_path.read_text()) if stab_path.is_file() else None
    if stab is not None:
        lines += stability_lines(stab, s.arch)
    total = sum(c["seconds"] for c in cells) + record["seconds"] + (stab or {}).get("seconds", 0)
    lines += [
        "",
        f"Compute: {total / 3600:.2f} h for the baseline, {len(cells)} cells"
        f"{' and the stability check' if stab else ''}.",
        "",
        "Commands:",
        "",
        "```",
        command,
        f"{report_command}   # this file from the cache",
        "```",
    ]
    for section in marked_sections(results):  # other scripts' sections (bench/results_doc.py)
        lines += ["", section.rstrip("\n")]
    lines += ["", "## GPU check (`bench/gpu.sh`)", ""]
    if gpu_table is not None:
        lines += ["```", gpu_table.read_text().rstrip(), "```"]
    else:
        lines += [
            "Not run for this file: `bench/gpu.sh` (CI speed at the ImageNet shapes, calibrate "
            "overhead and AMP/channels_last fine-tuning throughput of ResNet-50, latency at "
            "batch 1 and 64) needs a CUDA device, and none was available when this file was "
            "written. Its output goes here through `--report-only --gpu-table FILE`."
        ]
    results.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(results, "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


# --------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/study_fashion_mnist"),
        help="cache directory (cells, baseline)",
    )
    ap.add_argument("--results", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--arch", default=Settings.arch, choices=["resnet20", "resnet32", "resnet56"])
    ap.add_argument("--baseline-epochs", type=int, default=Settings.baseline_epochs)
    ap.add_argument("--finetune-epochs", type=int, default=Settings.finetune_epochs)
    ap.add_argument("--seeds", type=int, default=Settings.seeds)
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data-root", default=DATA_ROOT, help=f"Fashion-MNIST IDX files (default: {DATA_ROOT})"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="only write RESULTS.md from the cache"
    )
    ap.add_argument(
        "--gpu-table",
        type=Path,
        default=None,
        help="also put this bench/gpu.sh output into RESULTS.md",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run (512 images, 1 epoch, 1 seed) into a temp dir; skips criteria "
        "the library does not have yet",
    )
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        settings = SMOKE
        out_dir = Path(tempfile.mkdtemp(prefix="chip_study_smoke_"))
        results = out_dir / "RESULTS.md"
    else:
        settings = Settings(
            arch=args.arch,
            baseline_epochs=args.baseline_epochs,
            finetune_epochs=args.finetune_epochs,
            seeds=args.seeds,
        )
        out_dir, results = args.out_dir, args.results
        cached = out_dir / "settings.json"
        if args.report_only and cached.is_file():  # describe the cache, not today's flags
            settings = Settings(**json.loads(cached.read_text()))
    study = Study(out_dir, settings, torch.device(args.device), args.progress, args.data_root)
    command = shlex.join(
        ["python", "bench/study_fashion_mnist.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if not args.report_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "command.txt", "w") as f:
            f.write(command + "\n")
        t0 = time.perf_counter()
        study.run(args.criteria, skip_unavailable=args.smoke)
        print(f"study finished in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    ran = out_dir / "command.txt"  # the command that computed the cache
    report_command = shlex.join(
        [
            "python",
            "bench/study_fashion_mnist.py",
            "--report-only",
            "--out-dir",
            str(out_dir),
            "--results",
            str(results),
        ]
    )
    path = write_results(
        study,
        results,
        ran.read_text().strip() if ran.is_file() else command,
        args.gpu_table,
        report_command,
    )
    print(f"wrote {path}")
    if args.smoke:
        print(path.read_text())
        print(f"(smoke run in {out_dir}; delete it when done)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
