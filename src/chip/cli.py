"""The ``chip`` command line (also ``python -m chip``), after torchvision's reference scripts.

    chip score    --arch resnet56 --checkpoint ckpt.pt --data cifar10 --out scores.safetensors
    chip plan     --arch resnet56 --sparsity '[0.]+[0.15]*2+[0.4]*27' [--json]
    chip prune    --arch resnet56 --checkpoint ckpt.pt --scores scores.safetensors --flops 0.5 --out p.chip
    chip train    --arch resnet20 --data digits --epochs 15 --out-dir runs/base
    chip finetune --model p.chip --data cifar10 --out-dir runs/ft [--resume]
    chip eval     --model p.chip --data cifar10 [--latency] [--json]
    chip run      configs/demo.yaml [--data fashion-mnist] [--finetune.epochs 3]

Every subcommand has a ``get_args_parser_<name>`` and a ``cmd_<name>`` (table :data:`COMMANDS`).
User errors (bad flags, missing files, :class:`~chip.errors.ChipError`) print one line
``chip: error: <message>`` on stderr and exit with code 2. ``finetune``, ``train``, ``eval`` and
``score`` run under ``torchrun`` (only rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chip.errors import ChipError
from chip.options import OPTIONS, TRAIN_OPTIONS, add_option

if TYPE_CHECKING:  # building the parser (chip --help) imports no torch
    import torch.nn as nn

__all__ = ["COMMANDS", "get_args_parser", "main", "parse_overrides"]

logger = logging.getLogger("chip.cli")


class UsageError(ChipError):
    """Bad command-line usage (argparse's errors, unknown override keys)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (printed as one line by main)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.partition(" ")[2]  # "chip plan" -> "plan"
        raise UsageError(f"{command}: {message}" if command else message)


# ----------------------------------------------------------------------------- shared options


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,32,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,32,32, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--device, --workers, --seed, --quiet, --threads."""
    g = parser.add_argument_group("common")
    for key in ("device", "data.workers", "seed"):
        add_option(g, OPTIONS[key])
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_option(g, OPTIONS["threads"])


def add_data_args(
    parser: argparse.ArgumentParser,
    batch_size: int | None = 128,
    required: bool = True,
    data_help: str | None = None,
) -> None:
    """--data, --data-dir, --image-size, --train-subset, --val-subset, --data-opt, --download
    [--batch-size]."""
    g = parser.add_argument_group("data")
    add_option(g, OPTIONS["data.name"], required=required, dest="data", help=data_help)
    add_option(g, OPTIONS["data.root"], dest="data_dir")
    for key in ("data.image_size", "data.train_subset", "data.val_subset"):
        add_option(g, OPTIONS[key])
    add_option(g, OPTIONS["data.options"], dest="data_opt")
    add_option(g, OPTIONS["data.download"])
    if batch_size is not None:
        add_option(g, OPTIONS["data.batch_size"], default=batch_size)


_TARGET_KINDS = ("sparsity", "rate", "flops", "params", "latency", "layers")


def add_target_args(parser: argparse.ArgumentParser, plan_file: bool = False) -> None:
    """Exactly one of --sparsity / --rate / --flops / --params / --layers (/ --plan)."""
    g = parser.add_argument_group("pruning target (exactly one)")
    x = g.add_mutually_exclusive_group(required=True)
    for kind in _TARGET_KINDS:
        add_option(x, OPTIONS[f"target.{kind}"])
    if plan_file:
        x.add_argument("--plan", type=Path, help="plan.json written by chip plan --out")
    add_option(g, OPTIONS["target.round_to"])


# TrainConfig fields with a flag on train / finetune (the others are config-only)
TRAIN_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "schedule",
    "amp",
    "clip_grad",
    "nesterov",
    "channels_last",
    "sync_bn",
    "tensorboard",
)


def add_train_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """One flag per :data:`TRAIN_FLAGS` entry; ``defaults`` are shown in --help."""
    g = parser.add_argument_group("training")
    for name in TRAIN_FLAGS:
        option = TRAIN_OPTIONS[name]
        shown = (
            f" (default: {defaults[name]})" if name in defaults and option.kind != "bool" else ""
        )
        add_option(g, option, default=None, help=option.help + shown)
    add_option(
        g, OPTIONS["out_dir"], default=None, required=True, help="where checkpoints and logs go"
    )
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")


def _train_config(args: argparse.Namespace, defaults: dict, section: str):
    from chip.config import train_config

    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    values = {**defaults, **given}
    cfg = {
        "seed": args.seed,
        "data": {"batch_size": values.pop("batch_size", 128)},
        section: values,
    }
    return train_config(cfg, section, cli=True)


def _data(args: argparse.Namespace, train_augment: bool = True):
    from chip.data import build_data

    return build_data(
        args.data,
        args.data_dir,
        image_size=args.image_size,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        options=dict(args.data_opt),
        seed=args.seed,
        train_augment=train_augment,
        download=args.download,
    )


def _data_info(args: argparse.Namespace):
    from chip.data import data_info

    return data_info(args.data, args.data_dir, args.image_size, dict(args.data_opt))


def _echo(text: str = "", file=None) -> None:
    """Print on rank 0 only."""
    from chip.distributed import is_main_process

    if is_main_process():
        print(text, file=file or sys.stdout, flush=True)


def add_model_args(
    parser: argparse.ArgumentParser,
    *,
    checkpoint_required: bool = False,
    checkpoint_help: str = "trained weights (a state_dict file; a whole pickled model needs "
    "--trust-code and makes --arch optional)",
    input_size: bool = True,
) -> None:
    """--arch, --model-kwargs, --num-classes, --checkpoint, --trust-code [, --input-size]."""
    g = parser.add_argument_group("model")
    add_option(g, OPTIONS["arch"])
    add_option(g, OPTIONS["model_kwargs"])
    add_option(g, OPTIONS["num_classes"])
    add_option(g, OPTIONS["checkpoint"], required=checkpoint_required, help=checkpoint_help)
    add_option(g, OPTIONS["trust_code"])
    if input_size:
        g.add_argument(
            "--input-size",
            type=_int_list,
            default=None,
            metavar="C,H,W",
            help="input size of one image (default: the one the model's source declares: zoo, "
            "timm; required for other models)",
        )


def _build_model(
    args: argparse.Namespace, num_classes: int | None = None, in_channels: int | None = None
) -> nn.Module:
    """The model the flags name (see :func:`add_model_args`); ``num_classes`` / ``in_channels``
    come from the data when there is some (``--num-classes`` wins) and the builder takes them
    (a user's builder without such a parameter builds its own; the data is checked against it
    afterwards)."""
    if getattr(args, "arch", None) is None:
        return _pickled_model(args)
    from chip.models import create
    from chip.models.sources import build_kwargs

    trust = getattr(args, "trust_code", False)
    kwargs = build_kwargs(
        args.arch,
        getattr(args, "model_kwargs", None),
        num_classes=getattr(args, "num_classes", None),
        in_channels=getattr(args, "in_channels", None),
        data=(num_classes, in_channels),
        trust_code=trust,
    )
    return create(
        args.arch,
        checkpoint=getattr(args, "checkpoint", None),
        trust_code=trust,
        **kwargs,
    )


def _pickled_model(args: argparse.Namespace) -> nn.Module:
    """A whole model saved with ``torch.save(model)``: only with --trust-code."""
    import torch.nn as nn

    from chip.checkpoint import load_torch_file

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None:
        raise UsageError("--arch is required (a model name; see --help)")
    if not args.trust_code:
        raise ChipError(
            f"no --arch: {checkpoint} would have to be a whole pickled model, which can run code "
            "when loaded; pass --trust-code if you trust it, or name the model with --arch"
        )
    obj = load_torch_file(checkpoint, trust_code=True)
    if not isinstance(obj, nn.Module):
        raise ChipError(
            f"{checkpoint} holds {type(obj).__name__}, not a whole model; name the model with --arch"
        )
    return obj


def _model_input(args: argparse.Namespace, model: nn.Module) -> tuple[int, ...]:
    """(1, C, H, W) for a command without data: --input-size or the source's, checked."""
    from chip.preflight import input_size_for

    return (1, *input_size_for(model, args.input_size, getattr(args, "arch", None) or ""))


def _fmt_count(n: int) -> str:
    from chip.counting import format_count

    return format_count(n)


def _cut(before: int, after: int) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "-"


def _counts_lines(base_params, base_macs, params, macs, input_size) -> list[str]:
    from chip.counting import CONVENTION

    shape = "x".join(str(s) for s in input_size[1:])
    return [
        f"params  {_fmt_count(base_params)} -> {_fmt_count(params)}  ({_cut(base_params, params)})",
        f"MACs    {_fmt_count(base_macs)} -> {_fmt_count(macs)}  ({_cut(base_macs, macs)})  "
        f"[{CONVENTION}, input {shape}]",
    ]


@contextlib.contextmanager
def _distributed(device):
    """init_distributed for the duration of a command; the process group is destroyed after."""
    from chip.distributed import cleanup, init_distributed

    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup()


# ------------------------------------------------------------------------------------- score


def get_args_parser_score(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_data_args(
        parser,
        batch_size=None,
        required=False,
        data_help=OPTIONS["data.name"].help + " (needed by the data criteria and --stability)",
    )
    add_option(parser, OPTIONS["calibration.batch_size"], flag="--batch-size", dest="batch_size")
    add_option(parser, OPTIONS["calibration.batches"])
    add_option(parser, OPTIONS["calibration.criterion"])
    parser.add_argument(
        "--stability",
        type=_positive_int,
        default=None,
        metavar="K",
        help="also split the calibration batches into K disjoint subsets, print how "
        "well their scores agree and write OUT.stability.json",
    )
    parser.add_argument(
        "--stability-rate",
        type=float,
        default=0.5,
        help="pruning rate whose kept sets --stability compares (default: 0.5)",
    )
    parser.add_argument(
        "--reference-dir",
        type=Path,
        help="also write the reference code's ci_conv{k}.npy files here",
    )
    parser.add_argument("--out", type=Path, required=True, help="scores file (.safetensors)")
    add_common_args(parser)


def _check_score_args(args: argparse.Namespace) -> None:
    """One-line errors for flag combinations argparse cannot express."""
    from chip.criteria import CRITERIA

    needs_data = CRITERIA[args.criterion].needs_data
    if args.data is None and needs_data:
        free = " and ".join(n for n, c in CRITERIA.items() if not c.needs_data)
        raise ChipError(
            f"score: --criterion {args.criterion} needs --data (only {free} score without data)"
        )
    if args.stability is not None:
        if args.data is None:
            raise ChipError("score: --stability needs --data (it splits the calibration batches)")
        if not 2 <= args.stability <= args.batches:
            raise ChipError(
                f"score: --stability K needs 2 <= K <= --batches ({args.batches}), "
                f"got {args.stability}"
            )
    if args.reference_dir is not None and not needs_data:
        raise ChipError("score: --reference-dir needs a criterion computed from data")


def cmd_score(args: argparse.Namespace) -> int:
    from chip.criteria import score
    from chip.data import calibration_loader
    from chip.distributed import is_main_process
    from chip.preflight import check_writable

    _check_score_args(args)
    check_writable(args.out, "output file")
    with _distributed(args.device) as dist:
        loader, source, example = None, "weights", None
        if args.data is not None:
            train, _, info = _data(args)
            model = _build_model(args, info.num_classes, info.in_channels)
            _check_fits(model, info)
            loader = calibration_loader(train, args.batches, args.batch_size, args.seed)
            source = info.name
        else:
            import torch

            model = _build_model(args)
            example = torch.zeros(_model_input(args, model))
        t0 = time.perf_counter()
        scores = score(
            model,
            loader,
            args.criterion,
            num_batches=args.batches,
            seed=args.seed,
            device=dist.device,
            example_inputs=example,
            progress=not args.quiet,
        )
        seconds = time.perf_counter() - t0
        if is_main_process():
            scores.save(args.out)
            if args.reference_dir is not None:
                scores.export_reference(args.reference_dir, args.arch)
        if args.data is not None and scores.num_samples:
            source = f"on {scores.num_samples} {source} samples"
        else:
            source = "from its weights" if args.criterion == "l1" else f"from seed {args.seed}"
        _echo(
            f"scored {len(scores.groups)} groups ({len(scores.points)} hook points) of "
            f"{_model_name(args, model)} {source} with {args.criterion} in {seconds:.1f} s "
            f"-> {args.out}"
        )
        if args.stability is not None:
            _score_stability(args, model, loader, dist.device)
    return 0


def _score_stability(args: argparse.Namespace, model: nn.Module, loader, device) -> None:
    """``score --stability K``: print the table and write it next to --out."""
    from chip.distributed import is_main_process
    from chip.stability import stability

    report = stability(
        model,
        loader,
        args.stability,
        num_batches=args.batches,
        rate=args.stability_rate,
        criterion=args.criterion,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
    )
    path = args.out.with_suffix(".stability.json")
    if is_main_process():
        report.save(path)
    _echo(report.table())
    _echo(f"stability -> {path}")


# -------------------------------------------------------------------------------------- plan


def _plan_target(args: argparse.Namespace):
    from chip.config import resolve_target

    if args.layers is not None:
        from chip.config import load_config

        layers = load_config(args.layers)
        if not layers:
            raise ChipError(f"layers file {args.layers} is empty; expected {{layer name: rate}}")
        return resolve_target({"layers": layers})
    kinds = ("sparsity", "rate", "flops", "params", "latency")
    return resolve_target({k: getattr(args, k) for k in kinds})


def get_args_parser_plan(parser: argparse.ArgumentParser) -> None:
    add_model_args(
        parser,
        checkpoint_help="weights (not needed: a plan depends on the "
        "architecture only, unless --allocation sensitivity measures it; a whole pickled model "
        "needs --trust-code)",
    )
    add_target_args(parser)
    parser.add_argument(
        "--scores", type=Path, help="scores from chip score (which channels to keep)"
    )
    add_allocation_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    parser.add_argument("--out", type=Path, help="write the plan here (JSON)")


def add_allocation_args(parser: argparse.ArgumentParser, recalibrate: bool = False) -> None:
    """--allocation [--recalibrate-bn], the data they read, and the common flags."""
    g = parser.add_argument_group("allocation")
    add_option(g, OPTIONS["plan.allocation"])
    add_option(g, OPTIONS["plan.latency_batch"])
    if recalibrate:
        add_option(g, OPTIONS["prune.recalibrate_bn"])
    needs = "--allocation sensitivity" + (" and --recalibrate-bn" if recalibrate else "")
    add_data_args(
        parser,
        batch_size=None,
        required=False,
        data_help=f"{OPTIONS['data.name'].help} (needed by {needs})",
    )
    add_option(parser, OPTIONS["calibration.batch_size"], flag="--batch-size", dest="batch_size")
    add_common_args(parser)


def _check_allocation_args(args: argparse.Namespace, command: str) -> None:
    """One-line errors, before any work, for allocation and data flags that do not fit."""
    from chip.planning import check_allocation

    if getattr(args, "plan", None) is not None:
        if args.allocation != "uniform":
            raise ChipError(
                f"{command}: --allocation is chosen when planning; --plan already fixes the widths"
            )
    else:
        check_allocation(args.allocation, _plan_target(args))
    if args.allocation == "sensitivity" or _measures_latency(args):
        from chip.utils import resolve_device

        resolve_device(args.device)  # the device the measurements run on exists
    needs = [f"--allocation {args.allocation}"] if args.allocation == "sensitivity" else []
    if getattr(args, "recalibrate_bn", 0):
        needs.append("--recalibrate-bn")
    if needs and args.data is None:
        raise ChipError(
            f"{command}: {' and '.join(needs)} needs --data (it runs the model on training batches)"
        )


def _measures_latency(args: argparse.Namespace) -> bool:
    """Whether planning measures latency (a --latency target or --round-to auto)."""
    from chip.planning import measures_latency

    if getattr(args, "plan", None) is not None:  # a plan file: there is no target to parse
        return args.round_to == "auto"
    return measures_latency(_plan_target(args), args.round_to)


def _latency_lines(p, measured: tuple[float, float] | None = None) -> list[str]:
    """Predicted (and measured: base, pruned ms) latency of a plan that has a latency table."""
    lat = p.stats.get("latency")
    if lat is None:
        return []
    where = f"batch {lat['batch']}, {lat['device']}, {lat['threads']} threads"
    base, pred = lat["base_ms"], lat["predicted_ms"]
    lines = [f"latency {base:.3f} ms -> {pred:.3f} ms predicted ({pred / base:.3f}) [{where}]"]
    if "measured_ratio" in lat:
        asked = ", ".join(f"{r['asked']:.3f} -> {r['measured']:.3f}" for r in lat["rounds"])
        lines.append(
            f"latency checked on pruned copies: {lat['measured_ratio']:.3f} of "
            f"{lat['measured_base_ms']:.3f} ms measured (asked -> measured: {asked})"
        )
    if "round_to_check" in lat:
        c = lat["round_to_check"]
        lines.append(
            f"round to auto: its steps measured {c['auto_ms']:.3f} ms, no rounding "
            f"{c['step1_ms']:.3f} ms; kept {'the steps' if c['kept'] == 'auto' else 'no rounding'}"
        )
    if measured is not None:
        m0, m1 = measured
        lines.append(
            f"latency {m0:.3f} ms -> {m1:.3f} ms measured ({m1 / m0:.3f}); prediction error "
            f"{(pred - m1) / m1:+.1%}"
        )
    return lines


def _measured_latency(model, pruned, p, device) -> tuple[float, float] | None:
    """(unpruned, pruned) median ms at the plan's latency batch, interleaved (None: the plan
    has no latency table)."""
    import torch

    from chip.latency import measure_latency
    from chip.utils import resolve_device

    lat = p.stats.get("latency")
    device = resolve_device(device)
    if lat is None or lat["device"] != str(device) or lat["threads"] != torch.get_num_threads():
        return None  # planned elsewhere: the prediction is not for this machine
    size = (lat["batch"], *p.input_size[1:])
    rounds = [[], []]
    for _ in range(3):  # interleaved rounds damp drift on a shared machine
        for i, m in enumerate((model, pruned)):
            rounds[i].append(measure_latency(m, size, device=device, repeats=10).median_ms)
    return tuple(sorted(r)[1] for r in rounds)


def _model_and_data(args: argparse.Namespace):
    """The model (sized for --data when given) and the training split (None without --data);
    with --data and no --input-size, the data's image size is the input size."""
    if args.data is None:
        return _build_model(args, in_channels=args.input_size[0] if args.input_size else None), None
    train, _, info = _data(args)
    model = _build_model(args, info.num_classes, info.in_channels)
    _check_fits(model, info)
    if args.input_size is None:
        args.input_size = (info.in_channels, *info.image_size)
    return model, train


def _make_plan(args: argparse.Namespace, model: nn.Module, scores, size, train=None):
    from chip.data import calibration_loader
    from chip.planning import Allocation, plan
    from chip.utils import resolve_device

    allocation, data = Allocation(args.allocation, seed=args.seed), None
    target = _plan_target(args)
    if allocation.name == "sensitivity":
        data = calibration_loader(train, allocation.batches, args.batch_size, args.seed)
    if allocation.name == "sensitivity" or _measures_latency(args):
        device = resolve_device(args.device)
        if device.type == "meta":
            raise ChipError(
                "--device meta holds no data to run the model on (latency=, round_to=auto and "
                "the sensitivity allocation measure it); expected --device cpu or cuda"
            )
        model.to(device)  # measured on --device, then back on the CPU
    try:
        return plan(
            model,
            scores,
            target,
            round_to=args.round_to,
            input_size=size,
            allocation=allocation,
            data=data,
            progress=not args.quiet,
            latency_batch=args.latency_batch,
        )
    finally:
        model.cpu()


def _model_name(args: argparse.Namespace, model: nn.Module) -> str:
    return getattr(args, "arch", None) or getattr(model, "chip_arch", None) or type(model).__name__


def _load_scores(path: Path | None, model: nn.Module):
    """Scores file, checked against the model they are meant for (None: no file)."""
    if path is None:
        return None
    from chip.calibration import ChannelScores

    scores = ChannelScores.load(path)
    arch, ours = scores.meta.get("arch"), getattr(model, "chip_arch", None)
    if arch is not None and ours is not None and arch != ours:
        raise ChipError(f"scores {path} were computed on {arch}, not {ours}")
    return scores


def cmd_plan(args: argparse.Namespace) -> int:
    from chip.preflight import check_writable

    _check_allocation_args(args, "plan")
    if args.out is not None:
        check_writable(args.out, "output file")
    model, train = _model_and_data(args)
    size = _model_input(args, model)
    scores = _load_scores(args.scores, model)
    p = _make_plan(args, model, scores, size, train)
    if scores is None:
        print(
            "note: no --scores given: the plan keeps the first channels of every group; which "
            "channels are kept does not change the widths or the counts",
            file=sys.stderr,
        )
    if args.out is not None:
        p.save(args.out)
    s = p.stats
    if args.json:
        obj = {
            "arch": _model_name(args, model),
            "target": p.target,
            "input_size": list(size),
            "params": s["params"],
            "macs": s["macs"],
            "base_params": s["base_params"],
            "base_macs": s["base_macs"],
            "params_kept": s["params_kept"],
            "macs_kept": s["macs_kept"],
            "macs_convention": s["macs_convention"],
            "scores_used": p.scores_used,
            "widths": p.widths(),
            "channels": {k: g.channels for k, g in p.groups.items()},
            "skipped": p.skipped,
            "allocation": p.allocation,
        }
        if "latency" in s:
            lat = s["latency"]
            obj.update(
                latency_ms=lat["predicted_ms"],
                base_latency_ms=lat["base_ms"],
                device=lat["device"],
                threads=lat["threads"],
                batch=lat["batch"],
            )
            if "measured_ratio" in lat:
                obj.update(
                    measured_latency_ratio=lat["measured_ratio"],
                    measured_base_latency_ms=lat["measured_base_ms"],
                    latency_rounds=lat["rounds"],
                )
            if "round_to_check" in lat:
                obj["round_to_check"] = lat["round_to_check"]
        print(json.dumps(obj))
        return 0
    lines = [
        f"{_model_name(args, model)}, target {p.target}"
        + (f", round to {args.round_to}" if args.round_to != 1 else "")
    ]
    lines += p.table().splitlines()
    lines += _allocation_lines(p)
    lines += _counts_lines(s["base_params"], s["base_macs"], s["params"], s["macs"], size)
    lines += _latency_lines(p)
    if args.out is not None:
        lines.append(f"plan written to {args.out}")
    print("\n".join(lines))
    return 0


def _allocation_lines(p) -> list[str]:
    a = p.allocation
    if a.get("name") != "sensitivity":
        return [f"allocation: {a['name']}"] if a else []
    trials = sum(len(v) for v in a["loss"].values())
    how = "cached" if a["cached"] else f"measured in {a['seconds']:.1f} s"
    return [f"allocation: sensitivity ({trials} group widths, {how})"]


# ------------------------------------------------------------------------------------- prune


def get_args_parser_prune(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, checkpoint_required=True)
    parser.add_argument(
        "--scores", type=Path, help="scores from chip score (not needed with --plan)"
    )
    add_target_args(parser, plan_file=True)
    add_allocation_args(parser, recalibrate=True)
    parser.add_argument("--out", type=Path, required=True, help="pruned model artifact (.chip)")


def cmd_prune(args: argparse.Namespace) -> int:
    from chip.artifact import save
    from chip.counting import count
    from chip.planning import PruningPlan
    from chip.preflight import check_writable
    from chip.prune import apply

    if args.plan is None and args.scores is None:
        raise UsageError("prune: --scores is required unless --plan gives the kept channels")
    _check_allocation_args(args, "prune")
    check_writable(args.out, "output file")
    p = PruningPlan.load(args.plan) if args.plan is not None else None
    if p is not None and args.input_size is None:
        args.input_size = tuple(p.input_size[1:])  # the size the plan was counted at
    model, train = _model_and_data(args)
    size = _model_input(args, model)
    name = _model_name(args, model)
    if p is not None:
        ours = getattr(model, "chip_arch", None)
        if p.arch is not None and ours is not None and p.arch != ours:
            raise ChipError(f"plan {args.plan} was made for {p.arch}, not {ours}")
    else:
        p = _make_plan(args, model, _load_scores(args.scores, model), size, train)
    base = count(model, size)
    pruned = apply(model, p)
    if args.recalibrate_bn:
        from chip.data import calibration_loader
        from chip.recalibration import recalibrate_bn
        from chip.utils import resolve_device

        n = args.recalibrate_bn
        loader = calibration_loader(train, n, args.batch_size, args.seed)
        recalibrate_bn(pruned.to(resolve_device(args.device)), loader, n).cpu()
    after = count(pruned, size)
    save(
        pruned,
        args.out,
        extra={
            "source_checkpoint": str(args.checkpoint),
            "target": p.target,
            "params": after.params,
            "macs": after.macs,
            "input_size": list(size),
        },
    )
    lines = [f"pruned {name} ({p.target}) -> {args.out}"]
    lines += _allocation_lines(p)
    if args.recalibrate_bn:
        lines.append(f"BatchNorm statistics re-estimated on {args.recalibrate_bn} batches")
    lines += _counts_lines(base.params, base.macs, after.params, after.macs, size)
    lines += _latency_lines(p, _measured_latency(model, pruned, p, args.device))
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- train/finetune


def get_args_parser_train(parser: argparse.ArgumentParser) -> None:
    from chip.recipe import BASELINE_DEFAULTS

    add_model_args(parser, input_size=False, checkpoint_help="initial weights (optional)")
    add_data_args(parser, batch_size=None)
    add_train_args(parser, {**_train_defaults(), **BASELINE_DEFAULTS})
    add_common_args(parser)


def _train_defaults() -> dict:
    from chip.recipe import TrainConfig

    return TrainConfig().to_dict()


def _check_fits(model: nn.Module, info) -> None:
    from chip.preflight import check_data_fits

    source = getattr(model, "chip_arch", None) or ""
    check_data_fits(model, info.in_channels, info.name, source, info.num_classes, info.image_size)


def _training_setup(args: argparse.Namespace, defaults: dict, section: str):
    """Everything checkable before training: the recipe, the output directory, the data and
    its splits. Returns (recipe, (train, val, info))."""
    from chip.preflight import check_splits, check_writable

    tc = _train_config(args, defaults, section)
    check_writable(args.out_dir, "output directory")
    data = _data(args)
    check_splits({"training": data[0], "validation": data[1]}, data[2].name)
    return tc, data


def _fit_and_save(args: argparse.Namespace, model: nn.Module, tc, data, extra: dict) -> int:
    """fit() with the flags' TrainConfig, then save the best epoch as OUT_DIR/model.chip."""
    from chip.artifact import save
    from chip.data import build_loader
    from chip.distributed import is_main_process
    from chip.train import fit, load_training_state

    train, val, info = data
    _check_fits(model, info)
    with _distributed(args.device) as dist:
        train_loader = build_loader(
            train, tc.batch_size, train=True, workers=args.workers, seed=tc.seed
        )
        val_loader = build_loader(val, tc.batch_size, train=False, workers=args.workers)
        result = fit(
            model,
            train_loader,
            val_loader,
            tc,
            args.out_dir,
            device=dist.device,
            resume=args.resume,
            extra=extra,
            progress=not args.quiet,
        )
        if is_main_process():
            load_training_state(args.out_dir / "best.pt", model)
            save(
                model.cpu(),
                args.out_dir / "model.chip",
                extra={
                    **extra,
                    "best_top1": result["best_top1"],
                    "best_epoch": result["best_epoch"],
                    "data": info.name,
                },
            )
        _echo(
            f"best val top-1 {result['best_top1']:.2f}% at epoch {result['best_epoch']}; "
            f"model of that epoch -> {args.out_dir / 'model.chip'}"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from chip.recipe import BASELINE_DEFAULTS
    from chip.utils import resolve_device, seed_everything

    resolve_device(args.device)
    tc, data = _training_setup(args, dict(BASELINE_DEFAULTS), "train")
    seed_everything(args.seed)  # the random initialisation
    model = _build_model(args, data[2].num_classes, data[2].in_channels)
    return _fit_and_save(args, model, tc, data, {"arch": _model_name(args, model)})


def get_args_parser_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="pruned model (.chip)")
    add_option(parser, OPTIONS["trust_code"])
    add_data_args(parser, batch_size=None)
    add_train_args(parser, _train_defaults())
    add_common_args(parser)


def cmd_finetune(args: argparse.Namespace) -> int:
    from chip.artifact import load
    from chip.utils import resolve_device

    resolve_device(args.device)
    tc, data = _training_setup(args, {}, "finetune")
    model = load(args.model, trust_code=args.trust_code)
    return _fit_and_save(args, model, tc, data, {"source_model": str(args.model)})


# -------------------------------------------------------------------------------------- eval


def get_args_parser_eval(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (--model, or --arch / a pickled --checkpoint)")
    src.add_argument("--model", type=Path, help="model artifact (.chip)")
    add_model_args(parser, input_size=False)
    add_data_args(parser, batch_size=256)
    parser.add_argument("--latency", action="store_true", help="also measure inference latency")
    parser.add_argument(
        "--latency-batch", type=_positive_int, default=1, help="batch size for --latency"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    add_common_args(parser)


def cmd_eval(args: argparse.Namespace) -> int:
    from chip.counting import CONVENTION, count
    from chip.data import build_loader
    from chip.distributed import is_main_process, shard_loader
    from chip.preflight import check_splits
    from chip.train import evaluate

    if args.model is not None and (args.arch is not None or args.checkpoint is not None):
        raise UsageError("eval: pass --model X.chip, or --arch with --checkpoint, not both")
    if args.model is None and args.checkpoint is None:
        raise UsageError("eval: pass --model X.chip, or --arch with --checkpoint")
    with _distributed(args.device) as dist:
        _, val, info = _data(args, train_augment=False)
        check_splits({"validation": val}, info.name)
        if args.model is not None:
            from chip.artifact import load

            model = load(args.model, trust_code=args.trust_code)
        else:
            model = _build_model(args, info.num_classes, info.in_channels)
        _check_fits(model, info)
        size = (1, info.in_channels, *info.image_size)
        counts = count(model, size)
        loader = shard_loader(
            build_loader(val, args.batch_size, train=False, workers=args.workers), train=False
        )
        metrics = evaluate(model.to(dist.device), loader, dist.device)
        result = {
            "model": str(args.model or args.checkpoint),
            "data": info.name,
            **metrics,
            "params": counts.params,
            "macs": counts.macs,
            "macs_convention": CONVENTION,
            "input_size": list(size),
        }
        if args.latency and is_main_process():
            from chip.latency import measure_latency

            lat = measure_latency(model, (args.latency_batch, *size[1:]), device=dist.device)
            result["latency"] = lat.to_dict()
        _echo(_eval_report(result, args.json))  # inside: only rank 0 prints
    return 0


def get_args_parser_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model artifact (.chip)")
    add_option(parser, OPTIONS["trust_code"])
    parser.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    parser.add_argument(
        "--input-size",
        type=_int_list,
        default=None,
        metavar="C,H,W",
        help="input size of one image (default: the plan's, or the model's source's)",
    )
    parser.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset")
    parser.add_argument("--out", type=Path, required=True, help="output file (.pt / .onnx)")
    add_option(parser, OPTIONS["threads"])


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from chip.artifact import export_onnx, export_torchscript, load
    from chip.preflight import check_writable, format_size, input_size_for

    check_writable(args.out, "output file")
    model = load(args.model, trust_code=args.trust_code)
    plan = getattr(model, "chip_plan", None)
    given = args.input_size or (tuple(plan.input_size[1:]) if plan is not None else None)
    size = input_size_for(model, given, str(args.model))
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    if args.format == "onnx":
        path = export_onnx(model, args.out, example, opset=args.opset)
    else:
        path = export_torchscript(model, args.out, example)
    _echo(f"wrote {args.format} model {path} (input {format_size(size)}, batch axis dynamic)")
    return 0


def _eval_report(result: dict, as_json: bool) -> str:
    """One JSON line, or a few readable lines."""
    from chip.counting import CONVENTION

    if as_json:
        return json.dumps(result)
    shape = "x".join(map(str, result["input_size"][1:]))
    lines = [
        f"{result['model']} on {result['data']} ({result['n']} images): top-1 "
        f"{result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}",
        f"params {_fmt_count(result['params'])}  MACs {_fmt_count(result['macs'])}  "
        f"[{CONVENTION}, input {shape}]",
    ]
    if "latency" in result:
        lat = result["latency"]
        lines.append(
            f"latency {lat['median_ms']:.3f} ms median (p10 {lat['p10_ms']:.3f}, "
            f"p90 {lat['p90_ms']:.3f}) at batch {lat['batch_size']} on {lat['device']}, "
            f"{lat['images_per_s']:.0f} images/s"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- run

# command-line spellings -> dotted config keys
RUN_ALIASES = {
    "data": "data.name",
    "data_dir": "data.root",
    "workers": "data.workers",
    "batch_size": "data.batch_size",
    "image_size": "data.image_size",
}
RUN_FLAGS = ("quiet", "fresh")


def parse_overrides(tokens: Sequence[str]) -> tuple[dict[str, Any], set[str]]:
    """``['--finetune.epochs', '3', '--data=digits', '--quiet']`` -> (overrides, flags).

    Keys use ``-`` or ``_``; values are YAML scalars coerced to the key's type. Unknown keys
    raise :class:`UsageError` listing the valid keys.
    """
    from chip.config import coerce_value

    overrides: dict[str, Any] = {}
    flags: set[str] = set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"run: unexpected argument {token!r}; expected --key value")
        key, sep, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if key in RUN_FLAGS and not sep:
            flags.add(key)
            i += 1
            continue
        if not sep:
            if i + 1 >= len(tokens):
                raise UsageError(f"run: --{key} needs a value")
            value = tokens[i + 1]
            i += 1
        i += 1
        key = RUN_ALIASES.get(key, key)
        overrides[key] = coerce_value(key, value)
    return overrides, flags


def get_args_parser_run(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the whole pipeline (baseline, score, plan, prune, fine-tune, eval) "
        "into one run directory; finished stages are skipped on a re-run. "
        "Override any config key with --key value (dotted keys, e.g. "
        "--finetune.epochs 3; --data NAME sets data.name); the keys are in "
        "configs/README.md."
    )
    parser.add_argument("config", type=Path, help="YAML config (see configs/README.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--fresh", action="store_true", help="redo every stage")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value overrides")


def cmd_run(args: argparse.Namespace) -> int:
    from chip.config import load_config, merge_overrides
    from chip.pipeline import run

    overrides, flags = parse_overrides(args.overrides)
    cfg = merge_overrides(load_config(args.config), overrides)
    summary_path = Path(cfg.get("out_dir") or "runs/chip") / "summary.md"
    run(cfg, progress=not (args.quiet or "quiet" in flags), fresh=args.fresh or "fresh" in flags)
    print(summary_path.read_text(), end="")
    print(f"run directory: {summary_path.parent}")
    return 0


# ------------------------------------------------------------------------------------ report


def get_args_parser_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="output directory of chip run")
    parser.add_argument(
        "--no-latency",
        action="store_true",
        help="do not measure the batch-1 latency of the baseline and final models",
    )
    add_option(parser, OPTIONS["device"], help="where to measure latency (default: cpu)")
    add_option(parser, OPTIONS["threads"])


def cmd_report(args: argparse.Namespace) -> int:
    from chip.report import FIGURES, write_report

    path = write_report(args.run_dir, latency=not args.no_latency, device=args.device)
    drawn = [name for name in FIGURES if (path.parent / name).is_file()]
    print(f"wrote {path} ({len(drawn)} figures: {', '.join(drawn) or 'none'})")
    return 0


# ------------------------------------------------------------------------------------- main

# name -> (add arguments, run, one-line help)
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int], str]] = {
    "score": (get_args_parser_score, cmd_score, "score every prunable channel on calibration data"),
    "plan": (get_args_parser_plan, cmd_plan, "dry run: widths and params/MACs of a target"),
    "prune": (get_args_parser_prune, cmd_prune, "plan + apply: write a pruned model artifact"),
    "train": (get_args_parser_train, cmd_train, "train a baseline from scratch"),
    "finetune": (get_args_parser_finetune, cmd_finetune, "fine-tune a pruned model"),
    "eval": (get_args_parser_eval, cmd_eval, "accuracy, params, MACs (and latency) of a model"),
    "run": (get_args_parser_run, cmd_run, "the whole pipeline from a YAML config"),
    "export": (get_args_parser_export, cmd_export, "write a model artifact as TorchScript or ONNX"),
    "report": (
        get_args_parser_report,
        cmd_report,
        "report.md and PNG figures of a chip run directory",
    ),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The ``chip`` parser with one subparser per :data:`COMMANDS` entry."""
    from chip import __version__

    parser = _Parser(prog="chip", description="CHIP: channel independence-based pruning")
    parser.add_argument("--version", action="version", version=f"chip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (add_args, fn, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"chip: warning: {_one_line(Warning(str(message)))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``chip``; returns the exit status (2 on user errors)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `chip` alone: usage and the commands, not an error about a missing argument
        get_args_parser().print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = get_args_parser().parse_args(argv)
            _set_threads(getattr(args, "threads", None))
            return int(args.func(args) or 0)
    except ChipError as exc:
        print(f"chip: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `chip plan ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter's flush quiet
        return 1
    except OSError as exc:  # missing/unwritable files not caught as ChipError upstream
        print(f"chip: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
