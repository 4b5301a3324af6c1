"""Run configs of ``chip run``: schema, validation, YAML files and dotted ``--key value`` overrides.

The schema is :mod:`chip.options` (one entry per key, shared with the command-line flags); the keys
are documented in ``configs/README.md``. A config is checked completely before anything runs:
key names (an unknown key names the nearest valid one), types, ranges, the criterion, the target and
both training sections. Importing this module does not import torch.

    cfg = validate_config(merge_overrides(load_config("configs/demo.yaml"), {"seed": 1}))
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ChipError
from .options import OPTIONS, TRAIN_OPTIONS, Option, check_round_to, config_types

__all__ = [
    "REQUIRED",
    "TARGET_KINDS",
    "TRAIN_SECTIONS",
    "coerce_value",
    "default_config",
    "load_config",
    "merge_overrides",
    "resolve_target",
    "train_config",
    "valid_keys",
    "validate_config",
]

TRAIN_SECTIONS = {
    "baseline": "training from scratch when no checkpoint is given",
    "finetune": "fine-tuning of the pruned model (default: the paper's CIFAR recipe)",
}
REQUIRED = ("arch", "data.name")


def _options() -> dict[str, Option]:
    """Every dotted key -> its option (training options under both sections)."""
    out = dict(OPTIONS)
    for section in TRAIN_SECTIONS:
        out.update({f"{section}.{k}": o for k, o in TRAIN_OPTIONS.items()})
    return out


def valid_keys() -> list[str]:
    """Every dotted config key."""
    return list(_options())


def default_config() -> dict:
    """The nested config with every default filled in (``baseline``/``finetune`` empty)."""
    cfg: dict[str, Any] = {section: {} for section in TRAIN_SECTIONS}
    for key, option in OPTIONS.items():
        if option.default is not None or not key.startswith("target."):
            value = (
                str(option.default) if option.kind == "path" and option.default else option.default
            )
            _set(cfg, key, copy.deepcopy(value))
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
    """Nested -> dotted keys; mappings under mapping-valued keys stay whole."""
    options = _options()
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        option = options.get(key)
        if isinstance(v, Mapping) and (option is None or dict not in config_types(option)):
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
    names = {
        int: "int",
        float: "number",
        str: "string",
        bool: "bool",
        dict: "mapping",
        list: "list",
        tuple: "list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_value(key: str, value: Any, option: Option) -> None:
    types = config_types(option)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ChipError(f"config key {key!r} must be {_type_names(types)}, got {value!r}")
    if value is None:
        return
    if option.kind == "round":
        if not check_round_to(value):
            raise ChipError(f"config key {key!r} must be an integer >= 1 or 'auto', got {value!r}")
        return
    if option.minimum is not None and value < option.minimum:
        raise ChipError(f"config key {key!r} must be >= {option.minimum:g}, got {value!r}")
    if option.choices and value not in option.choices:
        raise ChipError(
            f"config key {key!r} must be one of {', '.join(option.choices)}, got {value!r}"
        )


def _unknown(key: str, keys: list[str]) -> ChipError:
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else "; see configs/README.md for the keys"
    return ChipError(f"unknown config key {key!r}{hint}")


def validate_config(cfg: Mapping) -> dict:
    """Merge ``cfg`` over the defaults and check everything checkable without running anything:
    keys, types, ranges, the criterion, the target and both training sections. Returns the full
    config; raises a one-line :class:`ChipError` naming the first problem.
    """
    if not isinstance(cfg, Mapping):
        raise ChipError(f"a config must be a mapping of keys to values, got {type(cfg).__name__}")
    options = _options()
    flat = _flatten(default_config())
    given = _flatten(cfg)
    sections = {k.split(".")[0] for k in options if "." in k}
    scalar = sorted(k for k in given if k in sections - set(TRAIN_SECTIONS))
    if scalar:
        keys = ", ".join(k for k in options if k.startswith(scalar[0] + "."))
        raise ChipError(f"config key {scalar[0]!r} must be a mapping with keys {keys}")
    unknown = sorted(k for k in given if k not in options and k not in TRAIN_SECTIONS)
    if unknown:
        raise _unknown(unknown[0], list(options))
    target_given = [k for k in given if k.startswith("target.") and k != "target.round_to"]
    for key, value in given.items():
        if key in TRAIN_SECTIONS:  # e.g. "finetune: {}" or "finetune:" (null)
            if value not in (None, {}):
                raise ChipError(f"config key {key!r} must be a mapping of training keys")
            continue
        _check_value(key, value, options[key])
        flat[key] = value
    missing = [k for k in REQUIRED if flat.get(k) is None]
    if missing:
        raise ChipError(f"config key {missing[0]!r} is required")
    full = _unflatten(flat)
    for section in TRAIN_SECTIONS:
        full.setdefault(section, {})
    full["target"] = {k: v for k, v in full.get("target", {}).items() if v is not None}
    if not target_given:
        kinds = ", ".join("target." + k for k in TARGET_KINDS)
        raise ChipError(f"config needs a pruning target: one of {kinds}")
    resolve_target(full["target"])
    for section in TRAIN_SECTIONS:
        train_config(full, section)
    return full


def load_config(path) -> dict:
    """Read a YAML config file (not yet validated)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ChipError(
            f"config file not found: {path} (expected a YAML file, see configs/README.md)"
        )
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
    import yaml

    options = _options()
    option = options.get(key)
    if option is None:
        raise _unknown(key, list(options))
    types = config_types(option)
    if types[0] is str:  # names, paths, sparsity strings: verbatim ('null' clears optional ones)
        return None if text in ("null", "none", "None") and option.nullable else text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ChipError(
            f"cannot parse value {text!r} for {key!r}; expected {_type_names(types)}"
        ) from None
    _check_value(key, value, option)
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


