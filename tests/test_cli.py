"""Tests of the ``chip`` command line: plan/score/prune/eval outputs, one-line errors, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import chip
from chip import cli
from chip.calibration import ChannelScores, calibrate
from chip.data import build_datasets, calibration_loader
from chip.models import create
from chip.planning import plan
from chip.prune import apply

RESNET56_ROWS = ["[0.]+[0.15]*2+[0.4]*27", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9"]
SYNTH = [
    "--data",
    "synthetic",
    "--data-opt",
    "train_size=48",
    "--data-opt",
    "val_size=30",
    "--data-opt",
    "num_classes=4",
    "--data-opt",
    "image_size=8",
]
SYNTH_OPTS = dict(train_size=48, val_size=30, num_classes=4, image_size=8)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- plain oracles


def _rates(text: str) -> list[float]:
    """Sparsity string -> rates, by plain string handling (not chip.planning)."""
    rates = []
    for term in text.split("+"):
        rate, _, times = term.partition("*")
        rates += [float(rate.strip("[]"))] * int(times or 1)
    return rates


def resnet_cifar_counts(n: int, stream: list[int], inner: list[int], classes: int = 10):
    """Params and conv+linear MACs of an option-A CIFAR ResNet with the given widths (32x32)."""
    params = 3 * stream[0] * 9 + 2 * stream[0]
    macs = 32 * 32 * 3 * stream[0] * 9
    c_in, size = stream[0], 32
    for s in range(3):
        for b in range(n):
            if b == 0 and s > 0:
                size //= 2
            w, out = inner[s * n + b], stream[s]
            params += c_in * w * 9 + 2 * w + w * out * 9 + 2 * out
            macs += size * size * (c_in * w * 9 + w * out * 9)
            c_in = out
    params += stream[2] * classes + classes
    macs += stream[2] * classes
    return params, macs


# ------------------------------------------------------------------------------------ plan


@pytest.mark.parametrize("sparsity", RESNET56_ROWS)
def test_plan_json_resnet56_widths_and_counts(capsys, sparsity):
    code, out, err = run_cli(capsys, "plan", "--arch", "resnet56", "--sparsity", sparsity, "--json")
    assert code == 0
    assert len(out.strip().splitlines()) == 1  # one JSON object and nothing else on stdout
    got = json.loads(out)
    r = _rates(sparsity)
    stream = [int(16 * (1 - r[1])), int(32 * (1 - r[2])), 64]
    inner = [int(c * (1 - rate)) for c, rate in zip([16] * 9 + [32] * 9 + [64] * 9, r[3:])]
    widths = got["widths"]
    assert widths["conv1"] == stream[0] and widths["layer2.0.conv2"] == stream[1]
    assert widths["layer3.0.conv2"] == 64
    assert [widths[f"layer{s}.{b}.conv1"] for s in (1, 2, 3) for b in range(9)] == inner
    assert (got["base_params"], got["base_macs"]) == resnet_cifar_counts(
        9, [16, 32, 64], [16] * 9 + [32] * 9 + [64] * 9
    )
    assert (got["params"], got["macs"]) == resnet_cifar_counts(9, stream, inner)
    assert "no --scores" in err


def test_plan_table_names_convention_and_writes_plan(capsys, tmp_path):
    out_file = tmp_path / "p.json"
    code, out, err = run_cli(
        capsys, "plan", "--arch", "resnet20", "--flops", "0.5", "--round-to", "4", "--out", out_file
    )
    assert code == 0
    assert "MACs of conv+linear layers, batch 1" in out and "layer3.2.conv1" in out
    saved = chip.PruningPlan.load(out_file)
    assert all(w % 4 == 0 for w in saved.widths().values())
    assert saved.stats["macs"] <= 0.5 * saved.stats["base_macs"]


# ------------------------------------------------------------------------- score / prune


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A resnet20 checkpoint and its scores written by `chip score` on tiny synthetic data."""
    root = tmp_path_factory.mktemp("scored")
    torch.manual_seed(0)
    model = create("resnet20", num_classes=4)
    for m in model.modules():  # non-trivial BN so that pruned != unpruned by accident
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.weight.data.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / "ckpt.pt")
    code = cli.main(
        [
            "score",
            "--arch",
            "resnet20",
            "--checkpoint",
            str(root / "ckpt.pt"),
            *SYNTH,
            "--batches",
            "2",
            "--batch-size",
            "8",
            "--seed",
            "3",
            "--quiet",
            "--out",
            str(root / "scores.safetensors"),
        ]
    )
    assert code == 0
    return root, model


def test_score_writes_the_library_scores(scored):
    root, model = scored
    scores = ChannelScores.load(root / "scores.safetensors")
    train, _, _ = build_datasets("synthetic", **SYNTH_OPTS)
    ref = calibrate(model, calibration_loader(train, 2, 8, seed=3), 2, "cpu", 3, progress=False)
    assert scores.num_samples == 16 and set(scores.groups) == set(ref.groups)
    for name, vec in ref.groups.items():
        torch.testing.assert_close(scores.groups[name], vec, rtol=1e-12, atol=0)


