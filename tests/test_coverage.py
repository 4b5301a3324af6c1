"""The coverage matrix (``bench/coverage.py``): every torchvision classification and segmentation
builder and a set of timm models go through calibrate -> ``flops=0.5`` -> apply -> forward ->
float64 preservation against the masked original -> counts -> save, then load in a new process.

The whole matrix is marked slow (``make test-fast`` skips it; ``make test`` runs it); the
largest models share one xdist group, so two workers never hold two of them at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import load_module

pytestmark = pytest.mark.slow  # a reload subprocess and large models: make test, not test-fast
COVERAGE = load_module(Path(__file__).parents[1] / "bench" / "coverage.py", "chip_bench_coverage")
CASES = COVERAGE.all_cases()
GIANT = {
    "torchvision:regnet_y_128gf",
    "torchvision:vit_h_14",
    "torchvision:vit_l_16",
    "torchvision:vit_l_32",
    "torchvision:regnet_y_32gf",
    "torchvision:convnext_large",
}


def _param(case_id: str):
    marks = []
    if case_id in GIANT:
        marks.append(pytest.mark.xdist_group("giant"))
    return pytest.param(case_id, marks=marks)


@pytest.fixture(scope="module")
def reloader():
    """One fresh interpreter per test worker that reloads the artifacts the cases save."""
    process = COVERAGE.Reloader()
    yield process
    process.close()


def test_every_torchvision_builder_is_a_case():
    import torchvision

    ids = {c for c in CASES if c.startswith("torchvision:")}
    names = torchvision.models.list_models(module=torchvision.models)
    names += torchvision.models.list_models(module=torchvision.models.segmentation)
    assert ids == {f"torchvision:{n}" for n in names}
    assert sum(c.startswith("timm:") for c in CASES) >= 10


@pytest.mark.parametrize("case_id", [_param(c) for c in CASES])
def test_case_prunes_correctly(case_id, tmp_path, reloader):
    case = CASES[case_id]
    row = COVERAGE.run_case(case, tmp_path)
    if case.expect is not None:  # a clear, one-line refusal
        assert re.search(case.expect, row["outcome"]) and "\n" not in row["outcome"], row["outcome"]
        return
    assert row["outcome"] == "pruned", row["outcome"]
    assert row["error"] <= 1e-9
    assert row["mask_effect"] > 1e-6  # pruning changed the output: the comparison can fail
    assert row["counts_match"]
    assert 0.48 <= row["macs_kept"] <= 0.5
    assert row["pruned_groups"] > 0
    artifact = tmp_path / f"{COVERAGE.slug(case_id)}.chip"
    reloaded = reloader(artifact)
    assert reloaded["error"] <= 1e-12
    assert "trust_code=True" in reloaded["untrusted"]  # code named in a file runs only if trusted
    for path in tmp_path.iterdir():  # float64 artifacts of large models: do not keep them around
        path.unlink()