# target kind -> the chip.plan target it stands for (see chip.targets.parse_target)
TARGET_KINDS: dict[str, Callable[[Any], Any]] = {
    "sparsity": str,
    "rate": float,
    "flops": lambda v: {"flops": v},
    "params": lambda v: {"params": v},
    "latency": lambda v: {"latency": v},
    "layers": dict,
}


def resolve_target(section: Mapping) -> Any:
    """The :func:`chip.plan` target of a ``target:`` section (exactly one kind), checked."""
    from .targets import parse_sparsity, parse_target

    kinds = [k for k in TARGET_KINDS if section.get(k) is not None]
    if len(kinds) != 1:
        given = ", ".join(kinds) or "none"
        raise ChipError(f"give exactly one pruning target ({', '.join(TARGET_KINDS)}), got {given}")
    target = TARGET_KINDS[kinds[0]](section[kinds[0]])
    kind, value = parse_target(target)
    if kind == "sparsity":
        parse_sparsity(value)
    if kind == "layers":
        for layer, rate in value.items():
            ok = isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1
            if not ok:
                raise ChipError(
                    f"rate {rate!r} for layer {layer!r} is not a fraction of channels "
                    "to remove; expected a number in [0, 1)"
                )
    return target


def train_config(cfg: Mapping, section: str, *, cli: bool = False):
    """The :class:`chip.train.TrainConfig` of ``cfg[section]`` (seed and batch size defaulted).

    ``cli=True`` names command-line flags (``--epochs``) in errors instead of config keys."""
    from .recipe import BASELINE_DEFAULTS, TrainConfig

    values = dict(BASELINE_DEFAULTS) if section == "baseline" else {}
    values.update({"seed": cfg["seed"], "batch_size": cfg["data"]["batch_size"]})
    values.update(cfg.get(section) or {})
    tc = TrainConfig.from_dict(values)
    if tc.warmup_epochs >= tc.epochs and tc.schedule == "cosine":
        warmup, epochs = (
            ("--warmup-epochs", "--epochs")
            if cli
            else (f"{section}.warmup_epochs", f"{section}.epochs")
        )
        raise ChipError(
            f"{section}: {tc.warmup_epochs} warm-up epochs need at least "
            f"{tc.warmup_epochs + 1} epochs (got {tc.epochs}); lower {warmup} or raise {epochs}"
        )
    return tc
