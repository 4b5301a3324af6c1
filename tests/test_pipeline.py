"""Tests of ``chip run``: :mod:`chip.config` checks and overrides, :mod:`chip.pipeline` end to
end and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_RUN

import chip
from chip import cli, config, pipeline
from chip.criteria import CRITERIA
from chip.data import build_data
from chip.errors import ChipError

TINY = TINY_RUN


def _config(**changes) -> dict:
    cfg = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        config._set(cfg, dotted.replace("__", "."), value)
    return cfg


# ------------------------------------------------------------------------------ validation

BAD_CONFIGS = {
    "unknown-top-key": ({"colour": "red"}, "unknown config key 'colour'"),
    "unknown-nested-key": ({"data.nme": "x"}, "unknown config key 'data.nme'"),
    "unknown-train-key": ({"finetune.epoch": 3}, "unknown config key 'finetune.epoch'"),
    "wrong-type": ({"finetune.epochs": "many"}, "'finetune.epochs' must be int"),
    "bool-for-int": ({"seed": True}, "'seed' must be int"),
    "zero-batch": ({"data.batch_size": 0}, "'data.batch_size' must be >= 1"),
    "zero-image-size": ({"data.image_size": 0}, "'data.image_size' must be >= 1"),
    "two-targets": ({"target.rate": 0.3}, "exactly one pruning target"),
    "bad-sparsity": ({"target": {"sparsity": "[0.]+[0.4]*x"}}, "repeat count"),
    "warmup-too-long": (
        {"finetune.warmup_epochs": 5},
        "5 warm-up epochs need at least 6 epochs (got 1); lower "
        "finetune.warmup_epochs or raise finetune.epochs",
    ),
    "negative-lr": ({"baseline.lr": -1.0}, "invalid train config"),
    "no-arch": ({"arch": None}, "'arch' must be string"),
    "scalar-section": (
        {"calibration": 5},
        "'calibration' must be a mapping with keys calibration.batches",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configs_raise_one_line(name):
    changes, expected = BAD_CONFIGS[name]
    cfg = _config()
    for key, value in changes.items():
        if key == "target":
            cfg["target"] = value
        else:
            config._set(cfg, key, value)
    with pytest.raises(ChipError) as info:
        config.validate_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(
        ChipError, match="unknown config key 'finetune.epoch'; did you mean 'finetune.epochs'"
    ):
        config.validate_config(_config(finetune__epoch=3))
    with pytest.raises(ChipError, match="unknown config key 'colour'; see configs/README.md"):
        config.validate_config(_config(colour="red"))


def test_missing_target_and_required_keys():
    cfg = _config()
    del cfg["target"]
    with pytest.raises(ChipError, match="needs a pruning target"):
        config.validate_config(cfg)
    del cfg["arch"]
    with pytest.raises(ChipError, match="'arch' is required"):
        config.validate_config(cfg)


def test_defaults_filled_in():
    full = config.validate_config(_config())
    assert full["calibration"]["criterion"] == "chip" and full["target"]["round_to"] == 1
    assert full["data"]["train_subset"] is None and full["out_dir"] == "runs/chip"
    tc = config.train_config(full, "finetune")
    assert (tc.epochs, tc.lr, tc.batch_size, tc.momentum, tc.weight_decay) == (
        1,
        0.01,
        16,
        0.9,
        5e-3,
    )


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")))
def test_shipped_configs_validate(path):
    full = config.validate_config(config.load_config(path))
    assert full["arch"] in chip.models.list_models()


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: resnet20\ndata: {name: [digits\n")
    with pytest.raises(ChipError, match="not valid YAML .* at line") as info:
        config.load_config(bad)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- overrides

OVERRIDES = [
    (["--finetune.epochs", "3"], {"finetune.epochs": 3}),
    (["--data", "fashion-mnist"], {"data.name": "fashion-mnist"}),
    (["--data-dir=/x", "--workers", "2"], {"data.root": "/x", "data.workers": 2}),
    (["--target.sparsity", "[0.]+[0.1]*2"], {"target.sparsity": "[0.]+[0.1]*2"}),
    (
        ["--target.flops", "0.25", "--checkpoint", "null"],
        {"target.flops": 0.25, "checkpoint": None},
    ),
    (
        ["--finetune.milestones", "[1, 2]", "--out-dir", "runs/y"],
        {"finetune.milestones": [1, 2], "out_dir": "runs/y"},
    ),
]


@pytest.mark.parametrize("tokens,expected", OVERRIDES)
def test_parse_overrides(tokens, expected):
    overrides, flags = cli.parse_overrides(tokens + ["--quiet"])
    assert overrides == expected and flags == {"quiet"}


@pytest.mark.parametrize(
    "tokens,match",
    [
        (["--finetune.epoch", "3"], "unknown config key 'finetune.epoch'; did you mean"),
        (["--seed", "abc"], "'seed' must be int"),
        (["--seed"], "needs a value"),
        (["oops"], "unexpected argument"),
    ],
)
def test_bad_overrides(tokens, match):
    with pytest.raises(ChipError, match=match):
        cli.parse_overrides(tokens)


def test_target_override_replaces_the_config_kind():
    merged = config.merge_overrides(_config(), {"target.rate": 0.3})
    assert merged["target"] == {"rate": 0.3}
    assert config.resolve_target(config.validate_config(merged)["target"]) == 0.3


# ---------------------------------------------------------------------------------- run


def _stage_times(out: Path) -> dict[str, float]:
    return {p.stem: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}


def test_run_end_to_end_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(out_dir=str(out))))
    assert cli.main(["run", str(cfg_file), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| fine-tuned |" in printed and "MACs of conv+linear layers, batch 1" in printed

    summary = json.loads((out / "summary.json").read_text())
    model = chip.load(out / "model.chip")
    counts = chip.count(model, (1, 3, 8, 8))
    final = summary["rows"]["fine-tuned"]
    assert (final["params"], final["macs"]) == (counts.params, counts.macs)
    base = summary["rows"]["baseline"]
    assert (
        base["macs"] == chip.count(chip.models.create("resnet20", num_classes=4), (1, 3, 8, 8)).macs
    )
    assert final["macs"] <= 0.5 * base["macs"] and summary["widths"] == model.chip_plan.widths()
    assert summary["rows"]["pruned"]["params"] == final["params"]
    # the fine-tuned accuracy is that of model.chip on the validation set
    _, val, _ = build_data("synthetic", image_size=8, options=TINY["data"]["options"])
    model.eval()
    with torch.no_grad():
        hits = sum(int(model(x[None]).argmax(1).item() == y) for x, y in val)
    assert final["top1"] == pytest.approx(100.0 * hits / len(val))
    for name in (
        "scores.safetensors",
        "plan.json",
        "pruned.chip",
        "summary.md",
        "baseline/best.pt",
        "finetune/last.pt",
        "finetune/metrics.jsonl",
    ):
        assert (out / name).is_file(), name

    # same config again: every stage is skipped, the summary is unchanged
    before = _stage_times(out)
    again = pipeline.run(_config(out_dir=str(out)), progress=False)
    after = _stage_times(out)
    assert {k: v for k, v in after.items() if k != "summary"} == {
        k: v for k, v in before.items() if k != "summary"
    }
    assert again["rows"] == summary["rows"]

    # an interrupted fine-tune (no marker, last.pt present) resumes instead of starting over
    (out / "stages" / "finetune.json").unlink()
    resumed = pipeline.run(_config(out_dir=str(out)), progress=False)
    assert len((out / "finetune" / "metrics.jsonl").read_text().splitlines()) == 1
    assert resumed["rows"]["fine-tuned"] == summary["rows"]["fine-tuned"]
    assert _stage_times(out)["plan"] == before["plan"]

    # changing a fine-tune key redoes fine-tuning only (fresh: 2 epochs in metrics)
    pipeline.run(_config(out_dir=str(out), finetune__epochs=2), progress=False)
    now = _stage_times(out)
    assert now["prune"] == before["prune"] and now["finetune"] != before["finetune"]
    assert len((out / "finetune" / "metrics.jsonl").read_text().splitlines()) == 2


def test_run_bad_config_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(out_dir=str(out))))
    code = cli.main(["run", str(cfg_file), "--target.sparsity", "[0.]+[2.0]*29"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("chip: error: ")
    code = cli.main(["run", str(cfg_file), "--finetune.epoch", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'finetune.epochs'" in err and err.count("\n") == 1
    assert not out.exists()


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in path.read_text().splitlines()]


def test_run_is_reproducible_whatever_the_global_rng(tmp_path):
    summaries = []
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(1000 + i)  # a different global RNG state before each run
        summaries.append(pipeline.run(_config(out_dir=str(tmp_path / name)), progress=False))
    a, b = tmp_path / "a", tmp_path / "b"
    assert summaries[0]["rows"] == summaries[1]["rows"]
    for part in ("baseline", "finetune"):
        assert _losses(a / part / "metrics.jsonl") == _losses(b / part / "metrics.jsonl")
    sa, sb = (chip.ChannelScores.load(d / "scores.safetensors") for d in (a, b))
    for name, vec in sa.groups.items():
        assert torch.equal(vec, sb.groups[name])
    assert (
        json.loads((a / "plan.json").read_text())["groups"]
        == json.loads((b / "plan.json").read_text())["groups"]
    )


# ------------------------------------------------------------------------------- criteria


@pytest.mark.slow
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_run_with_every_criterion_of_the_table(tmp_path, criterion):
    out = tmp_path / criterion
    cfg = _config(out_dir=str(out), calibration__criterion=criterion)
    summary = pipeline.run(cfg, progress=False)
    assert summary["stages"]["score"]["criterion"] == criterion
    assert (
        json.loads((out / "stages" / "score.json").read_text())["result"]["criterion"] == criterion
    )
    assert (out / "model.chip").is_file()


def test_unknown_criterion_fails_before_the_baseline(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        ChipError,
        match="'calibration.criterion' must be one of chip, hrank, l1, random, got 'nope'",
    ):
        pipeline.run(_config(out_dir=str(out), calibration__criterion="nope"), progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_building_the_command_line_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, chip.cli; chip.cli.get_args_parser(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_option_catalogue_covers_the_training_recipe():
    from dataclasses import fields

    from chip.options import OPTIONS, TRAIN_OPTIONS
    from chip.recipe import TrainConfig

    assert set(TRAIN_OPTIONS) == {f.name for f in fields(TrainConfig)}
    assert all(
        o.help and o.flag.startswith("--") for o in [*OPTIONS.values(), *TRAIN_OPTIONS.values()]
    )
    assert set(config.valid_keys()) >= set(OPTIONS)
