"""chip.score: hrank against its definition, l1 against hand-computed weight norms, random seeds,
identical widths across criteria, and `chip score --criterion`."""

import pytest
import torch
import torch.nn as nn

import chip
from chip import cli
from chip.calibration import ChannelScores
from chip.criteria import CRITERIA, score
from chip.errors import ChipError
from chip.groups import find_groups
from chip.models import create


class LowRankNet(nn.Module):
    """1x1 conv straight into a 3x3 conv: on rank-1 input planes channel c has rank <= c."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3, 4, 1, bias=False)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)
        with torch.no_grad():
            w = torch.randn(4, 3)
            w[0] = 0  # rank 0
            w[1, 1:] = 0  # rank 1
            w[2, 2] = 0  # rank 2
            self.mix.weight.copy_(w[:, :, None, None])

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(self.mix(x)))).flatten(1))


class TinyResidual(nn.Module):
    """Stem + one residual block + a depthwise conv on the stream: a 3-producer coupled group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        s = torch.relu(s + self.conv_b(torch.relu(self.conv_a(s))))
        s = torch.relu(self.dw(s))
        return self.fc(s.mean((2, 3)))


def _rank1_images(n, size=8):
    u, v = torch.randn(n, 3, size, 1), torch.randn(n, 3, 1, size)
    return u * v


def _hrank_oracle(model, images, consumer):
    """Per-sample matrix_rank of every channel of the consumer's input, averaged (the definition)."""
    seen = []
    handle = dict(model.named_modules())[consumer].register_forward_pre_hook(
        lambda _m, inp: seen.append(inp[0].detach().clone())
    )
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    fmaps = seen[0]
    ranks = torch.tensor(
        [
            [float(torch.linalg.matrix_rank(fmaps[n, c])) for c in range(fmaps.shape[1])]
            for n in range(fmaps.shape[0])
        ],
        dtype=torch.float64,
    )
    return ranks.mean(0)


def test_hrank_matches_definition():
    model = LowRankNet()
    images = _rank1_images(6)
    scores = score(model, [images[:3], images[3:]], "hrank", num_batches=2)
    torch.testing.assert_close(
        scores["mix"], _hrank_oracle(model, images, "conv"), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        scores["mix"], torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    )
    assert scores.meta["criterion"] == "hrank" and scores.num_samples == 6


def _l1(module):
    return module.weight.detach().double().abs().flatten(1).sum(1)


def test_l1_residual_group_is_mean_over_producers_including_depthwise():
    model = TinyResidual()
    scores = score(model, criterion="l1", example_inputs=torch.randn(1, 3, 8, 8))
    graph = find_groups(model, torch.randn(1, 3, 8, 8))
    assert set(graph["stem"].producers) == {"stem", "conv_b", "dw"}
    expected = (_l1(model.stem) + _l1(model.conv_b) + _l1(model.dw)) / 3
    torch.testing.assert_close(scores["stem"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["conv_a"], _l1(model.conv_a), rtol=1e-12, atol=0)
    assert scores.meta["criterion"] == "l1" and scores.points == {}


def test_l1_resnet20_streams_skip_the_pad_shortcut():
    model = create("resnet20")
    scores = score(model, criterion="l1")  # zoo model: traced at its own input size
    stage1 = [model.conv1] + [model.layer1[b].conv2 for b in range(3)]
    torch.testing.assert_close(scores["conv1"], sum(_l1(m) for m in stage1) / 4, rtol=1e-12, atol=0)
    stage2 = [model.layer2[b].conv2 for b in range(3)]  # layer2.0.shortcut has no weights
    torch.testing.assert_close(
        scores["layer2.0.conv2"], sum(_l1(m) for m in stage2) / 3, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        scores["layer3.1.conv1"], _l1(model.layer3[1].conv1), rtol=1e-12, atol=0
    )


def test_random_is_seeded():
    model = create("resnet20")
    a, b, c = (score(model, criterion="random", seed=s) for s in (0, 0, 1))
    assert a.meta["criterion"] == "random"
    for name in a.groups:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
        assert a[name].dtype == torch.float64 and 0 <= a[name].min() and a[name].max() < 1


@pytest.mark.parametrize("target", [0.3, "flops=0.5"])
def test_all_criteria_prune_to_identical_widths(target):
    model = create("resnet20")
    images = torch.randn(4, 3, 16, 16)
    loader = [images[:2], images[2:]]
    graph = find_groups(model, images[:1])
    plans = {
        c: chip.plan(
            model, score(model, loader, c, num_batches=2, graph=graph), target, graph=graph
        )
        for c in CRITERIA
    }
    widths = {c: p.widths() for c, p in plans.items()}
    assert all(w == widths["chip"] for w in widths.values())
    assert any(w < graph[g].channels for g, w in widths["chip"].items())
    kept = {c: {g: tuple(p.groups[g].keep) for g in p.groups} for c, p in plans.items()}
    assert kept["chip"] != kept["random"] and kept["l1"] != kept["random"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(criterion="chip"), "needs calibration data"),
        (dict(criterion="nope", loader=[torch.zeros(1, 3, 8, 8)]), "unknown criterion"),
    ],
)
def test_score_errors(kwargs, match):
    with pytest.raises(ChipError, match=match):
        score(TinyResidual(), **kwargs)


def test_weight_criterion_needs_something_to_trace():
    with pytest.raises(ChipError, match="example_inputs"):
        score(TinyResidual(), criterion="l1")


def test_top_level_export():
    assert chip.score is score


# --------------------------------------------------------------------------------- CLI


def test_cli_choices_are_the_library_criteria():
    parser = cli.get_args_parser()
    for name in CRITERIA:
        args = parser.parse_args(["score", "--arch", "resnet20", "--criterion", name, "--out", "s"])
        assert args.criterion == name
    with pytest.raises(ChipError, match="invalid choice: 'nope'.*" + ".*".join(CRITERIA)):
        parser.parse_args(["score", "--arch", "resnet20", "--criterion", "nope", "--out", "s"])


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_cli_weight_criteria_need_no_data(capsys, tmp_path, criterion):
    model = create("resnet20")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "s.safetensors"
    code = cli.main(
        [
            "score",
            "--arch",
            "resnet20",
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            "--criterion",
            criterion,
            "--seed",
            "4",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    got = ChannelScores.load(out)
    ref = score(model, criterion=criterion, seed=4)
    assert got.meta["criterion"] == criterion and set(got.groups) == set(ref.groups)
    for name, vec in ref.groups.items():
        torch.testing.assert_close(got[name], vec, rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--criterion", "chip"],
        ["--criterion", "hrank"],
        ["--criterion", "l1", "--stability", "2"],
        ["--criterion", "bogus"],
    ],
)
def test_cli_score_errors_are_one_line(capsys, tmp_path, argv):
    code = cli.main(["score", "--arch", "resnet20", *argv, "--out", str(tmp_path / "s.st")])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("chip: error: "), err
    assert list(tmp_path.iterdir()) == []
