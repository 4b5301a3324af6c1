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

The config schema is :data:`SCHEMA` (documented in ``configs/README.md``).
"""

from __future__ import annotations

import copy
import dataclasses
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
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset, Subset

from chip.errors import ChipError
from chip.utils import atomic_write

__all__ = [
    "SCHEMA",
    "STAGES",
    "TARGET_KINDS",
    "build_data",
    "coerce_value",
    "data_info",
    "default_config",
    "load_config",
    "merge_overrides",
    "resolve_target",
    "run",
    "train_config",
    "validate_config",
]

logger = logging.getLogger("chip.pipeline")

# ------------------------------------------------------------------------------------ schema

_NONE = type(None)
_NUM = (int, float)


def _train_field_types() -> dict[str, tuple[type, ...]]:
    """TrainConfig field -> accepted YAML types (from the field defaults)."""
    from chip.train import TrainConfig

    types = {}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        by_default = {bool: (bool,), int: (int,), float: _NUM, str: (str,), tuple: (list, tuple)}
        types[f.name] = by_default.get(type(default), _NUM + (_NONE,))
    return types


# dotted key -> (accepted types, default, one-line description); sections "baseline" and
# "finetune" take TrainConfig keys, "target" exactly one of TARGET_KINDS plus round_to.
SCHEMA: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "arch": ((str,), None, "zoo architecture (chip.models.list_models())"),
    "num_classes": ((int, _NONE), None, "classifier outputs (default: the dataset's)"),
    "checkpoint": ((str, _NONE), None, "trained baseline weights; none = train from scratch"),
    "unsafe_pickle": ((bool,), False, "allow full unpickling of a trusted checkpoint"),
    "seed": ((int,), 0, "seeds calibration, data subsets and training"),
    "device": ((str, _NONE), None, "cpu, cuda, cuda:1 ... (default: cuda if available)"),
    "threads": ((int, _NONE), None, "torch CPU threads (default: torch's choice)"),
    "out_dir": ((str,), "runs/chip", "run directory (stages resume from it)"),
    "data.name": ((str,), None, "dataset name (chip.data.dataset_names())"),
    "data.root": ((str, _NONE), None, "dataset directory (default: the dataset's)"),
    "data.batch_size": ((int,), 128, "evaluation batch size; training default"),
    "data.workers": ((int,), 0, "DataLoader worker processes"),
    "data.image_size": ((int, _NONE), None, "resize images to this size"),
    "data.train_subset": ((int, _NONE), None, "use at most N training images (seeded)"),
    "data.val_subset": ((int, _NONE), None, "evaluate on at most N images (seeded)"),
    "data.options": ((dict,), {}, "extra dataset options (e.g. synthetic train_size)"),
    "data.download": ((bool,), False, "download CIFAR-10/100 or MNIST if missing (needs a network)"),
    "calibration.batches": ((int,), 5, "calibration batches"),
    "calibration.batch_size": ((int,), 128, "calibration batch size"),
    "calibration.criterion": ((str,), "chip", "chip (channel independence) or hrank"),
    "target.sparsity": ((str,), None, "reference sparsity string '[0.]+[0.4]*27'"),
    "target.rate": (_NUM, None, "uniform fraction of channels removed per group"),
    "target.flops": (_NUM, None, "fraction of the baseline MACs to keep"),
    "target.params": (_NUM, None, "fraction of the baseline params to keep"),
    "target.layers": ((dict,), None, "{group or layer name: rate}"),
    "target.round_to": ((int,), 1, "kept widths become multiples of this"),
}
TRAIN_SECTIONS = {
    "baseline": "training from scratch when no checkpoint is given",
    "finetune": "fine-tuning of the pruned model (default: the paper's CIFAR recipe)",
}
# TrainConfig defaults differ for training from scratch (the fine-tuning ones are the paper's)
BASELINE_DEFAULTS = {"epochs": 200, "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1}
REQUIRED = ("arch", "data.name")
# integer keys and their smallest valid value (when not null)
MINIMUM = {"num_classes": 1, "threads": 1, "data.batch_size": 1, "data.workers": 0,
           "data.image_size": 1, "data.train_subset": 1, "data.val_subset": 1,
           "calibration.batches": 1, "calibration.batch_size": 1, "target.round_to": 1}


def _section_types() -> dict[str, tuple[type, ...]]:
    types = {k: v[0] for k, v in SCHEMA.items()}
    for section in TRAIN_SECTIONS:
        types.update({f"{section}.{k}": t for k, t in _train_field_types().items()})
    return types


def valid_keys() -> list[str]:
    """Every dotted config key."""
    return list(_section_types())


def default_config() -> dict:
    """The nested config with every default filled in (``baseline``/``finetune`` empty)."""
    cfg: dict[str, Any] = {section: {} for section in TRAIN_SECTIONS}
    for key, (_, default, _) in SCHEMA.items():
        if default is not None or not key.startswith("target."):
            _set(cfg, key, copy.deepcopy(default))
    return cfg


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ChipError(f"config key {p!r} must be a mapping to set {dotted!r}")
    node[last] = value


def _flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested -> dotted keys; mappings under known mapping-valued keys stay whole."""
    types = _section_types()
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and dict not in types.get(key, ()):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    cfg: dict[str, Any] = {}
    for k, v in flat.items():
        _set(cfg, k, v)
    return cfg


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "int", float: "number", str: "string", bool: "bool", dict: "mapping",
             list: "list", tuple: "list", _NONE: "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ChipError(f"config key {key!r} must be {_type_names(types)}, got {value!r}")


