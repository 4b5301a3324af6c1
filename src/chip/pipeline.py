"""``chip run``: the whole CHIP pipeline into one run directory, resumable stage by stage.

    summary = chip.pipeline.run({"arch": "resnet20", "data": {"name": "digits"},
                                 "target": {"flops": 0.5}, "out_dir": "runs/x"})

Stages (:data:`STAGES`), each writing its outputs into ``out_dir``:

==============  ==============================================================================
baseline        train from scratch (``baseline/``: best.pt, last.pt, metrics.jsonl), or use
                the given ``checkpoint``
eval_baseline   top-1/top-5, params, MACs of the unpruned model
score           calibration pass: ``scores.safetensors``
plan            ``plan.json`` (kept channels of every group, counts)
prune           surgery: ``pruned.chip``
eval_pruned     accuracy right after pruning, before fine-tuning
finetune        ``finetune/`` (best.pt, last.pt, metrics.jsonl) and ``model.chip`` (best epoch)
eval_final      accuracy of ``model.chip``
summary         ``summary.json`` and ``summary.md`` (always rewritten)
==============  ==============================================================================

Resume: every finished stage leaves ``stages/<name>.json`` holding a fingerprint of the config keys
it depends on (chained with the previous stage's). Re-running with the same ``out_dir`` skips
stages whose fingerprint is unchanged, continues an interrupted training stage from its
``last.pt``, and redoes a stage whose inputs changed. Once one stage runs, every later stage runs
again too, from scratch.

Configs are validated by :func:`chip.config.validate_config` (keys in ``configs/README.md``)
before any stage runs; the summary is written by :mod:`chip.report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from chip.config import resolve_target, train_config, validate_config
from chip.errors import ChipError
from chip.utils import atomic_write

__all__ = ["STAGES", "preflight", "run"]

logger = logging.getLogger("chip.pipeline")


@dataclass
class RunContext:
    """What the stages share: the validated config, the run directory and cached data."""

    cfg: dict
    out_dir: Path
    progress: bool = True
    results: dict[str, dict] = field(default_factory=dict)
    resume: bool = False  # set per stage: continue an interrupted run of this very stage

    @cached_property
    def device(self) -> torch.device:
        from chip.utils import resolve_device

        return resolve_device(self.cfg["device"])

    @cached_property
    def datasets(self):
        from chip.data import build_data

        d = self.cfg["data"]
        return build_data(
            d["name"],
            d["root"],
            image_size=d["image_size"],
            train_subset=d["train_subset"],
            val_subset=d["val_subset"],
            options=d["options"],
            seed=self.cfg["seed"],
            download=d["download"],
        )

    @property
    def info(self):
        return self.datasets[2]

    @property
    def input_size(self) -> tuple[int, ...]:
        return (1, self.info.in_channels, *self.info.image_size)

    def val_loader(self):
        from chip.data import build_loader

        d = self.cfg["data"]
        return build_loader(self.datasets[1], d["batch_size"], train=False, workers=d["workers"])

    def train_loader(self, batch_size: int, seed: int):
        from chip.data import build_loader

        return build_loader(
            self.datasets[0], batch_size, train=True, workers=self.cfg["data"]["workers"], seed=seed
        )

    def calibration_loader(self, num_batches: int):
        """``num_batches`` seeded batches of augmented training images at the calibration batch
        size (scoring, sensitivity, BatchNorm re-estimation)."""
        from chip.data import calibration_loader

        c = self.cfg["calibration"]
        return calibration_loader(self.datasets[0], num_batches, c["batch_size"], self.cfg["seed"])

    def new_model(self, checkpoint=None) -> nn.Module:
        """The configured model (``arch`` is any model source); its random initialisation is
        seeded with ``seed``."""
        from chip.models import create
        from chip.models.sources import build_kwargs
        from chip.utils import seed_everything

        seed_everything(self.cfg["seed"])
        kwargs = build_kwargs(
            self.cfg["arch"],
            self.cfg["model_kwargs"],
            num_classes=self.cfg["num_classes"],
            data=(self.info.num_classes, self.info.in_channels),
            trust_code=self.cfg["trust_code"],
        )
        return create(
            self.cfg["arch"], checkpoint=checkpoint, trust_code=self.cfg["trust_code"], **kwargs
        )

    def baseline_model(self) -> nn.Module:
        path = self.cfg["checkpoint"] or self.out_dir / "baseline" / "best.pt"
        return self.new_model(checkpoint=path)


def _evaluate(ctx: RunContext, model: nn.Module) -> dict:
    from chip.counting import CONVENTION, count
    from chip.train import evaluate

    counts = count(model, ctx.input_size)
    metrics = evaluate(model.to(ctx.device), ctx.val_loader(), ctx.device)
    return {
        **metrics,
        "params": counts.params,
        "macs": counts.macs,
        "macs_convention": CONVENTION,
        "input_size": list(ctx.input_size),
    }


def _fit(ctx: RunContext, model: nn.Module, section: str, extra: dict | None = None) -> dict:
    from chip.train import fit

    tc = train_config(ctx.cfg, section)
    out = ctx.out_dir / section
    result = fit(
        model,
        ctx.train_loader(tc.batch_size, tc.seed),
        ctx.val_loader(),
        tc,
        out,
        device=ctx.device,
        resume=ctx.resume,
        extra=extra,
        progress=ctx.progress,
    )
    return {
        "best_top1": result["best_top1"],
        "best_epoch": result["best_epoch"],
        "epochs": tc.epochs,
        "checkpoint": str(Path(section) / "best.pt"),
    }


def stage_baseline(ctx: RunContext) -> dict:
    if ctx.cfg["checkpoint"]:
        ctx.baseline_model()  # fail early if it does not load
        return {"source": "checkpoint", "checkpoint": ctx.cfg["checkpoint"]}
    model = ctx.new_model()
    return {"source": "trained", **_fit(ctx, model, "baseline")}


def stage_eval_baseline(ctx: RunContext) -> dict:
    return _evaluate(ctx, ctx.baseline_model())


def stage_score(ctx: RunContext) -> dict:
    from chip.criteria import score

    c = ctx.cfg["calibration"]
    loader = ctx.calibration_loader(c["batches"])
    t0 = time.perf_counter()
    scores = score(
        ctx.baseline_model(),
        loader,
        c["criterion"],
        num_batches=c["batches"],
        seed=ctx.cfg["seed"],
        device=ctx.device,
        progress=ctx.progress,
    )
    scores.save(ctx.out_dir / "scores.safetensors")
    return {
        "groups": len(scores.groups),
        "samples": scores.num_samples,
        "seconds": time.perf_counter() - t0,
        "criterion": c["criterion"],
    }


def stage_plan(ctx: RunContext) -> dict:
    from chip.calibration import ChannelScores
    from chip.planning import Allocation, measures_latency, plan

    scores = ChannelScores.load(ctx.out_dir / "scores.safetensors")
    t = ctx.cfg["target"]
    allocation = Allocation(ctx.cfg["plan"]["allocation"], seed=ctx.cfg["seed"])
    model, data = ctx.baseline_model(), None
    if allocation.name == "sensitivity":
        data = ctx.calibration_loader(allocation.batches)
    target = resolve_target(t)
    if allocation.name == "sensitivity" or measures_latency(target, t["round_to"]):
        # measured on the run's device
        model = model.to(ctx.device)
    t0 = time.perf_counter()
    p = plan(
        model,
        scores,
        target,
        round_to=t["round_to"],
        input_size=ctx.input_size,
        allocation=allocation,
        data=data,
        progress=ctx.progress,
        latency_batch=ctx.cfg["plan"]["latency_batch"],
    )
    p.save(ctx.out_dir / "plan.json")
    return {
        **p.stats,
        "allocation": allocation.name,
        "seconds": time.perf_counter() - t0,
        "widths": p.widths(),
        "channels": {k: g.channels for k, g in p.groups.items()},
        "target": p.target,
    }


def stage_prune(ctx: RunContext) -> dict:
    from chip.artifact import save
    from chip.counting import count
    from chip.planning import PruningPlan
    from chip.prune import apply

    p = PruningPlan.load(ctx.out_dir / "plan.json")
    pruned = apply(ctx.baseline_model(), p)
    n = ctx.cfg["prune"]["recalibrate_bn"]
    if n:
        from chip.recalibration import recalibrate_bn

        recalibrate_bn(pruned.to(ctx.device), ctx.calibration_loader(n), n).cpu()
    counts = count(pruned, ctx.input_size)
    save(
        pruned,
        ctx.out_dir / "pruned.chip",
        extra={
            "stage": "pruned",
            "target": p.target,
            "params": counts.params,
            "macs": counts.macs,
            "input_size": list(ctx.input_size),
        },
    )
    return {"params": counts.params, "macs": counts.macs, "recalibrate_bn": n}


def stage_eval_pruned(ctx: RunContext) -> dict:
    from chip.artifact import load

    return _evaluate(ctx, load(ctx.out_dir / "pruned.chip"))


def stage_finetune(ctx: RunContext) -> dict:
    from chip.artifact import load, save
    from chip.train import load_training_state

    model = load(ctx.out_dir / "pruned.chip")
    result = _fit(ctx, model, "finetune")
    load_training_state(ctx.out_dir / "finetune" / "best.pt", model)
    save(
        model,
        ctx.out_dir / "model.chip",
        extra={
            "stage": "finetuned",
            "best_top1": result["best_top1"],
            "best_epoch": result["best_epoch"],
            "input_size": list(ctx.input_size),
        },
    )
    return result


def stage_eval_final(ctx: RunContext) -> dict:
    from chip.artifact import load

    return _evaluate(ctx, load(ctx.out_dir / "model.chip"))


def stage_summary(ctx: RunContext) -> dict:
    from chip.report import summarize, summary_markdown

    summary = summarize(ctx.cfg, ctx.results)
    with atomic_write(ctx.out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    with atomic_write(ctx.out_dir / "summary.md", "w") as f:
        f.write(summary_markdown(summary))
    return {}


@dataclass(frozen=True)
class Stage:
    """One pipeline step: the config keys its outputs depend on, and whether it trains."""

    name: str
    fn: Callable[[RunContext], dict]
    keys: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # removed before a fresh (not resumed) run
    always: bool = False


_DATA_KEYS = (
    "arch",
    "num_classes",
    "data.name",
    "data.root",
    "data.image_size",
    "data.train_subset",
    "data.val_subset",
    "data.options",
    "seed",
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "baseline",
        stage_baseline,
        _DATA_KEYS + ("checkpoint", "baseline", "data.batch_size"),
        ("baseline",),
    ),
    Stage("eval_baseline", stage_eval_baseline),
    Stage("score", stage_score, ("calibration",), ("scores.safetensors",)),
    Stage("plan", stage_plan, ("target", "plan"), ("plan.json",)),
    Stage("prune", stage_prune, ("prune",), ("pruned.chip",)),
    Stage("eval_pruned", stage_eval_pruned),
    Stage("finetune", stage_finetune, ("finetune",), ("finetune", "model.chip")),
    Stage("eval_final", stage_eval_final),
    Stage("summary", stage_summary, always=True),
)


def _lookup(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _fingerprint(previous: str, stage: Stage, cfg: Mapping) -> str:
    blob = json.dumps(
        [previous, stage.name, {k: _lookup(cfg, k) for k in stage.keys}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _clear(out_dir: Path, outputs: tuple[str, ...]) -> None:
    for name in outputs:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def preflight(ctx: RunContext) -> None:
    """Check what the stages will need before any of them runs, so that a wrong setting fails in
    seconds and leaves no run directory: the device exists, the output directory can be written,
    both data splits exist and are not empty, the model source builds (and fits the data), the
    checkpoint loads into it, and the target is valid for it (sparsity-string length, layer
    names, a budget it can meet)."""
    import warnings

    from chip.planning import check_allocation, measures_latency, plan
    from chip.preflight import check_data_fits, check_splits, check_writable
    from chip.utils import resolve_device

    cfg = ctx.cfg
    resolve_device(cfg["device"])
    check_writable(ctx.out_dir, "run directory")
    train, val, info = ctx.datasets
    check_splits({"training": train, "validation": val}, info.name)
    model = ctx.new_model(checkpoint=cfg["checkpoint"])
    check_data_fits(
        model, info.in_channels, info.name, cfg["arch"], info.num_classes, info.image_size
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan stage warns about groups kept whole
        target = resolve_target(cfg["target"])
        allocation = check_allocation(cfg["plan"]["allocation"], target)
        size = cfg["calibration"]["batch_size"]
        reads = {"prune.recalibrate_bn": cfg["prune"]["recalibrate_bn"]}
        if allocation.name == "sensitivity":
            reads["plan.allocation sensitivity"] = allocation.batches
        for what, batches in reads.items():
            if len(train) <= (batches - 1) * size:
                raise ChipError(
                    f"{what} reads {batches} calibration batches of {size} images but the "
                    f"training set has {len(train)}; lower calibration.batch_size or use more data"
                )
        if not measures_latency(target, 1):
            plan(  # the budget's reachability under the uniform rule (latency: at the stage)
                model,
                None,
                target,
                round_to=1 if cfg["target"]["round_to"] == "auto" else cfg["target"]["round_to"],
                input_size=ctx.input_size,
                graph=_static_graph(model, ctx.input_size),
            )


def _static_graph(model: nn.Module, input_size):
    """The unchecked group graph (enough to validate a target, and quick)."""
    from chip.groups import find_groups
    from chip.utils import example_input

    return find_groups(model, example_input(model, input_size, zeros=True), check=False)


def run(config: Mapping, *, progress: bool = True, fresh: bool = False) -> dict:
    """Run (or resume) the whole pipeline; returns the summary dict (also in ``summary.json``).

    Args:
        config: a config mapping (keys: ``configs/README.md``); validated here before anything.
        progress: show progress bars.
        fresh: ignore finished stages in ``out_dir`` and redo everything.
    """
    from chip.distributed import get_world_size, init_distributed

    cfg = validate_config(config)
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    init_distributed(cfg["device"])
    if get_world_size() > 1:
        raise ChipError("chip run is single-process; use torchrun with chip finetune / chip eval")
    out_dir = Path(cfg["out_dir"])
    ctx = RunContext(cfg, out_dir, progress)
    preflight(ctx)  # everything checkable, before the run directory exists
    (out_dir / "stages").mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", cfg)
    with atomic_write(out_dir / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    fp, upstream_ran = "", fresh
    for stage in STAGES:
        fp = _fingerprint(fp, stage, cfg)
        marker, started = (
            out_dir / "stages" / f"{stage.name}.json",
            out_dir / "stages" / f"{stage.name}.started",
        )
        done = None if upstream_ran else _read_json(marker)
        if done is not None and done.get("fingerprint") == fp and not stage.always:
            ctx.results[stage.name] = done["result"]
            logger.info("[%s] done earlier, skipped", stage.name)
            continue
        # only the first stage that runs may continue an interrupted attempt of itself; once a
        # stage has run, every later stage starts afresh (its inputs may have changed)
        ctx.resume = (
            not upstream_ran
            and not stage.always
            and (_read_json(started) or {}).get("fingerprint") == fp
        )
        upstream_ran = upstream_ran or not stage.always
        if not ctx.resume:
            _clear(out_dir, stage.outputs)
        marker.unlink(missing_ok=True)
        _write_json(started, {"fingerprint": fp})
        logger.info("[%s] %s", stage.name, "resuming" if ctx.resume else "running")
        t0 = time.perf_counter()
        result = stage.fn(ctx)
        ctx.results[stage.name] = result
        _write_json(
            marker,
            {"fingerprint": fp, "result": result, "seconds": round(time.perf_counter() - t0, 3)},
        )
    from chip import report

    try:  # report.md + figures; the run's results are saved already, so never fatal
        report.write_report(out_dir, device=ctx.device)
    except Exception as exc:  # noqa: BLE001 - any report failure is only a warning
        logger.warning("report not written: %s: %s", type(exc).__name__, exc)
    return report.summarize(cfg, ctx.results)
