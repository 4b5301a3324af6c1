"""``chip report RUN_DIR``: a Markdown report with PNG figures of one ``chip run`` directory.

    path = chip.report.write_report("runs/demo")      # runs/demo/report.md (+ report_*.png)

Reads what the pipeline left in the run directory (``summary.json``, ``config.json``,
``plan.json``, ``scores.safetensors``, ``baseline/metrics.jsonl``, ``finetune/metrics.jsonl``,
``model.chip`` and the baseline checkpoint) and writes

==========================  =========================================================
``report.md``               table of params, MACs, latency and top-1 before/after, figures
``report_widths.png``       kept vs original channels of every group (horizontal bars)
``report_scores.png``       distribution of the per-channel scores of every group
``report_training.png``     loss and top-1 per epoch, baseline then fine-tuning
==========================  =========================================================

A figure whose inputs are missing (e.g. no ``metrics.jsonl`` when the baseline came from a
checkpoint) is left out and the report says why. Files are written atomically; matplotlib runs
on its non-interactive Agg backend.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chip.errors import ChipError
from chip.utils import atomic_write

__all__ = [
    "FIGURES",
    "RunData",
    "load_run",
    "measure_latencies",
    "results_table",
    "summarize",
    "summary_markdown",
    "widths_table",
    "write_report",
]

# score criterion -> x-axis label of the score figure
_SCORE_LABELS = {
    "chip": "mean channel independence (CI) per channel",
    "hrank": "mean feature-map rank per channel",
    "l1": "filter L1 norm per channel",
    "random": "random score per channel",
}
_WIDE_RANGE = 20.0  # log scale when max / min of the positive values exceeds this


@dataclass
class RunData:
    """Everything the report reads from a run directory (missing parts are None / empty)."""

    run_dir: Path
    summary: dict
    config: dict = field(default_factory=dict)
    plan: Any = None  # chip.planning.PruningPlan
    scores: Any = None  # chip.calibration.ChannelScores
    curves: dict[str, list[dict]] = field(default_factory=dict)  # stage -> metrics rows

    @property
    def criterion(self) -> str:
        return (
            self.summary.get("stages", {}).get("score", {}).get("criterion")
            or self.config.get("calibration", {}).get("criterion")
            or "chip"
        )


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
    return rows


def load_run(run_dir) -> RunData:
    """Read a run directory; :class:`ChipError` if it is not one (no ``summary.json``)."""
    from chip.calibration import ChannelScores
    from chip.planning import PruningPlan

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChipError(f"run directory not found: {run_dir} (expected the out_dir of `chip run`)")
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        raise ChipError(
            f"{run_dir} has no summary.json (expected a finished `chip run` directory)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ChipError(
            f"{summary_path} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    plan = PruningPlan.load(run_dir / "plan.json") if (run_dir / "plan.json").is_file() else None
    scores_path = run_dir / "scores.safetensors"
    scores = ChannelScores.load(scores_path) if scores_path.is_file() else None
    curves = {
        stage: _read_jsonl(run_dir / stage / "metrics.jsonl") for stage in ("baseline", "finetune")
    }
    return RunData(run_dir, summary, config, plan, scores, {k: v for k, v in curves.items() if v})


# ----------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """PNG of ``fig`` written atomically; the figure is closed."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


_LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}


def _group_height(n: int) -> float:
    """Figure height (inches) for ``n`` horizontal rows of group names."""
    return min(max(2.2, 0.28 * n + 1.2), 40.0)


def _widths(run: RunData) -> tuple[list[str], list[int], list[int]]:
    if run.plan is not None:
        names = list(run.plan.groups)
        return (
            names,
            [g.channels for g in run.plan.groups.values()],
            [g.kept for g in run.plan.groups.values()],
        )
    widths, channels = run.summary.get("widths", {}), run.summary.get("channels", {})
    names = [n for n in widths if n in channels]
    return names, [channels[n] for n in names], [widths[n] for n in names]