def test_prune_writes_loadable_artifact(capsys, scored, tmp_path):
    root, model = scored
    out = tmp_path / "p.chip"
    code, text, _ = run_cli(
        capsys,
        "prune",
        "--arch",
        "resnet20",
        "--num-classes",
        "4",
        "--input-size",
        "3,8,8",
        "--checkpoint",
        root / "ckpt.pt",
        "--scores",
        root / "scores.safetensors",
        "--flops",
        "0.5",
        "--out",
        out,
    )
    assert code == 0 and "MACs" in text
    loaded = chip.load(out)
    scores = ChannelScores.load(root / "scores.safetensors")
    expected = apply(model, plan(model, scores, "flops=0.5", input_size=(1, 3, 8, 8)))
    assert loaded.chip_plan.widths() == expected.chip_plan.widths()
    x = torch.randn(5, 3, 8, 8)
    loaded.eval(), expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x))


def _eval_oracle(model, dataset) -> float:
    """Top-1 (percent) by a plain per-image loop."""
    model.eval()
    with torch.no_grad():
        hits = sum(int(model(x[None]).argmax(1).item() == y) for x, y in dataset)
    return 100.0 * hits / len(dataset)


def test_eval_json_matches_plain_loop(capsys, scored):
    root, model = scored
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--arch",
        "resnet20",
        "--checkpoint",
        root / "ckpt.pt",
        *SYNTH,
        "--batch-size",
        "7",
        "--json",
        "--quiet",
    )
    assert code == 0
    got = json.loads(out)
    _, val, _ = build_datasets("synthetic", **SYNTH_OPTS)
    assert got["n"] == 30
    assert got["top1"] == pytest.approx(_eval_oracle(model, val), abs=1e-9)
    assert got["params"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------- user errors

BAD_ARGS = {
    "unknown-command": ["frobnicate"],
    "missing-arch": ["plan", "--sparsity", "[0.1]"],
    "two-targets": ["plan", "--arch", "resnet56", "--rate", "0.3", "--flops", "0.5"],
    "bad-sparsity-syntax": ["plan", "--arch", "resnet56", "--sparsity", "[0.4]*x"],
    "sparsity-wrong-length": ["plan", "--arch", "resnet56", "--sparsity", "[0.]+[0.4]*3"],
    "rate-out-of-range": ["plan", "--arch", "resnet56", "--sparsity", "[0.]+[1.5]*29"],
    "unknown-arch": ["plan", "--arch", "resnet9000", "--rate", "0.3"],
    "zero-round-to": ["plan", "--arch", "resnet20", "--rate", "0.3", "--round-to", "0"],
    "bad-input-size": ["plan", "--arch", "resnet20", "--rate", "0.3", "--input-size", "3,x"],
    "missing-scores": ["plan", "--arch", "resnet20", "--rate", "0.3", "--scores", "nope.st"],
    "unknown-dataset": ["score", "--arch", "resnet20", "--data", "nope", "--out", "{tmp}/s.st"],
    "bad-flag": ["eval", "--model", "x.chip", "--data", "digits", "--frobnicate"],
    "missing-model": ["eval", "--model", "{tmp}/missing.chip", "--data", "digits"],
    "missing-checkpoint": [
        "prune",
        "--arch",
        "resnet20",
        "--checkpoint",
        "{tmp}/no.pt",
        "--scores",
        "{tmp}/no.st",
        "--rate",
        "0.3",
        "--out",
        "{tmp}/p.chip",
    ],
    "run-missing-config": ["run", "{tmp}/none.yaml"],
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_user_errors_are_one_line_exit_2(capsys, tmp_path, name):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in BAD_ARGS[name]]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chip: error: "), err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_prune_error_leaves_no_output(capsys, scored, tmp_path):
    root, _ = scored
    out = tmp_path / "p.chip"
    code, _, err = run_cli(
        capsys,
        "prune",
        "--arch",
        "resnet20",
        "--num-classes",
        "4",
        "--checkpoint",
        root / "ckpt.pt",
        "--scores",
        root / "scores.safetensors",
        "--sparsity",
        "[0.]+[0.5]*2",
        "--out",
        out,
    )
    assert code == 2 and err.startswith("chip: error: sparsity string")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- subprocesses

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_python_m_chip_real_process():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "chip",
            "plan",
            "--arch",
            "resnet56",
            "--sparsity",
            RESNET56_ROWS[0],
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (
        json.loads(ok.stdout)["params"]
        == resnet_cifar_counts(9, [13, 27, 64], [9] * 9 + [19] * 9 + [38] * 9)[0]
    )
    bad = subprocess.run(
        [sys.executable, "-m", "chip", "plan", "--arch", "resnet56", "--sparsity", "[0.]+[0.4]"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("chip: error: ")


def _torchrun(*argv, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "chip",
        *map(str, argv),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)


@pytest.mark.slow
def test_torchrun_two_process_finetune_and_exact_eval(capsys, scored, tmp_path):
    root, _ = scored
    pruned = tmp_path / "p.chip"
    assert (
        cli.main(
            [
                "prune",
                "--arch",
                "resnet20",
                "--num-classes",
                "4",
                "--input-size",
                "3,8,8",
                "--checkpoint",
                str(root / "ckpt.pt"),
                "--scores",
                str(root / "scores.safetensors"),
                "--rate",
                "0.5",
                "--out",
                str(pruned),
            ]
        )
        == 0
    )
    ft = _torchrun(
        "finetune",
        "--model",
        pruned,
        *SYNTH,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "8",
        "--out-dir",
        tmp_path / "ft",
        "--quiet",
        "--device",
        "cpu",
    )
    assert ft.returncode == 0, ft.stderr[-2000:]
    assert ft.stdout.count("best val top-1") == 1  # only rank 0 prints
    model_file = tmp_path / "ft" / "model.chip"
    assert chip.load(model_file).chip_plan.widths() == chip.load(pruned).chip_plan.widths()
    capsys.readouterr()
    argv = ["eval", "--model", model_file, *SYNTH, "--batch-size", "4", "--json", "--device", "cpu"]
    code, single, _ = run_cli(capsys, *argv, "--quiet")
    assert code == 0
    two = _torchrun(*argv)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(single), json.loads(two.stdout)
    assert (b["n"], b["top1"], b["top5"]) == (a["n"], a["top1"], a["top5"]) and a["n"] == 30


@pytest.mark.slow
def test_torchrun_two_process_score_equals_single_process(scored, tmp_path):
    """Each rank scores a disjoint half of the calibration images; the all-reduced sums give the
    single-process scores, and both ranks build the same plan (rank 0 writes the file)."""
    root, _ = scored
    out = tmp_path / "two.safetensors"
    two = _torchrun(
        "score",
        "--arch",
        "resnet20",
        "--checkpoint",
        root / "ckpt.pt",
        *SYNTH,
        "--batches",
        "2",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one, both = ChannelScores.load(root / "scores.safetensors"), ChannelScores.load(out)
    assert both.num_samples == one.num_samples == 16
    for name, vec in one.groups.items():
        torch.testing.assert_close(both.groups[name], vec, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_subcommand(capsys, scored, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
    root, _ = scored
    pruned = tmp_path / "p.chip"
    assert (
        cli.main(
            [
                "prune",
                "--arch",
                "resnet20",
                "--num-classes",
                "4",
                "--input-size",
                "3,8,8",
                "--checkpoint",
                str(root / "ckpt.pt"),
                "--scores",
                str(root / "scores.safetensors"),
                "--rate",
                "0.5",
                "--out",
                str(pruned),
            ]
        )
        == 0
    )
    out = tmp_path / ("m.pt" if fmt == "torchscript" else "m.onnx")
    code, stdout, _ = run_cli(capsys, "export", "--model", pruned, "--format", fmt, "--out", out)
    assert code == 0 and out.stat().st_size > 0 and "wrote" in stdout
    if fmt == "torchscript":
        x = torch.randn(3, 3, 8, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch
            scripted = torch.jit.load(str(out))
        torch.testing.assert_close(scripted(x), chip.load(pruned)(x))
    code, _, err = run_cli(
        capsys,
        "export",
        "--model",
        tmp_path / "none.chip",
        "--format",
        fmt,
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and err.startswith("chip: error:") and not (tmp_path / "x").exists()


def test_download_and_tensorboard_flags_reach_the_library(monkeypatch):
    import chip.data
    from chip.data import build_data

    seen = {}

    def fake_build_datasets(name, root=None, *, train_augment=True, download=False, **opts):
        seen["download"] = download
        raise chip.ChipError("stop here")

    monkeypatch.setattr(chip.data, "build_datasets", fake_build_datasets)
    with pytest.raises(chip.ChipError, match="stop here"):
        build_data("cifar10", "/nowhere", download=True)
    assert seen == {"download": True}
    assert cli.main(
        ["eval", "--arch", "resnet20", "--checkpoint", "x.pt", "--data", "cifar10", "--download"]
    ) == 2 and seen == {"download": True}
    parser = cli.get_args_parser()
    args = parser.parse_args(
        ["train", "--arch", "resnet20", "--data", "digits", "--out-dir", "o", "--tensorboard"]
    )
    assert cli._train_config(args, cli._train_defaults(), "train").tensorboard is True


def test_chip_alone_prints_usage_and_the_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chip") and all(name in out for name in cli.COMMANDS)
