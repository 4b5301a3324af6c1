"""chip.stability: Spearman with ties vs scipy, identical subsets agree, random ones do not,
the report against per-subset calibrate calls, K checks, and `chip score --stability K`."""

import json

import pytest
import scipy.stats
import torch
import torch.nn as nn

import chip
from chip import cli
from chip.calibration import calibrate
from chip.errors import ChipError
from chip.planning import _choose
from chip.stability import average_ranks, spearman, stability


class Wide(nn.Module):
    """One wide group (``conv``, 96 channels) and one narrow one (``head``, 6)."""

    def __init__(self, width=96):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Conv2d(width, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.head(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _vectors(kind, n=40):
    g = torch.Generator().manual_seed(n)
    table = {
        "continuous": lambda: (torch.randn(n, generator=g), torch.randn(n, generator=g)),
        "ties": lambda: (
            torch.randint(0, 5, (n,), generator=g).double(),
            torch.randint(0, 3, (n,), generator=g).double(),
        ),
        "monotone": lambda: ((a := torch.randn(n, generator=g)), a.exp()),
        "reversed": lambda: ((a := torch.randn(n, generator=g)), -a),
    }
    return table[kind]()


@pytest.mark.parametrize("kind", ["continuous", "ties", "monotone", "reversed"])
def test_spearman_matches_scipy(kind):
    a, b = _vectors(kind)
    assert spearman(a, b) == pytest.approx(
        scipy.stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-12
    )
    torch.testing.assert_close(average_ranks(a), torch.from_numpy(scipy.stats.rankdata(a.numpy())))


def test_spearman_of_a_constant_is_nan():
    assert spearman(torch.ones(5), torch.arange(5.0)) != spearman(torch.ones(5), torch.arange(5.0))


def test_identical_subsets_agree_perfectly():
    batch = torch.randn(3, 3, 8, 8)
    report = stability(Wide(), [batch] * 4, 2, num_batches=4)
    assert [g.name for g in report.groups] == ["conv", "head"]
    for g in report.groups:
        assert g.spearman_mean == pytest.approx(1.0) and g.spearman_min == pytest.approx(1.0)
        assert g.overlap_mean == 1.0 and g.overlap_min == 1.0
    assert report.batches_per_subset == [2, 2] and report.samples_per_subset == [6, 6]


def test_random_criterion_is_uncorrelated():
    report = stability(
        Wide(200), [torch.randn(1, 3, 4, 4)] * 4, 4, num_batches=4, criterion="random"
    )
    wide = report.groups[0]
    assert wide.channels == 200 and wide.kept == 100
    # 6 pairs of independent uniform vectors of 200: each rho has sd ~ 0.07
    assert abs(wide.spearman_mean) < 0.2
    assert 0.3 < wide.overlap_mean < 0.7  # expected kept/channels = 0.5


def test_report_matches_per_subset_calibration():
    model = Wide(12)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(5)]
    report = stability(model, batches, 2, num_batches=5, rate=0.25)
    a = calibrate(model, batches[0::2], 3, progress=False)
    b = calibrate(model, batches[1::2], 3, progress=False)
    for g in report.groups:
        rho = scipy.stats.spearmanr(a[g.name].numpy(), b[g.name].numpy())[0]
        kept = int(g.channels * 0.75)
        both = set(_choose(a[g.name], kept, g.channels)) & set(_choose(b[g.name], kept, g.channels))
        assert g.kept == kept
        assert g.spearman_mean == pytest.approx(rho, abs=1e-12) == g.spearman_min
        assert g.overlap_mean == pytest.approx(len(both) / kept)
    assert report.samples_per_subset == [6, 4]
    d = json.loads(json.dumps(report.to_dict()))
    assert d["k"] == 2 and [g["name"] for g in d["groups"]] == ["conv", "head"]
    assert all(g.name in report.table() for g in report.groups)


@pytest.mark.parametrize("k,num_batches,available", [(1, 4, 4), (0, 4, 4), (5, 4, 4), (3, 3, 2)])
def test_k_must_fit_the_batches(k, num_batches, available):
    with pytest.raises(ChipError, match="k"):
        stability(Wide(8), [torch.randn(1, 3, 4, 4)] * available, k, num_batches=num_batches)


def test_module_path():
    assert chip.stability.stability is stability  # the submodule (a top-level name would clash)


def test_cli_score_stability(capsys, tmp_path):
    synth = [
        "--data",
        "synthetic",
        "--data-opt",
        "train_size=24",
        "--data-opt",
        "val_size=4",
        "--data-opt",
        "num_classes=4",
        "--data-opt",
        "image_size=8",
    ]
    out = tmp_path / "s.safetensors"
    code = cli.main(
        [
            "score",
            "--arch",
            "resnet20",
            *synth,
            "--batches",
            "3",
            "--batch-size",
            "4",
            "--stability",
            "3",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = json.loads(out.with_suffix(".stability.json").read_text())
    assert written["k"] == 3 and written["batches_per_subset"] == [1, 1, 1]
    groups = chip.ChannelScores.load(out).groups
    assert "spearman" in captured.out and [g["name"] for g in written["groups"]] == list(groups)
    for g in written["groups"]:
        assert -1 <= g["spearman_mean"] <= 1 and 0 <= g["overlap_min"] <= g["overlap_mean"] <= 1
