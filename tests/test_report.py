"""Tests of :mod:`chip.report` / ``chip report``: files, numbers from summary.json, missing parts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import TINY_RUN

from chip import cli, pipeline, report
from chip.errors import ChipError

# two epochs per stage, so the training curves have lines, not points
TINY = {
    **TINY_RUN,
    "baseline": {**TINY_RUN["baseline"], "epochs": 2},
    "finetune": {**TINY_RUN["finetune"], "epochs": 2},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny finished ``chip run`` (its report is written by the pipeline itself)."""
    out = tmp_path_factory.mktemp("report") / "run"
    pipeline.run({**TINY, "out_dir": str(out)}, progress=False)
    return out


@pytest.fixture
def copy_of(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_pipeline_writes_report(run_dir):
    text = (run_dir / "report.md").read_text()
    for name, (title, _) in report.FIGURES.items():
        width, height = _png_size(run_dir / name)
        assert width > 300 and height > 150, name
        assert f"![{title}]({name})" in text
    assert not list(run_dir.glob("*.tmp*")), "temporary files left behind"


def _expected_cells(summary: dict) -> list[str]:
    """The numbers of summary.json as the report must print them (independent formatting)."""
    cells = []
    base = summary["rows"]["baseline"]
    for label, row in summary["rows"].items():
        params_cut = 100.0 * (1.0 - row["params"] / base["params"])
        cells.append(
            f"| {label} | {row['params'] / 1e6:.3f}M | {row['macs'] / 1e6:.3f}M | {params_cut:.1f}%"
        )
        cells.append(f"| {row['top1']:.2f} | {row['top5']:.2f} |")
    return cells


def test_report_numbers_match_summary(copy_of):
    path = report.write_report(copy_of)
    assert path == copy_of / "report.md"
    text = path.read_text()
    summary = json.loads((copy_of / "summary.json").read_text())
    for cell in _expected_cells(summary):
        assert cell in text, cell
    assert summary["macs_convention"] in text
    for group, kept in summary["widths"].items():
        assert f"| {group} | {summary['channels'][group]} | {kept} |" in text
    # latency measured for baseline and fine-tuned, speed-up = their ratio
    row = next(line for line in text.splitlines() if line.startswith("| fine-tuned |"))
    ms, speed = row.split("|")[6:8]
    assert float(ms) > 0 and speed.strip().endswith("x")
    base_row = next(line for line in text.splitlines() if line.startswith("| baseline |"))
    base_ms = float(base_row.split("|")[6])
    # both latencies are printed rounded to 0.001 ms, the speed-up from the unrounded ones
    low = (base_ms - 0.0005) / (float(ms) + 0.0005)
    high = (base_ms + 0.0005) / (float(ms) - 0.0005)
    assert low - 0.005 <= float(speed.strip()[:-1]) <= high + 0.005


# removed files -> (figure no longer drawn or None, text the report must contain)
MISSING = {
    "scores": (["scores.safetensors"], "report_scores.png", "Not drawn: no scores.safetensors"),
    "curves": (
        ["baseline/metrics.jsonl", "finetune/metrics.jsonl"],
        "report_training.png",
        "Not drawn: no metrics.jsonl",
    ),
    "final-model": (["model.chip"], None, "latency omitted: model.chip"),
    "baseline-ckpt": (["baseline/best.pt"], None, "baseline latency omitted"),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_parts_are_noted(copy_of, case):
    removed, figure, note = MISSING[case]
    for name in removed:
        (copy_of / name).unlink()
    text = report.write_report(copy_of).read_text()
    assert note in text
    if figure is not None:
        assert not (copy_of / figure).exists() and f"]({figure})" not in text
    drawn = [n for n in report.FIGURES if n != figure]
    assert all((copy_of / n).is_file() for n in drawn)


def test_no_latency_flag(copy_of):
    text = report.write_report(copy_of, latency=False).read_text()
    assert "latency not measured" in text


@pytest.mark.parametrize(
    "values,scale",
    [
        ([1.0, 2.0, 15.0], "linear"),
        ([1.0, 2.0, 50.0], "log"),
        ([0.01, 5.0], "log"),
        ([0.0, 0.01, 5.0], "log"),  # zeros do not count towards the range
        ([0.0, 0.0], "linear"),
    ],
)
def test_score_scale(values, scale):
    assert report._score_scale(values) == scale


def test_missing_run_dir_is_chip_error(tmp_path):
    with pytest.raises(ChipError, match="run directory not found") as info:
        report.write_report(tmp_path / "nope")
    assert "\n" not in str(info.value)
    with pytest.raises(ChipError, match="no summary.json"):
        report.write_report(tmp_path)


def test_cli_report(copy_of, tmp_path, capsys):
    (copy_of / "report.md").unlink()
    assert cli.main(["report", str(copy_of), "--no-latency"]) == 0
    assert "report.md" in capsys.readouterr().out and (copy_of / "report.md").is_file()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "chip: error: run directory not found" in capsys.readouterr().err


def test_report_failure_does_not_fail_run(run_dir, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="chip.pipeline"):
        summary = pipeline.run({**TINY, "out_dir": str(run_dir)}, progress=False)
    assert summary["rows"]["fine-tuned"]["top1"] is not None
    assert any(
        "report not written" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records
    )