def figure_widths(run: RunData, path: Path) -> str | None:
    """Kept vs original channels per group; returns None, or a note (why it is not drawn)."""
    names, channels, kept = _widths(run)
    if not names:
        return "no plan.json and no widths in summary.json"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, _group_height(len(names))))
    y = list(range(len(names)))
    ax.barh(y, channels, color="#d9d9d9", edgecolor="#9e9e9e", label="original")
    ax.barh(y, kept, color="#2b7bba", height=0.55, label="kept")
    for yi, c, k in zip(y, channels, kept):
        ax.text(c, yi, f" {k}/{c}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # graph order, top to bottom
    ax.set_xlabel("output channels")
    ax.set_ylabel("channel group (producer layer)")
    ax.set_xlim(0, max(channels) * 1.18)
    ax.set_title(f"Kept vs original width per group ({run.summary.get('target') or 'plan'})")
    ax.legend(**_LEGEND_OUTSIDE)
    ax.grid(axis="x", alpha=0.3)
    _save_figure(fig, path)
    return None


def _score_scale(values: Sequence[float]) -> str:
    """``"log"`` when the positive values span more than :data:`_WIDE_RANGE`, else linear."""
    positive = [v for v in values if v > 0]
    if not positive:
        return "linear"
    return "log" if max(positive) / min(positive) > _WIDE_RANGE else "linear"


def _set_scale(axis, set_scale: Callable[[str], None], scale: str) -> None:
    """Set a scale; log axes get plain-number tick labels (0.3, 1, 3 ...) instead of 10^k."""
    set_scale(scale)
    if scale == "log":
        from matplotlib.ticker import FuncFormatter, LogLocator

        lo, hi = sorted(abs(v) for v in axis.get_view_interval())
        decades = math.log10(hi / lo) if lo > 0 else math.inf
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def figure_scores(run: RunData, path: Path) -> str | None:
    """Box plot of each group's per-channel scores; kept / pruned channels as dots."""
    if run.scores is None:
        return "no scores.safetensors"
    names = [
        n
        for n in (list(run.plan.groups) if run.plan is not None else run.scores.groups)
        if n in run.scores.groups
    ]
    if not names:
        return "the scores file has no groups of the plan"
    values = [run.scores.groups[n].double().tolist() for n in names]
    scale = _score_scale([v for vs in values for v in vs])
    shown = [[v for v in vs if v > 0] or [math.nan] if scale == "log" else vs for vs in values]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, _group_height(len(names))))
    y = list(range(1, len(names) + 1))
    ax.boxplot(
        shown,
        positions=y,
        orientation="horizontal",
        widths=0.6,
        showfliers=False,
        medianprops={"color": "black"},
    )
    if run.plan is not None:  # every channel as a dot: kept in blue, pruned in red
        dots: dict[bool, tuple[list[float], list[int]]] = {True: ([], []), False: ([], [])}
        for yi, name, vs in zip(y, names, values):
            keep = set(run.plan.groups[name].keep)
            for i, v in enumerate(vs):
                if scale != "log" or v > 0:
                    dots[i in keep][0].append(v)
                    dots[i in keep][1].append(yi)
        for flag, colour, label in ((True, "#2b7bba", "kept"), (False, "#d62728", "pruned")):
            ax.scatter(*dots[flag], s=7, color=colour, alpha=0.55, zorder=3, label=label)
        ax.legend(**_LEGEND_OUTSIDE)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    _set_scale(ax.xaxis, ax.set_xscale, scale)
    ax.set_xlabel(
        _SCORE_LABELS.get(run.criterion, f"{run.criterion} score per channel")
        + (" (log scale)" if scale == "log" else "")
    )
    ax.set_ylabel("channel group")
    n = run.scores.num_samples
    ax.set_title(f"{run.criterion} scores per group ({n} calibration samples)")
    ax.grid(axis="x", alpha=0.3, which="both")
    _save_figure(fig, path)
    zeros = sum(v <= 0 for vs in values for v in vs)
    return f"{zeros} zero scores not shown on the log axis" if scale == "log" and zeros else None


