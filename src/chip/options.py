"""Every option chip takes, written once: its run-config key, command-line flag, type, range, help.

``chip.config`` builds the run-config schema from :data:`OPTIONS` and :data:`TRAIN_OPTIONS`;
``chip.cli`` builds its flags from the same entries (:func:`add_option`), so a help text, a
default or a range is never written twice. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .criteria import CRITERIA  # the table, importable without torch
from .recipe import AMP_MODES, SCHEDULE_NAMES
from .targets import ALLOCATIONS

__all__ = ["OPTIONS", "TRAIN_OPTIONS", "Option", "add_option", "config_types"]


@dataclass(frozen=True)
class Option:
    """One option.

    ``kind`` is the value's type: ``int``, ``float``, ``str``, ``path``, ``bool`` (a switch),
    ``mapping`` (a config mapping; on the command line repeated ``KEY=VALUE``), ``list`` (of
    integers) or ``layers`` (a config mapping; on the command line a YAML file of it).
    ``minimum`` bounds numbers from below (inclusive); ``choices`` lists the accepted strings;
    ``nullable`` allows ``null`` in a config.
    """

    key: str
    flag: str
    kind: str
    default: Any = None
    help: str = ""
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = True
    metavar: str | None = None


ZOO = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn", "resnet50")
"""The zoo's model names (for help texts without importing torch; a test keeps it equal to
``chip.models.list_models()``)."""

_ENTRIES = [
    Option(
        "arch",
        "--arch",
        "str",
        None,
        f"the model: a zoo name ({', '.join(ZOO)}), torchvision:NAME, timm:NAME, "
        "path/to/file.py:function or package.module:function (user code needs --trust-code)",
        nullable=False,
        metavar="MODEL",
    ),
    Option(
        "model_kwargs",
        "--model-kwargs",
        "mapping",
        {},
        "keyword arguments for the model's builder, e.g. num_classes=10,width=16",
        nullable=False,
        metavar="KEY=VALUE,...",
    ),
    Option(
        "num_classes",
        "--num-classes",
        "int",
        None,
        "classifier outputs (default: the dataset's or the architecture's)",
        minimum=1,
    ),
    Option(
        "checkpoint",
        "--checkpoint",
        "path",
        None,
        "trained weights (a state_dict file); none = train the baseline from scratch",
    ),
    Option(
        "trust_code",
        "--trust-code",
        "bool",
        False,
        "trust the files named: allow checkpoints that need full unpickling and artifacts "
        "that import their builder (both run code from the file)",
    ),
    Option(
        "seed", "--seed", "int", 0, "seed for calibration, pruning and training", nullable=False
    ),
    Option("device", "--device", "str", None, "cpu, cuda, cuda:1 ... (default: cuda if available)"),
    Option(
        "threads",
        "--threads",
        "int",
        None,
        "torch CPU threads (1 is often fastest on a busy machine)",
        minimum=1,
    ),
    Option(
        "out_dir",
        "--out-dir",
        "path",
        "runs/chip",
        "run directory (stages resume from it)",
        nullable=False,
    ),
    Option(
        "data.name",
        "--data",
        "str",
        None,
        "dataset name (digits, fashion-mnist, cifar10, imagefolder, synthetic, ...)",
        nullable=False,
    ),
    Option("data.root", "--data-dir", "path", None, "dataset directory (default: the dataset's)"),
    Option("data.batch_size", "--batch-size", "int", 128, "batch size", minimum=1, nullable=False),
    Option(
        "data.workers",
        "--workers",
        "int",
        0,
        "data loading worker processes",
        minimum=0,
        nullable=False,
    ),
    Option("data.image_size", "--image-size", "int", None, "resize images to this size", minimum=1),
    Option(
        "data.train_subset",
        "--train-subset",
        "int",
        None,
        "use at most N training images (seeded)",
        minimum=1,
    ),
    Option(
        "data.val_subset",
        "--val-subset",
        "int",
        None,
        "evaluate on at most N images (seeded)",
        minimum=1,
    ),
    Option(
        "data.options",
        "--data-opt",
        "mapping",
        {},
        "extra dataset options, e.g. synthetic train_size=64",
        nullable=False,
        metavar="KEY=VALUE",
    ),
    Option(
        "data.download",
        "--download",
        "bool",
        False,
        "download CIFAR-10/100 or MNIST into the data directory if missing (needs a network)",
    ),
    Option(
        "calibration.batches",
        "--batches",
        "int",
        5,
        "calibration batches (paper: 5)",
        minimum=1,
        nullable=False,
    ),
    Option(
        "calibration.batch_size",
        "--calibration-batch-size",
        "int",
        128,
        "calibration batch size (paper: 128)",
        minimum=1,
        nullable=False,
    ),
    Option(
        "calibration.criterion",
        "--criterion",
        "str",
        "chip",
        "channel scores: chip (channel independence), hrank (feature-map rank), l1 (filter "
        "L1 norm) or random (seeded)",
        choices=tuple(CRITERIA),
        nullable=False,
    ),
    Option(
        "target.sparsity",
        "--sparsity",
        "str",
        None,
        "reference sparsity string, e.g. '[0.]+[0.15]*2+[0.4]*27'",
    ),
    Option(
        "target.rate", "--rate", "float", None, "uniform fraction of channels removed per group"
    ),
    Option("target.flops", "--flops", "float", None, "fraction of the baseline MACs to keep"),
    Option("target.params", "--params", "float", None, "fraction of the baseline params to keep"),
    Option(
        "target.latency",
        "--latency",
        "float",
        None,
        "fraction of the baseline latency to keep, measured on --device at --latency-batch",
    ),
    Option(
        "target.layers",
        "--layers",
        "layers",
        None,
        "{group or layer name: rate} (on the command line: a YAML file of it)",
    ),
    Option(
        "target.round_to",
        "--round-to",
        "round",
        1,
        "kept widths become multiples of N; auto: per group, the channel step at which the "
        "measured latency drops",
        minimum=1,
        nullable=False,
        metavar="N|auto",
    ),
    Option(
        "plan.allocation",
        "--allocation",
        "str",
        "uniform",
        "how a flops=/params= budget is spread over the groups: uniform (one rate), global (one "
        "ranking of normalised scores) or sensitivity (measured loss per group width; needs data)",
        choices=ALLOCATIONS,
        nullable=False,
    ),
    Option(
        "plan.latency_batch",
        "--latency-batch",
        "int",
        1,
        "batch size latency targets and --round-to auto are measured at",
        minimum=1,
        nullable=False,
    ),
    Option(
        "prune.recalibrate_bn",
        "--recalibrate-bn",
        "int",
        0,
        "re-estimate BatchNorm statistics of the pruned model on N training batches (0: off)",
        minimum=0,
        nullable=False,
        metavar="N",
    ),
]
OPTIONS: dict[str, Option] = {o.key: o for o in _ENTRIES}
"""Run-config key -> option (``baseline.*`` / ``finetune.*`` take :data:`TRAIN_OPTIONS`)."""

# chip.train.TrainConfig field -> option (the defaults are TrainConfig's)
TRAIN_OPTIONS: dict[str, Option] = {
    o.key: o
    for o in [
        Option("epochs", "--epochs", "int", help="training epochs", minimum=1),
        Option(
            "batch_size", "--batch-size", "int", help="per-process training batch size", minimum=1
        ),
        Option("lr", "--lr", "float", help="base learning rate"),
        Option("momentum", "--momentum", "float", help="SGD momentum"),
        Option("weight_decay", "--weight-decay", "float", help="weight decay on all parameters"),
        Option("nesterov", "--nesterov", "bool", help="Nesterov momentum"),
        Option(
            "schedule",
            "--schedule",
            "str",
            help="lr schedule: cosine (the paper's), step, constant",
            choices=SCHEDULE_NAMES,
        ),
        Option("warmup_epochs", "--warmup-epochs", "int", help="linear warm-up epochs", minimum=0),
        Option("milestones", "--milestones", "list", help="epochs where the step schedule decays"),
        Option("gamma", "--gamma", "float", help="decay factor of the step schedule"),
        Option("label_smoothing", "--label-smoothing", "float", help="label smoothing"),
        Option("amp", "--amp", "str", help="mixed precision: none, bf16, fp16", choices=AMP_MODES),
        Option("channels_last", "--channels-last", "bool", help="channels-last memory format"),
        Option(
            "seed", "--seed", "int", help="seed of the initialisation, data order and augmentation"
        ),
        Option("sync_bn", "--sync-bn", "bool", help="SyncBatchNorm under torchrun (CUDA)"),
        Option("log_every", "--log-every", "int", help="log every N iterations", minimum=1),
        Option("clip_grad", "--clip-grad", "float", help="clip the gradient norm to this value"),
        Option(
            "tensorboard",
            "--tensorboard",
            "bool",
            help="also log to TensorBoard in OUT_DIR/tb (needs the tensorboard package)",
        ),
    ]
}

_NONE = type(None)
_TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "path": (str,),
    "bool": (bool,),
    "mapping": (dict,),
    "layers": (dict,),
    "list": (list, tuple),
    "round": (int, str),
}


def config_types(option: Option) -> tuple[type, ...]:
    """The Python types a run config may give for ``option``."""
    return _TYPES[option.kind] + ((_NONE,) if option.nullable else ())


# -- command-line flags -------------------------------------------------------------------------


def _number(kind: type, minimum: float | None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            bound = f" >= {minimum:g}" if minimum is not None else ""
            name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {name}{bound}, got {text!r}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def _key_values(text: str) -> dict[str, Any]:
    """``a=1,b=x`` -> ``{"a": 1, "b": "x"}`` (values are YAML scalars)."""
    return dict(_key_value(part) for part in text.split(",") if part.strip())


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    return _number(int, 1)(text)


def check_round_to(value) -> bool:
    """Whether ``value`` is a valid round_to: an integer >= 1 or ``"auto"``."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 30,60,90, got {text!r}") from None


