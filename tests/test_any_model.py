"""Your own model from the command line: torchvision, timm and user code through every command,
artifacts reopened in a new process, ``chip run`` on an image folder, and the checks that run
before any work (one line, exit status 2, nothing created)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import chip
from chip import cli
from chip.options import ZOO

REPO = Path(__file__).parents[1]
USER = f"{REPO / 'tests' / 'user_model.py'}:build"
SYNTHETIC = [
    "--data",
    "synthetic",
    "--data-opt",
    "train_size=16",
    "--data-opt",
    "val_size=8",
    "--data-opt",
    "num_classes=10",
    "--data-opt",
    "image_size=32",
]

# model source -> (extra flags, needs --trust-code)
SOURCES = {
    "torchvision": ("torchvision:resnet18", ["--model-kwargs", "num_classes=10"], False),
    "timm": ("timm:resnet18", ["--model-kwargs", "num_classes=10"], False),
    "user": (USER, ["--model-kwargs", "width=8,num_classes=10"], True),
}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _new_process(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chip", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SOURCES))
def test_every_command_on_any_model(name, capsys, tmp_path):
    source, extra, trusted = SOURCES[name]
    trust = ["--trust-code"] if trusted else []
    if name == "timm":
        pytest.importorskip("timm")
    kwargs = {"num_classes": 10} if not trusted else {"width": 8, "num_classes": 10}
    model = chip.models.create(source, trust_code=trusted, **kwargs)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    model_flags = ["--arch", source, *extra, "--checkpoint", tmp_path / "ckpt.pt", *trust]

    code, out, err = _cli(
        capsys,
        "score",
        *model_flags,
        *SYNTHETIC,
        "--batches",
        "1",
        "--batch-size",
        "4",
        "--out",
        tmp_path / "s.safetensors",
        "--quiet",
    )
    assert code == 0, err
    assert f"of {source} on 4 synthetic samples" in out
    code, out, err = _cli(
        capsys,
        "plan",
        "--arch",
        source,
        *extra,
        *trust,
        "--input-size",
        "3,32,32",
        "--flops",
        "0.5",
        "--scores",
        tmp_path / "s.safetensors",
        "--out",
        tmp_path / "plan.json",
    )
    assert code == 0, err and "input 3x32x32" in out
    # --plan holds the kept channels: no --scores needed
    code, out, err = _cli(
        capsys,
        "prune",
        *model_flags,
        "--plan",
        tmp_path / "plan.json",
        "--out",
        tmp_path / "p.chip",
    )
    assert code == 0, err
    assert f"pruned {source} (flops=0.5)" in out

    # the artifact reopens in a new process; user code only with the trust flag
    argv = ["eval", "--model", tmp_path / "p.chip", *SYNTHETIC, "--json"]
    if trusted:
        refused = _new_process(*argv)
        assert refused.returncode == 2 and "--trust-code" in refused.stderr
        assert refused.stderr.count("\n") == 1
    done = _new_process(*argv, *trust)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["params"] == json.loads((tmp_path / "plan.json").read_text())["stats"]["params"]

    code, out, err = _cli(
        capsys,
        "export",
        "--model",
        tmp_path / "p.chip",
        *trust,
        "--format",
        "torchscript",
        "--out",
        tmp_path / "m.pt",
    )
    assert code == 0, err and (tmp_path / "m.pt").is_file()
    code, out, err = _cli(
        capsys,
        "finetune",
        "--model",
        tmp_path / "p.chip",
        *trust,
        *SYNTHETIC,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "8",
        "--out-dir",
        tmp_path / "ft",
        "--quiet",
    )
    assert code == 0, err
    again = chip.load(tmp_path / "ft" / "model.chip", trust_code=trusted)
    assert again.chip_arch == source


def _write_image_folder(root: Path, classes=2, train=4, val=2, size=16) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


RUN = {
    "arch": "torchvision:resnet18",
    "model_kwargs": {"num_classes": 2, "zero_init_residual": True},
    "seed": 0,
    "threads": 1,
    "data": {"name": "imagefolder", "image_size": 16, "batch_size": 4},
    "baseline": {"epochs": 1, "warmup_epochs": 0, "lr": 0.05},
    "calibration": {"batches": 1, "batch_size": 4},
    "target": {"flops": 0.5},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "lr": 0.01},
}


@pytest.mark.slow
def test_chip_run_on_a_torchvision_model_and_an_image_folder(tmp_path):
    from chip.pipeline import run

    _write_image_folder(tmp_path / "images")
    cfg = json.loads(json.dumps(RUN))
    cfg["data"]["root"] = str(tmp_path / "images")
    cfg["out_dir"] = str(tmp_path / "run")
    summary = run(cfg, progress=False)
    rows = summary["rows"]
    assert rows["pruned"]["macs"] <= 0.5 * rows["baseline"]["macs"]
    assert chip.load(tmp_path / "run" / "model.chip").chip_arch == "torchvision:resnet18"


# ------------------------------------------------------------------ checks before any work


def _bad_pt(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(bytes(range(256)) * 4)
    return path


BAD = {
    "input-size-rank": (
        ["plan", "--arch", "resnet20", "--flops", "0.5", "--input-size", "3,16"],
        "has 2 numbers; resnet20 starts with a Conv2d, which reads C,H,W",
    ),
    "input-size-unknown": (
        ["plan", "--arch", "torchvision:resnet18", "--flops", "0.5"],
        "input size of torchvision:resnet18 is not known.*--input-size C,H,W",
    ),
    "device-cuda": (
        [
            "score",
            "--arch",
            "resnet20",
            *SYNTHETIC,
            "--device",
            "cuda",
            "--out",
            "{tmp}/s.safetensors",
        ],
        "device 'cuda' is not available",
    ),
    "device-gpu": (
        [
            "eval",
            "--arch",
            "resnet20",
            "--checkpoint",
            "{tmp}/ckpt.pt",
            *SYNTHETIC,
            "--device",
            "gpu",
        ],
        "unknown device 'gpu'; expected cpu, cuda",
    ),
    "channels": (
        [
            "finetune",
            "--model",
            "{tmp}/m.chip",
            *SYNTHETIC,
            "--data-opt",
            "in_channels=1",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--out-dir",
            "{tmp}/ft",
        ],
        "the data synthetic has 1-channel images but resnet20 reads 3",
    ),
    "empty-pt": (
        ["eval", "--arch", "resnet20", "--checkpoint", "{tmp}/empty.pt", *SYNTHETIC],
        "is empty \\(0 bytes\\); expected a state_dict saved with torch.save",
    ),
    "truncated-pt": (
        ["eval", "--arch", "resnet20", "--checkpoint", "{tmp}/truncated.pt", *SYNTHETIC],
        "is truncated or corrupted",
    ),
    "random-pt": (
        ["eval", "--arch", "resnet20", "--checkpoint", "{tmp}/random.pt", *SYNTHETIC],
        "is not a torch.save file",
    ),
    "warmup": (
        [
            "finetune",
            "--model",
            "{tmp}/m.chip",
            *SYNTHETIC,
            "--epochs",
            "1",
            "--out-dir",
            "{tmp}/ft",
        ],
        "5 warm-up epochs need at least 6 epochs \\(got 1\\); lower "
        "--warmup-epochs or raise --epochs",
    ),
    "layers-rate": (
        ["plan", "--arch", "resnet20", "--layers", "{tmp}/layers.yaml"],
        "rate 1.5 for layer 'layer1.0.conv1' is not a fraction",
    ),
    "user-code": (
        ["plan", "--arch", USER, "--input-size", "3,16,16", "--flops", "0.5"],
        "is the user's code.*pass --trust-code",
    ),
    "unknown-model": (
        ["plan", "--arch", "resnet999", "--flops", "0.5"],
        "unknown model 'resnet999'; expected a zoo name",
    ),
    "classes": (
        ["eval", "--model", "{tmp}/m.chip", *SYNTHETIC, "--data-opt", "num_classes=12"],
        "the data synthetic has 12 classes but resnet20 outputs 10; use --num-classes 12",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(name, capsys, tmp_path):
    model = chip.models.create("resnet20")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    chip.save(model, tmp_path / "m.chip")
    for kind in ("empty", "truncated", "random"):
        _bad_pt(tmp_path, kind)
    (tmp_path / "layers.yaml").write_text("layer1.0.conv1: 1.5\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv, message = BAD[name]
    code, out, err = _cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2, (out, err)
    assert err.startswith("chip: error: ") and err.count("\n") == 1, err
    import re

    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


CHECKS = {
    "sparsity-length": (
        {"target": {"sparsity": "[0.]+[0.4]*3"}},
        "sparsity string for resnet20 has 4 rates; expected exactly 12",
    ),
    "missing-checkpoint": ({"checkpoint": "{tmp}/nope.pt"}, "nope.pt"),
    "empty-split": (
        {
            "data": {
                "name": "synthetic",
                "batch_size": 16,
                "image_size": 8,
                "options": {"train_size": 0, "val_size": 8, "num_classes": 4},
            }
        },
        "training split of synthetic is empty",
    ),
    "unwritable": ({"out_dir": "{tmp}/a-file/run"}, "cannot write run directory"),
    "device": ({"device": "cuda:3"}, "device 'cuda:3'"),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_chip_run_checks_before_the_baseline(name, tmp_path):
    from helpers import TINY_RUN

    from chip.errors import ChipError
    from chip.pipeline import run

    cfg = json.loads(json.dumps(TINY_RUN))
    changes, message = CHECKS[name]
    cfg.update(json.loads(json.dumps(changes).replace("{tmp}", str(tmp_path))))
    cfg.setdefault("out_dir", str(tmp_path / "run"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ChipError, match=message):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_help_names_the_zoo_and_the_prefixes():
    assert ZOO == tuple(chip.models.list_models()) or set(ZOO) == set(chip.models.list_models())
    parser = cli.get_args_parser()
    plan = parser._subparsers._group_actions[0].choices["plan"].format_help()
    assert "torchvision:NAME" in plan and "timm:NAME" in plan and "resnet56" in plan


def test_flags_appear_only_where_they_act():
    commands = cli.get_args_parser()._subparsers._group_actions[0].choices
    text = commands["export"].format_help()
    assert "--seed" not in text and "--workers" not in text
    # plan and prune read data for --allocation sensitivity and --recalibrate-bn
    for command in ("score", "train", "finetune", "eval", "plan", "prune"):
        assert "--workers" in commands[command].format_help(), command
    for command in ("score", "plan", "prune"):
        assert "--seed" in commands[command].format_help(), command
    assert "--recalibrate-bn" in commands["prune"].format_help()
    assert "--recalibrate-bn" not in commands["plan"].format_help()


def test_reprs_are_summaries():
    model = chip.models.create("resnet56")
    scores = chip.calibrate(model, [torch.randn(2, 3, 32, 32)], num_batches=1, progress=False)
    plan = chip.plan(model, scores, "flops=0.5")
    assert len(repr(scores)) < 200 and len(repr(plan)) < 250
    assert "resnet56" in repr(plan) and "flops=0.5" in repr(plan)
    assert len(plan.table().splitlines()) == len(plan.groups) + 1
    assert len(scores.table().splitlines()) == len(scores.groups) + 1


def test_a_builder_without_num_classes_gets_only_what_it_takes(capsys, tmp_path):
    fixed = f"{REPO / 'tests' / 'user_model.py'}:build_fixed"
    scores = tmp_path / "s.json"
    code, _, err = _cli(
        capsys, "score", "--arch", fixed, "--trust-code", *SYNTHETIC, "--out", scores,
        "--batches", "1", "--input-size", "3,32,32",
    )  # fmt: skip
    assert code == 0, err
    from chip.calibration import ChannelScores

    assert ChannelScores.load(scores).num_samples == 16
    # a builder that takes num_classes still gets the data's
    from chip.models.sources import resolve_source

    assert resolve_source(fixed).data_sizes(10, 3, trust_code=True) == (None, None)
    assert resolve_source(USER).data_sizes(10, 3, trust_code=True) == (10, None)
    assert resolve_source("torchvision:resnet18").data_sizes(10, 3) == (10, 3)
    # precedence for the command line and chip run: explicit, then model_kwargs, then data
    from chip.models.sources import build_kwargs

    tv = "torchvision:resnet18"
    assert build_kwargs(tv, {"num_classes": 5}, data=(10, 3)) == {
        "num_classes": 5,
        "in_channels": 3,
    }
    assert build_kwargs(tv, {"num_classes": 5}, num_classes=7, data=(10, 3))["num_classes"] == 7
    assert build_kwargs(fixed, {"width": 4}, data=(10, 3), trust_code=True) == {"width": 4}