def figure_training(run: RunData, path: Path) -> str | None:
    """Loss and top-1 per epoch: baseline epochs, then fine-tuning epochs after a marker."""
    if not run.curves:
        return "no metrics.jsonl in baseline/ or finetune/"
    plt = _pyplot()
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    styles = {"baseline": "#2b7bba", "finetune": "#e6550d"}
    for stage in ("baseline", "finetune"):
        rows = run.curves.get(stage)
        if not rows:
            continue
        x = [offset + r["epoch"] + 1 for r in rows]
        for ax, key in ((ax_loss, "loss"), (ax_top1, "top1")):
            ax.plot(
                x,
                [r[f"train_{key}"] for r in rows],
                "--",
                color=styles[stage],
                label=f"{stage} train",
            )
            ax.plot(
                x,
                [r[f"val_{key}"] for r in rows],
                "-o",
                ms=3,
                color=styles[stage],
                label=f"{stage} val",
            )
        if stage == "baseline":
            offset = max(x)
    pruned = run.summary.get("rows", {}).get("pruned", {}).get("top1")
    if "finetune" in run.curves and "baseline" in run.curves:
        for ax in (ax_loss, ax_top1):
            ax.axvline(offset + 0.5, color="grey", ls=":", lw=1)
        if pruned is not None:
            ax_top1.plot([offset + 0.5], [pruned], "kx", ms=8, label="right after pruning")
    losses = [
        r[k] for rows in run.curves.values() for r in rows for k in ("train_loss", "val_loss")
    ]
    if _score_scale(losses) == "log":  # e.g. a huge first-epoch val loss (BN statistics)
        _set_scale(ax_loss.yaxis, ax_loss.set_yscale, "log")
    for ax, label in ((ax_loss, "cross-entropy loss"), (ax_top1, "top-1 accuracy (%)")):
        ax.set_xlabel("epoch (baseline, then fine-tuning)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_title("Loss per epoch")
    ax_top1.set_title("Top-1 per epoch (dotted line: pruning)")
    fig.tight_layout()
    _save_figure(fig, path)
    return None


# file name -> (title, figure function)
FIGURES: dict[str, tuple[str, Callable[[RunData, Path], str | None]]] = {
    "report_widths.png": ("Kept vs original width per group", figure_widths),
    "report_scores.png": ("Score distribution per group", figure_scores),
    "report_training.png": ("Training curves", figure_training),
}


# ----------------------------------------------------------------------------------- latency


def _baseline_path(run: RunData) -> Path | None:
    given = run.config.get("checkpoint")
    path = Path(given) if given else run.run_dir / "baseline" / "best.pt"
    return path if path.is_file() else None


def measure_latencies(run: RunData, device=None, repeats: int = 20) -> tuple[dict[str, dict], str]:
    """Batch-1 latency of the fine-tuned model (``model.chip``) and of the baseline.

    Returns ``({row label: LatencyResult.to_dict()}, note)``; rows whose artifacts are missing
    are absent and ``note`` says why.
    """
    from chip.artifact import load, load_info
    from chip.latency import measure_latency
    from chip.models import create

    size = run.summary.get("input_size")
    final = run.run_dir / "model.chip"
    if not size or not final.is_file():
        return {}, "latency omitted: model.chip or the input size is missing"
    shape = (1, *size[1:])
    out = {
        "fine-tuned": measure_latency(
            load(final), shape, device=device, warmup=5, repeats=repeats
        ).to_dict()
    }
    base = _baseline_path(run)
    info = load_info(final)
    if base is None or info.get("arch") is None:
        return out, "baseline latency omitted: no baseline checkpoint in the run"
    model = create(
        info["arch"],
        **(info.get("kwargs") or {}),
        checkpoint=base,
        trust_code=bool(run.config.get("trust_code", False)),
    )
    out["baseline"] = measure_latency(
        model, shape, device=device, warmup=5, repeats=repeats
    ).to_dict()
    return out, ""


# ---------------------------------------------------------------------------------- markdown

_ROWS = (("baseline", "eval_baseline"), ("pruned", "eval_pruned"), ("fine-tuned", "eval_final"))


def summarize(cfg: Mapping, results: Mapping[str, dict]) -> dict:
    """The summary dict: per-row params/MACs/top-1/top-5, widths and stage results."""
    rows = {}
    for label, stage in _ROWS:
        r = results.get(stage, {})
        rows[label] = {k: r.get(k) for k in ("params", "macs", "top1", "top5", "n")}
    plan = results.get("plan", {})
    return {
        "arch": cfg["arch"],
        "data": cfg["data"]["name"],
        "target": plan.get("target"),
        "macs_convention": results.get("eval_baseline", {}).get("macs_convention"),
        "input_size": results.get("eval_baseline", {}).get("input_size"),
        "rows": rows,
        "best_finetune_top1": results.get("finetune", {}).get("best_top1"),
        "channels": plan.get("channels", {}),
        "widths": plan.get("widths", {}),
        "stages": dict(results),
    }


def summary_markdown(summary: Mapping) -> str:
    """``summary.md``: the before/after table (:func:`results_table`) and the per-group widths."""
    shape = "x".join(str(v) for v in (summary.get("input_size") or [])[1:]) or "-"
    lines = [
        f"# chip run: {summary['arch']} on {summary['data']}, target {summary['target']}",
        "",
        f"MACs: {summary['macs_convention']}, input {shape}. "
        "Top-1/top-5 in percent on the validation set.",
        "",
    ]
    lines += results_table(summary)
    lines += [""] + widths_table(
        list(summary["widths"]),
        [summary["channels"].get(n, "-") for n in summary["widths"]],
        list(summary["widths"].values()),
    )
    return "\n".join(lines) + "\n"


def _m(value) -> str:
    from chip.counting import format_count

    return "-" if value is None else format_count(value)


def _cut(value, base) -> str:
    return "-" if value is None or not base else f"{100 * (1 - value / base):.1f}%"


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def results_table(summary: Mapping, latency: Mapping[str, dict] | None = None) -> list[str]:
    """Markdown table: params, MACs, (batch-1 latency,) top-1/top-5 of every row of a summary.
    Without ``latency`` the latency columns are left out."""
    rows = summary.get("rows", {})
    base = rows.get("baseline", {})
    timed = latency is not None
    latency = latency or {}
    base_ms = latency.get("baseline", {}).get("median_ms")
    head = "| model | params | MACs | params cut | MACs cut |"
    rule = "|---|---:|---:|---:|---:|"
    if timed:
        head, rule = head + " latency b1 (ms) | speed-up |", rule + "---:|---:|"
    lines = [head + " top-1 (%) | top-5 (%) |", rule + "---:|---:|"]
    for label, row in rows.items():
        line = (
            f"| {label} | {_m(row.get('params'))} | {_m(row.get('macs'))} | "
            f"{_cut(row.get('params'), base.get('params'))} | "
            f"{_cut(row.get('macs'), base.get('macs'))} |"
        )
        if timed:
            ms = latency.get(label, {}).get("median_ms")
            speed = f"{base_ms / ms:.2f}x" if ms and base_ms else "-"
            line += f" {_num(ms, '.3f')} | {speed} |"
        lines.append(line + f" {_num(row.get('top1'))} | {_num(row.get('top5'))} |")
    return lines


def widths_table(names: Sequence[str], channels: Sequence, kept: Sequence) -> list[str]:
    """Markdown table of kept vs original channels per group."""
    lines = ["| group | channels | kept |", "|---|---:|---:|"]
    return lines + [f"| {n} | {c} | {k} |" for n, c, k in zip(names, channels, kept)]


def report_markdown(
    run: RunData, figures: Mapping[str, str | None], latency: Mapping[str, dict], latency_note: str
) -> str:
    """The text of ``report.md``; ``figures`` maps file name -> None (written) or why not."""
    s = run.summary
    shape = "x".join(str(v) for v in (s.get("input_size") or [])[1:]) or "-"
    lines = [
        f"# chip report: {s.get('arch')} on {s.get('data')}, target {s.get('target')}",
        "",
        f"Run directory `{run.run_dir}`. Criterion: {run.criterion}. MACs: "
        f"{s.get('macs_convention')}, input {shape}. Top-1/top-5 on the validation set; "
        "'fine-tuned' is the best fine-tuning epoch.",
        "",
    ]
    lines += results_table(s, latency)
    lat = next(iter(latency.values()), None)
    if lat is not None:
        lines += [
            "",
            f"Latency: median of {lat['repeats']} forward passes at batch 1 on "
            f"{lat['device']} ({lat['threads']} threads), `chip.measure_latency`.",
        ]
    if latency_note:
        lines += ["", f"Note: {latency_note}."]
    if s.get("best_finetune_top1") is not None:
        lines += ["", f"Best fine-tuning top-1: {s['best_finetune_top1']:.2f}%."]
    for name, (title, _) in FIGURES.items():
        why = figures.get(name)
        lines += ["", f"## {title}", ""]
        if (run.run_dir / name).is_file():  # figures are removed before drawing
            lines.append(f"![{title}]({name})")
            if why:
                lines += ["", f"({why}.)"]
        else:
            lines.append(f"Not drawn: {why}.")
    names, channels, kept = _widths(run)
    if names:
        lines += ["", "## Widths", ""] + widths_table(names, channels, kept)
    return "\n".join(lines) + "\n"


def write_report(run_dir, *, latency: bool = True, device=None) -> Path:
    """Write ``RUN_DIR/report.md`` and its PNG figures; returns the Markdown path.

    Args:
        run_dir: a ``chip run`` output directory (needs ``summary.json``).
        latency: measure batch-1 latency of the baseline and fine-tuned models.
        device: where to measure latency (default: CPU).
    """
    run = load_run(run_dir)
    figures = {}
    for name, (_, draw) in FIGURES.items():
        (run.run_dir / name).unlink(missing_ok=True)  # no stale figure of an earlier report
        figures[name] = draw(run, run.run_dir / name)
    lat, note = measure_latencies(run, device) if latency else ({}, "latency not measured")
    path = run.run_dir / "report.md"
    with atomic_write(path, "w") as f:
        f.write(report_markdown(run, figures, lat, note))
    return path