def validate_config(cfg: Mapping) -> dict:
    """Merge ``cfg`` over the defaults, check keys, types and targets; return the full config.

    Unknown keys raise a one-line :class:`ChipError` listing the valid ones.
    """
    if not isinstance(cfg, Mapping):
        raise ChipError(f"a config must be a mapping of keys to values, got {type(cfg).__name__}")
    types = _section_types()
    flat = _flatten(default_config())
    given = _flatten(cfg)
    sections = {k.split(".")[0] for k in types if "." in k}
    scalar = sorted(k for k in given if k in sections - set(TRAIN_SECTIONS))
    if scalar:
        keys = ", ".join(k for k in types if k.startswith(scalar[0] + "."))
        raise ChipError(f"config key {scalar[0]!r} must be a mapping with keys {keys}")
    unknown = sorted(k for k in given if k not in types and k not in TRAIN_SECTIONS)
    if unknown:
        raise ChipError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(types)}")
    target_given = [k for k in given if k.startswith("target.") and k != "target.round_to"]
    for key, value in given.items():
        if key in TRAIN_SECTIONS:  # e.g. "finetune: {}" or "finetune:" (null)
            if value not in (None, {}):
                raise ChipError(f"config key {key!r} must be a mapping of TrainConfig keys")
            continue
        _check_type(key, value, types[key])
        if key in MINIMUM and value is not None and value < MINIMUM[key]:
            raise ChipError(f"config key {key!r} must be >= {MINIMUM[key]}, got {value!r}")
        flat[key] = value
    missing = [k for k in REQUIRED if flat.get(k) is None]
    if missing:
        raise ChipError(f"config key {missing[0]!r} is required")
    full = _unflatten(flat)
    for section in TRAIN_SECTIONS:
        full.setdefault(section, {})
    full["target"] = {k: v for k, v in full.get("target", {}).items() if v is not None}
    if not target_given:
        raise ChipError(f"config needs a pruning target: one of {', '.join('target.' + k for k in TARGET_KINDS)}")
    resolve_target(full["target"])
    for section in TRAIN_SECTIONS:
        train_config(full, section)
    return full


def load_config(path) -> dict:
    """Read a YAML config file (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ChipError(f"config file not found: {path} (expected a YAML file, see configs/README.md)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ChipError(f"config file {path} is not valid YAML ({problem}{where})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ChipError(f"config file {path} must hold a mapping of keys to values")
    return cfg


def coerce_value(key: str, text: str) -> Any:
    """Turn a command-line string into a config value of ``key``'s type (YAML scalars)."""
    types = _section_types().get(key)
    if types is None:
        raise ChipError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    if types[0] is str:  # names, paths, sparsity strings: verbatim ('null' clears optional ones)
        return None if text in ("null", "none", "None") and _NONE in types else text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ChipError(f"cannot parse value {text!r} for {key!r}; expected {_type_names(types)}") from None
    _check_type(key, value, types)
    return value


def merge_overrides(cfg: Mapping, overrides: Mapping[str, Any]) -> dict:
    """Copy of ``cfg`` with dotted-key ``overrides`` set; a target kind replaces the other kinds."""
    out = copy.deepcopy(dict(cfg))
    for key, value in overrides.items():
        kind = key.split(".", 1)[1] if key.startswith("target.") else None
        if kind in TARGET_KINDS and isinstance(out.get("target"), dict):
            for other in TARGET_KINDS:
                out["target"].pop(other, None)
        _set(out, key, value)
    return out


# ------------------------------------------------------------------------------------ targets

