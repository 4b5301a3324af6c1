"""bench/study_fashion_mnist.py end to end on tiny Fashion-MNIST IDX files: cells, cache, resume,
stability and the RESULTS.md it writes; bench/study_allocation.py's --shard check."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_module, write_idx

STUDY = Path(__file__).parents[1] / "bench" / "study_fashion_mnist.py"


@pytest.fixture()
def study_module(monkeypatch):
    module = load_module(STUDY, "chip_study_fashion_mnist")
    # tiny calibration: 2 x 8 images per cell, 4 x 8 images for the stability check
    monkeypatch.setattr(module, "CAL_BATCHES", 2)
    monkeypatch.setattr(module, "CAL_BATCH_SIZE", 8)
    monkeypatch.setattr(module, "STABILITY_BATCHES", 4)
    monkeypatch.setattr(module, "STABILITY_KS", (2, 4, 8))  # 8 > 4 batches: skipped
    return module


def _write_fashion(root: Path, train=64, test=32) -> None:
    """Learnable tiny IDX data: the class sets the brightness of a 7-pixel-wide column."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        y = rng.integers(0, 4, n).astype(np.uint8)
        x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, :, 7 * c : 7 * c + 7] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz=False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz=False)


def test_study_runs_caches_resumes_and_reports(study_module, tmp_path):
    torch.set_num_threads(1)
    m = study_module
    root = tmp_path / "fmnist"
    _write_fashion(root)
    out = tmp_path / "study"
    settings = m.Settings(baseline_epochs=1, finetune_epochs=1, seeds=2, batch_size=16)
    study = m.Study(out, settings, torch.device("cpu"), progress=False, data_root=root)
    criteria = ("chip", "l1")
    study.run(criteria)

    record = json.loads((out / "baseline.json").read_text())
    cells = study.cells()
    assert len(cells) == 2 * len(criteria) * settings.seeds
    for c in cells:
        assert c["params"] < record["params"] and c["macs"] < record["macs"]
        if c["target"] == "flops":
            assert c["macs"] <= 0.5 * record["macs"] * 1.01
        for key in ("top1_pruned", "top1_finetuned"):
            assert 0.0 <= c[key] <= 100.0
    # the sparsity target gives every criterion identical widths (only the chosen channels differ)
    widths = {json.dumps(c["widths"], sort_keys=True) for c in cells if c["target"] == "sparsity"}
    assert len(widths) == 1

    # stability: K=8 needs more batches than the 4 there are, so only K=2 and K=4 ran
    stab = json.loads((out / "stability.json").read_text())
    assert [(r["criterion"], r["k"]) for r in stab["reports"]] == [
        (c, k) for c in m.STABILITY_CRITERIA for k in (2, 4)
    ]
    assert all(r["samples_per_subset"][0] == 4 * 8 // r["k"] for r in stab["reports"])

    # resume: every cell, the baseline and the stability check come from the cache
    def boom(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    study.run_cell = boom
    study.run(criteria)

    # a different setting is refused rather than mixed into the cache
    other = m.Study(
        out,
        m.Settings(baseline_epochs=2, seeds=2, batch_size=16),
        torch.device("cpu"),
        progress=False,
        data_root=root,
    )
    with pytest.raises(SystemExit, match="other settings"):
        other.run(criteria)

    results = tmp_path / "docs" / "RESULTS.md"
    m.write_results(study, results, "python bench/study_fashion_mnist.py", None, "report")
    text = results.read_text()
    png = results.with_name("study_fashion_mnist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each table row's mean +- std equals the cells' statistics computed here
    for target in ("sparsity", "flops"):
        for crit in criteria:
            group = [c for c in cells if c["target"] == target and c["criterion"] == crit]
            row = re.search(rf"^\| {target} \| {crit} \|.*$", text, re.M).group(0)
            for key in ("top1_pruned", "top1_finetuned"):
                vals = [c[key] for c in group]
                expect = f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"
                assert expect in row, (row, expect)
        # the order line lists the criteria by their recomputed means, best first
        means = {
            c: statistics.fmean(
                x["top1_finetuned"] for x in cells if x["target"] == target and x["criterion"] == c
            )
            for c in criteria
        }
        order = " > ".join(f"{c} {means[c]:.2f}" for c in sorted(criteria, key=lambda c: -means[c]))
        assert f"* `{target}`, after fine-tuning: {order}" in text
    assert f"{record['best_top1']:.2f}%" in text
    assert "## Is 2 x 8 images enough?" in text
    assert text.count("| random |") == 2
    assert "## GPU check" in text and "Not run for this file" in text

    gpu = tmp_path / "gpu.txt"
    gpu.write_text("metric | value\nci ms | 1.0\n")
    m.write_results(study, results, "python bench/study_fashion_mnist.py", gpu, "report")
    text = results.read_text()
    assert "ci ms | 1.0" in text and "Not run for this file" not in text


@pytest.mark.parametrize("text", ["2/2", "0/0", "-1/2", "1", "a/b"])
def test_allocation_study_refuses_a_bad_shard(text, capsys):
    module = load_module(STUDY.with_name("study_allocation.py"), "chip_study_allocation")
    assert module._shard("1/2") == (1, 2)
    with pytest.raises(SystemExit) as e:
        module._shard(text)
    assert e.value.code == 2
    assert "expected i/n with 0 <= i < n" in capsys.readouterr().err