def add_option(
    parser,
    option: Option,
    *,
    flag: str | None = None,
    default: Any = "from option",
    required: bool = False,
    help: str | None = None,
    dest: str | None = None,
) -> None:
    """Add ``option`` to an argparse parser or group; keyword arguments override the entry.

    ``bool`` options become switches; ``mapping`` options repeatable ``KEY=VALUE`` flags (a list
    of pairs); ``layers`` a path to a YAML file. The default is shown in the help text.
    """
    default = option.default if default == "from option" else default
    text = help if help is not None else option.help
    kwargs: dict[str, Any] = {"help": text, "dest": dest or option.key.rpartition(".")[2]}
    if option.kind == "bool":
        kwargs.update(action="store_true", default=default if default is not None else None)
    elif option.kind == "mapping" and option.key == "model_kwargs":  # one flag: a=1,b=2
        kwargs.update(type=_key_values, default={}, metavar=option.metavar)
    elif option.kind == "mapping":
        kwargs.update(type=_key_value, action="append", default=[], metavar=option.metavar)
    else:
        parse = {
            "int": _number(int, option.minimum),
            "float": _number(float, option.minimum),
            "path": Path,
            "layers": Path,
            "list": _int_list,
            "round": _round_to,
        }.get(option.kind)
        if parse is not None:
            kwargs["type"] = parse
        if option.choices:
            kwargs["choices"] = option.choices
        if option.metavar:
            kwargs["metavar"] = option.metavar
        kwargs.update(default=default, required=required)
        if default not in (None, [], {}) and not required:
            kwargs["help"] = f"{text} (default: {default})"
    parser.add_argument(flag or option.flag, **kwargs)