# target kind -> plan target (see chip.planning.parse_target)
TARGET_KINDS: dict[str, Callable[[Any], Any]] = {
    "sparsity": str,
    "rate": float,
    "flops": lambda v: f"flops={v}",
    "params": lambda v: f"params={v}",
    "layers": dict,
}


def resolve_target(section: Mapping) -> Any:
    """The :func:`chip.plan` target of a ``target:`` section (exactly one kind)."""
    from chip.planning import parse_target

    kinds = [k for k in TARGET_KINDS if section.get(k) is not None]
    if len(kinds) != 1:
        given = ", ".join(kinds) or "none"
        raise ChipError(f"give exactly one pruning target ({', '.join(TARGET_KINDS)}), got {given}")
    target = TARGET_KINDS[kinds[0]](section[kinds[0]])
    kind, value = parse_target(target)
    if kind == "sparsity":
        from chip.planning import parse_sparsity

        parse_sparsity(value)
    return target


def train_config(cfg: Mapping, section: str):
    """The :class:`chip.train.TrainConfig` of ``cfg[section]`` (seed and batch size defaulted)."""
    from chip.train import TrainConfig

    values = dict(BASELINE_DEFAULTS) if section == "baseline" else {}
    values.update({"seed": cfg["seed"], "batch_size": cfg["data"]["batch_size"]})
    values.update(cfg.get(section) or {})
    tc = TrainConfig.from_dict(values)
    if tc.warmup_epochs >= tc.epochs and tc.schedule == "cosine":
        raise ChipError(f"{section}.warmup_epochs ({tc.warmup_epochs}) must be smaller than "
                        f"{section}.epochs ({tc.epochs}) for the cosine schedule")
    return tc


# --------------------------------------------------------------------------------------- data


class Resized(Dataset):
    """Bilinear (antialiased) resize of every image tensor to ``size`` x ``size``."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        return image, label


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most ``n`` items (indices ascending), or the dataset."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ChipError(f"subset size must be a positive int, got {n}")
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, sorted(torch.randperm(len(dataset), generator=g)[:n].tolist()))


def _dataset_options(name: str, image_size: int | None, options: Mapping | None) -> tuple[dict, bool]:
    """Options for chip.data and whether the images still need resizing here."""
    from chip.data import DATASETS

    opts = dict(options or {})
    entry = DATASETS.get(name.lower())
    native = entry is not None and "image_size" in entry.options
    if image_size is not None and native:
        opts["image_size"] = image_size
    return opts, image_size is not None and not native


def data_info(name: str, root=None, image_size: int | None = None, options: Mapping | None = None):
    """The :class:`chip.data.DatasetInfo` of a dataset as :func:`build_data` yields it."""
    from chip.data import get_dataset_info

    opts, resize = _dataset_options(name, image_size, options)
    info = get_dataset_info(name, root, **opts)
    if resize:
        info = dataclasses.replace(info, image_size=(image_size, image_size))
    return info


def build_data(name: str, root=None, *, image_size: int | None = None,
               train_subset: int | None = None, val_subset: int | None = None,
               options: Mapping | None = None, seed: int = 0, train_augment: bool = True,
               download: bool = False):
    """``(train, val, info)`` of :func:`chip.data.build_datasets` with resizing and subsets."""
    from chip.data import build_datasets

    opts, resize = _dataset_options(name, image_size, options)
    train, val, info = build_datasets(name, root, train_augment=train_augment, download=download,
                                      **opts)
    if resize:
        train, val = Resized(train, image_size), Resized(val, image_size)
        info = dataclasses.replace(info, image_size=(image_size, image_size))
    return _subset(train, train_subset, seed), _subset(val, val_subset, seed + 1), info


# ------------------------------------------------------------------------------------- stages


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
        d = self.cfg["data"]
        return build_data(d["name"], d["root"], image_size=d["image_size"],
                          train_subset=d["train_subset"], val_subset=d["val_subset"],
                          options=d["options"], seed=self.cfg["seed"], download=d["download"])

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

        return build_loader(self.datasets[0], batch_size, train=True,
                            workers=self.cfg["data"]["workers"], seed=seed)

    def new_model(self, checkpoint=None) -> nn.Module:
        """The zoo model; its random initialisation is seeded with ``seed``."""
        from chip.models import create
        from chip.utils import seed_everything

        seed_everything(self.cfg["seed"])
        num_classes = self.cfg["num_classes"] or self.info.num_classes
        return create(self.cfg["arch"], num_classes=num_classes, in_channels=self.info.in_channels,
                      checkpoint=checkpoint, unsafe_pickle=self.cfg["unsafe_pickle"])

    def baseline_model(self) -> nn.Module:
        path = self.cfg["checkpoint"] or self.out_dir / "baseline" / "best.pt"
        return self.new_model(checkpoint=path)


def _evaluate(ctx: RunContext, model: nn.Module) -> dict:
    from chip.counting import CONVENTION, count
    from chip.train import evaluate

    counts = count(model, ctx.input_size)
    metrics = evaluate(model.to(ctx.device), ctx.val_loader(), ctx.device)
    return {**metrics, "params": counts.params, "macs": counts.macs, "macs_convention": CONVENTION,
            "input_size": list(ctx.input_size)}


def _fit(ctx: RunContext, model: nn.Module, section: str, extra: dict | None = None) -> dict:
    from chip.train import fit

    tc = train_config(ctx.cfg, section)
    out = ctx.out_dir / section
    result = fit(model, ctx.train_loader(tc.batch_size, tc.seed), ctx.val_loader(), tc, out,
                 device=ctx.device, resume=ctx.resume, extra=extra, progress=ctx.progress)
    return {"best_top1": result["best_top1"], "best_epoch": result["best_epoch"],
            "epochs": tc.epochs, "checkpoint": str(Path(section) / "best.pt")}


def _save_artifact(model: nn.Module, path: Path, extra: dict) -> None:
    from chip.artifact import save

    save(model, path, extra=extra)


def _load_artifact(path: Path) -> nn.Module:
    from chip.artifact import load

    return load(path)


def stage_baseline(ctx: RunContext) -> dict:
    if ctx.cfg["checkpoint"]:
        ctx.baseline_model()  # fail early if it does not load
        return {"source": "checkpoint", "checkpoint": ctx.cfg["checkpoint"]}
    model = ctx.new_model()
    return {"source": "trained", **_fit(ctx, model, "baseline")}


def stage_eval_baseline(ctx: RunContext) -> dict:
    return _evaluate(ctx, ctx.baseline_model())


def stage_score(ctx: RunContext) -> dict:
    from chip.calibration import calibrate
    from chip.data import calibration_loader

    c = ctx.cfg["calibration"]
    loader = calibration_loader(ctx.datasets[0], c["batches"], c["batch_size"], ctx.cfg["seed"])
    t0 = time.perf_counter()
    scores = calibrate(ctx.baseline_model(), loader, c["batches"], ctx.device, ctx.cfg["seed"],
                       c["criterion"], progress=ctx.progress)
    scores.save(ctx.out_dir / "scores.safetensors")
    return {"groups": len(scores.groups), "samples": scores.num_samples,
            "seconds": time.perf_counter() - t0, "criterion": c["criterion"]}


def stage_plan(ctx: RunContext) -> dict:
    from chip.calibration import ChannelScores
    from chip.planning import plan

    scores = ChannelScores.load(ctx.out_dir / "scores.safetensors")
    t = ctx.cfg["target"]
    p = plan(ctx.baseline_model(), scores, resolve_target(t), round_to=t["round_to"],
             input_size=ctx.input_size)
    p.save(ctx.out_dir / "plan.json")
    return {**p.stats, "widths": p.widths(), "channels": {k: g.channels for k, g in p.groups.items()},
            "target": p.target}


def stage_prune(ctx: RunContext) -> dict:
    from chip.counting import count
    from chip.planning import PruningPlan
    from chip.prune import apply

    p = PruningPlan.load(ctx.out_dir / "plan.json")
    pruned = apply(ctx.baseline_model(), p)
    counts = count(pruned, ctx.input_size)
    _save_artifact(pruned, ctx.out_dir / "pruned.chip",
                   {"stage": "pruned", "target": p.target, "params": counts.params,
                    "macs": counts.macs, "input_size": list(ctx.input_size)})
    return {"params": counts.params, "macs": counts.macs}


def stage_eval_pruned(ctx: RunContext) -> dict:
    return _evaluate(ctx, _load_artifact(ctx.out_dir / "pruned.chip"))


def stage_finetune(ctx: RunContext) -> dict:
    from chip.train import load_checkpoint

    model = _load_artifact(ctx.out_dir / "pruned.chip")
    result = _fit(ctx, model, "finetune")
    load_checkpoint(ctx.out_dir / "finetune" / "best.pt", model)
    _save_artifact(model, ctx.out_dir / "model.chip",
                   {"stage": "finetuned", "best_top1": result["best_top1"],
                    "best_epoch": result["best_epoch"], "input_size": list(ctx.input_size)})
    return result


def stage_eval_final(ctx: RunContext) -> dict:
    return _evaluate(ctx, _load_artifact(ctx.out_dir / "model.chip"))


def stage_summary(ctx: RunContext) -> dict:
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


_DATA_KEYS = ("arch", "num_classes", "data.name", "data.root", "data.image_size",
              "data.train_subset", "data.val_subset", "data.options", "seed")

STAGES: tuple[Stage, ...] = (
    Stage("baseline", stage_baseline, _DATA_KEYS + ("checkpoint", "baseline", "data.batch_size"),
          ("baseline",)),
    Stage("eval_baseline", stage_eval_baseline),
    Stage("score", stage_score, ("calibration",), ("scores.safetensors",)),
    Stage("plan", stage_plan, ("target",), ("plan.json",)),
    Stage("prune", stage_prune, (), ("pruned.chip",)),
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
    blob = json.dumps([previous, stage.name, {k: _lookup(cfg, k) for k in stage.keys}],
                      sort_keys=True, default=str)
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


def run(config: Mapping, *, progress: bool = True, fresh: bool = False) -> dict:
    """Run (or resume) the whole pipeline; returns the summary dict (also in ``summary.json``).

    Args:
        config: a config mapping (see :data:`SCHEMA`); validated here.
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
    (out_dir / "stages").mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", cfg)
    with atomic_write(out_dir / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    ctx = RunContext(cfg, out_dir, progress)
    fp, upstream_ran = "", fresh
    for stage in STAGES:
        fp = _fingerprint(fp, stage, cfg)
        marker, started = out_dir / "stages" / f"{stage.name}.json", out_dir / "stages" / f"{stage.name}.started"
        done = None if upstream_ran else _read_json(marker)
        if done is not None and done.get("fingerprint") == fp and not stage.always:
            ctx.results[stage.name] = done["result"]
            logger.info("[%s] done earlier, skipped", stage.name)
            continue
        # only the first stage that runs may continue an interrupted attempt of itself; once a
        # stage has run, every later stage starts afresh (its inputs may have changed)
        ctx.resume = (not upstream_ran and not stage.always
                      and (_read_json(started) or {}).get("fingerprint") == fp)
        upstream_ran = upstream_ran or not stage.always
        if not ctx.resume:
            _clear(out_dir, stage.outputs)
        marker.unlink(missing_ok=True)
        _write_json(started, {"fingerprint": fp})
        logger.info("[%s] %s", stage.name, "resuming" if ctx.resume else "running")
        t0 = time.perf_counter()
        result = stage.fn(ctx)
        ctx.results[stage.name] = result
        _write_json(marker, {"fingerprint": fp, "result": result,
                             "seconds": round(time.perf_counter() - t0, 3)})
    try:  # report.md + figures; the run's results are saved already, so never fatal
        from chip import report

        report.write_report(out_dir, device=ctx.device)
    except Exception as exc:  # noqa: BLE001 - any report failure is only a warning
        logger.warning("report not written: %s: %s", type(exc).__name__, exc)
    return summarize(cfg, ctx.results)


# ------------------------------------------------------------------------------------ summary

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


def _fmt(value, scale: float = 1e6, unit: str = "M", digits: int = 3) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{unit}"


def _shape(size) -> str:
    return "-" if not size else "x".join(str(s) for s in size[1:])


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_markdown(summary: Mapping) -> str:
    """Markdown: the before/after table and the per-group widths."""
    base = summary["rows"]["baseline"]
    lines = [
        f"# chip run: {summary['arch']} on {summary['data']}, target {summary['target']}",
        "",
        f"MACs: {summary['macs_convention']}, input {_shape(summary['input_size'])}. "
        "Top-1/top-5 in percent on the validation set.",
        "",
        "| model | params | MACs | params cut | MACs cut | top-1 | top-5 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in summary["rows"].items():
        cut = {k: ("-" if row[k] is None or not base[k] else f"{100 * (1 - row[k] / base[k]):.1f}%")
               for k in ("params", "macs")}
        lines.append(f"| {label} | {_fmt(row['params'])} | {_fmt(row['macs'])} | {cut['params']} | "
                     f"{cut['macs']} | {_pct(row['top1'])} | {_pct(row['top5'])} |")
    lines += ["", "| group | channels | kept |", "|---|---:|---:|"]
    for name, kept in summary["widths"].items():
        lines.append(f"| {name} | {summary['channels'].get(name, '-')} | {kept} |")
    return "\n".join(lines) + "\n"
