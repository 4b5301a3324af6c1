"""Budget allocation (chip.allocation) and BatchNorm re-estimation (chip.recalibration).

Oracles: models built so the right answer is known (a layer of duplicated channels, a branch
multiplied by zero), exact counts of the pruned model (chip.apply verifies them), and BatchNorm
statistics computed directly from the layers' definitions.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import chip
import chip.allocation as A
from chip import cli
from chip.errors import ChipError
from chip.models import create
from chip.planning import plan
from chip.recalibration import recalibrate_bn

pytestmark = pytest.mark.filterwarnings("ignore::chip.errors.ChipWarning")


class Dup(nn.Module):
    """conv1 -> relu -> conv2 (channels 4-7 copy 0-3) -> relu -> conv3 = 10 logit maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 10, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight[4:] = self.conv2.weight[:4]
            self.conv2.bias[4:] = self.conv2.bias[:4]

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.conv3(x).mean((2, 3))


@pytest.mark.parametrize("budget", [0.8, 0.6])
def test_global_takes_most_from_the_duplicated_layer(budget):
    model = Dup().eval()
    x = torch.randn(64, 3, 12, 12)
    scores = chip.calibrate(model, [x[:32], x[32:]], num_batches=2, progress=False)
    ratio = A.normalised_scores(scores, "conv2")
    assert float(ratio.max()) < 0.6 < float(A.normalised_scores(scores, "conv1").min())
    p = plan(model, scores, f"flops={budget}", allocation="global", input_size=(1, 3, 12, 12))
    w = p.widths()
    assert w["conv2"] < 8 and w["conv1"] == 8  # every channel taken comes from conv2
    assert p.stats["macs_kept"] <= budget
    uniform = plan(model, scores, f"flops={budget}", input_size=(1, 3, 12, 12)).widths()
    assert w["conv2"] <= uniform["conv2"]
    assert p.allocation["name"] == "global" and p.allocation["normalisation"] == "ci/norm"


def test_normalised_ci_is_shape_corrected_and_falls_back_to_group_mean():
    model = create("resnet20")
    x = torch.randn(16, 3, 16, 16)
    scores = chip.calibrate(model, [x[:8], x[8:]], num_batches=2, progress=False)
    positions = scores.meta["positions"]
    for g in scores.groups:
        r = A.normalised_scores(scores, g)
        assert r.shape == scores.groups[g].shape and bool(torch.isfinite(r).all())
        assert float(r.min()) >= 0
    for label, norms in scores.point_norms.items():  # CI_i <= ||a_i|| for every sample
        ratio = scores.points[label][norms > 0] / norms[norms > 0]  # dead channels: 0 / 0
        assert float(ratio.min()) >= 0 and float(ratio.max()) <= 1 + 1e-9
    assert set(positions) == set(scores.point_norms)
    assert set(positions.values()) == {256, 64, 16}  # 16x16, 8x8, 4x4 maps of the three stages
    # by chance: ~1 with many positions per channel, ~L/C with fewer positions than channels
    assert A.chance_ratio(16, 784) > 0.95 and 0.3 < A.chance_ratio(64, 49) < 0.7
    assert A.chance_ratio(512, 49) < 0.2
    l1 = chip.score(model, None, "l1", example_inputs=torch.zeros(1, 3, 16, 16))
    r = A.normalised_scores(l1, "conv1")
    torch.testing.assert_close(r, l1.groups["conv1"].double() / l1.groups["conv1"].abs().mean())


def test_scores_norms_are_the_mean_feature_map_norms_and_survive_a_save(tmp_path):
    model = Dup().eval()
    x = torch.randn(16, 3, 12, 12)
    scores = chip.calibrate(model, [x[:8], x[8:]], num_batches=2, progress=False)
    with torch.no_grad():  # conv3 reads relu(conv2(relu(conv1(x)))): its input maps' norms
        maps = torch.relu(model.conv2(torch.relu(model.conv1(x))))
    expected = maps.double().flatten(2).norm(dim=2).mean(0)
    torch.testing.assert_close(scores.norms["conv2"], expected, rtol=1e-5, atol=0)
    scores.save(tmp_path / "s.safetensors")
    loaded = chip.ChannelScores.load(tmp_path / "s.safetensors")
    assert set(loaded.point_norms) == set(scores.point_norms)
    for g in scores.groups:
        torch.testing.assert_close(A.normalised_scores(loaded, g), A.normalised_scores(scores, g))
    hrank = chip.calibrate(model, [x[:8], x[8:]], num_batches=2, criterion="hrank", progress=False)
    assert hrank.norms == {} and hrank.point_norms == {}


class Branches(nn.Module):
    """stem -> three branches summed: a x 0, b x 1, c x 0.05; then a 4-class linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a, self.b, self.c = (
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1))
            for _ in range(3)
        )  # fmt: skip
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = 0.0 * self.a(x) + self.b(x) + 0.05 * self.c(x)
        return self.head(y.mean((2, 3)))


def _labelled(model, n=64, size=12, seed=0):
    """Images and the labels ``model`` itself gives them, its BatchNorm statistics first
    estimated on them (as a trained model's: the base loss is low)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    recalibrate_bn(model, [x], 1)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_sensitivity_prunes_the_dead_branch_hardest_and_the_live_one_least(loss):
    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # confident logits: the loss reacts to what b computes
    data = _labelled(model)
    p = plan(
        model, None, "flops=0.6", allocation={"name": "sensitivity", "loss": loss}, data=data,
        input_size=(1, 3, 12, 12), progress=False,
    )  # fmt: skip
    widths = p.widths()
    inner = {k: widths[f"{k}.0"] for k in "abc"}  # each branch's first conv
    if loss == "ce":  # (with "kl" the budget's slack may give the free branch a channel back)
        assert inner["a"] == 2  # the ladder's smallest width: removing it costs nothing
    assert inner["b"] == max(inner.values()) > inner["a"]
    loss = {g: dict((w, d) for w, d in pts) for g, pts in p.allocation["loss"].items()}
    assert all(abs(d) < 1e-9 for d in loss["a.0"].values())  # exactly: a x 0 is never seen
    assert max(loss["b.0"].values()) > 10 * max(loss["c.0"].values())
    assert p.stats["macs_kept"] <= 0.6


def test_sensitivity_measurements_are_those_of_the_pruned_model():
    """A trial's loss (masked model + re-estimated BN) equals the physically pruned model's
    loss after recalibrate_bn on the same batches."""
    torch.manual_seed(1)
    model = Branches().eval()
    data = _labelled(model)
    scores = {g: torch.rand(8, dtype=torch.float64) for g in ("stem.0", "a.0", "b.0", "c.0")}
    scores.update({g: torch.rand(8, dtype=torch.float64) for g in ("a.3",)})
    p = plan(
        model, scores, "flops=0.7", allocation={"name": "sensitivity", "loss": "ce"}, data=data,
        input_size=(1, 3, 12, 12), progress=False,
    )  # fmt: skip
    base = p.allocation["base_loss"]
    group, (width, increase) = "b.0", p.allocation["loss"]["b.0"][0]
    single = {n: g.channels for n, g in p.groups.items()}
    single[group] = width
    graph = chip.find_groups(model, torch.zeros(1, 3, 12, 12))
    keep = {n: graph[n].choose(scores.get(n), w) for n, w in single.items()}
    one = chip.PruningPlan(
        groups={n: chip.planning.GroupPlan(graph[n].channels, k) for n, k in keep.items()},
        input_size=(1, 3, 12, 12),
    )
    pruned = recalibrate_bn(chip.apply(model, one), data[:2], 2)
    assert A._loss(pruned, data[2:]) - base == pytest.approx(increase, rel=1e-9, abs=1e-12)


def _pruned_to(model, graph, scores, widths, bn_batches):
    """``model`` physically pruned to ``widths`` (best channels by ``scores``), its BatchNorm
    statistics re-estimated on ``bn_batches``."""
    keep = {n: graph[n].choose(scores.get(n), w) for n, w in widths.items()}
    one = chip.PruningPlan(
        groups={n: chip.planning.GroupPlan(graph[n].channels, k) for n, k in keep.items()},
        input_size=(1, 3, 12, 12),
    )
    return recalibrate_bn(chip.apply(model, one), bn_batches, len(bn_batches))


def test_sensitivity_second_round_is_measured_around_the_first_rounds_widths():
    """rounds=2: a group's increase is the loss with it cut and the others at the first round's
    widths, minus the loss with it whole and the others there (both on the pruned model)."""
    torch.manual_seed(3)
    model = Branches().eval()
    data = _labelled(model)
    names = ("stem.0", "a.0", "b.0", "c.0", "a.3")
    scores = {g: torch.rand(8, dtype=torch.float64) for g in names}
    p = plan(
        model, scores, "flops=0.5", allocation={"name": "sensitivity", "rounds": 2, "loss": "ce"},
        data=data, input_size=(1, 3, 12, 12), progress=False,
    )  # fmt: skip
    assert p.stats["macs_kept"] <= 0.5
    first = plan(
        model, scores, "flops=0.5", allocation={"name": "sensitivity", "loss": "ce"}, data=data,
        input_size=(1, 3, 12, 12), progress=False,
    )  # fmt: skip
    (second,) = p.allocation["rounds"]
    assert second["context"] == first.widths()
    graph = chip.find_groups(model, torch.zeros(1, 3, 12, 12))

    def loss_of(widths):
        return A._loss(_pruned_to(model, graph, scores, widths, data[:2]), data[2:])

    context = second["context"]
    # the measurement that moved the loss most, away from the operating point
    _, group, width = max(
        (abs(d), n, w) for n, pts in second["loss"].items() for w, d in pts if w != context[n]
    )
    increase = dict(second["loss"][group])[width]
    assert abs(increase) > 1e-3
    whole = loss_of({**context, group: graph[group].channels})
    assert loss_of({**context, group: width}) - whole == pytest.approx(increase, abs=1e-9)
    cut, at_context = context[group], dict(second["loss"][group]).get(context[group])
    assert at_context is not None or cut == graph[group].channels
    if at_context is not None:  # the operating point itself
        assert loss_of(context) - whole == pytest.approx(at_context, abs=1e-9)


def test_sensitivity_kl_is_the_divergence_from_the_unpruned_predictions():
    """loss="kl": a trial's measurement is sum_c p_c (log p_c - log q_c) averaged over images,
    p the given model's softmax, q the pruned model's (after recalibrate_bn), computed plainly."""
    torch.manual_seed(2)
    model = Branches().eval()
    data = _labelled(model)
    with torch.no_grad():
        p_ref = [model(x).double().softmax(1) for x, _ in data[2:]]
    scores = {g: torch.rand(8, dtype=torch.float64) for g in ("stem.0", "a.0", "b.0", "c.0", "a.3")}
    p = plan(
        model, scores, "flops=0.7", allocation={"name": "sensitivity", "loss": "kl"}, data=data,
        input_size=(1, 3, 12, 12), progress=False,
    )  # fmt: skip
    assert p.allocation["loss_kind"] == "kl"
    graph = chip.find_groups(model, torch.zeros(1, 3, 12, 12))

    def kl_of(widths):
        pruned = _pruned_to(model, graph, scores, widths, data[:2])
        total, n = 0.0, 0
        with torch.no_grad():
            for (x, _), ref in zip(data[2:], p_ref):
                q = pruned(x).double().softmax(1)
                total += float((ref * (ref.log() - q.log())).sum())
                n += len(x)
        return total / n

    whole = {n: g.channels for n, g in p.groups.items()}
    assert p.allocation["base_loss"] == pytest.approx(kl_of(whole), rel=1e-6, abs=1e-12)
    width, increase = p.allocation["loss"]["b.0"][0]
    direct = kl_of({**whole, "b.0": width}) - p.allocation["base_loss"]
    assert increase > 0 and direct == pytest.approx(increase, rel=1e-6, abs=1e-12)


def test_budgets_met_for_every_allocation_and_applied_counts_agree():
    model = create("resnet20", num_classes=4)
    data = _labelled(model, n=64, size=16)
    scores = chip.calibrate(model, data, num_batches=2, progress=False)
    for target in ("flops=0.5", "params=0.4"):
        for allocation in A.ALLOCATIONS:
            p = plan(
                model, scores, target, allocation=allocation, data=data,
                input_size=(1, 3, 16, 16), progress=False,
            )  # fmt: skip
            kind, fraction = target.split("=")
            kept = p.stats["params_kept" if kind == "params" else "macs_kept"]
            assert float(fraction) - 0.01 <= kept <= float(fraction), (target, allocation)
            assert p.allocation["name"] == allocation
            pruned = chip.apply(model, p)  # verifies outputs and counts against the plan
            assert chip.count(pruned, (1, 3, 16, 16)).macs == p.stats["macs"]
    assert json.loads(json.dumps(p.to_dict()))["allocation"]["name"] == "sensitivity"


def test_sensitivity_is_cached_per_weights_data_and_ladder(monkeypatch):
    model = create("resnet20", num_classes=4)
    data = _labelled(model, n=64, size=16)
    calls = []
    real = A._loss
    monkeypatch.setattr(A, "_loss", lambda *args: calls.append(1) or real(*args))

    def sens(target, m=model, d=data, allocation="sensitivity"):
        calls.clear()
        return plan(m, None, target, allocation=allocation, data=d, input_size=(1, 3, 16, 16),
                    progress=False)  # fmt: skip

    first = sens("flops=0.6")
    assert calls and not first.allocation["cached"]
    again = sens("flops=0.4")  # another budget: no evaluation at all
    assert calls == [] and again.allocation["cached"]
    assert again.allocation["loss"] == first.allocation["loss"]
    assert again.widths() != first.widths()
    ladder = A.Allocation("sensitivity", ladder=(0.5,))
    assert not sens("flops=0.6", allocation=ladder).allocation["cached"]
    other = create("resnet20", num_classes=4)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.conv1.weight[0, 0, 0, 0] += 1e-3
    assert not sens("flops=0.6", m=other).allocation["cached"]
    assert not sens("flops=0.6", d=list(reversed(data))).allocation["cached"]
    ce = A.Allocation("sensitivity", loss="ce")
    assert not sens("flops=0.6", allocation=ce).allocation["cached"]


class _Net(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(c, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _direct_stats(net: _Net, batches):
    """Each BatchNorm's input over all batches, from the layers' definitions (batch statistics
    normalise each batch, dropout off): (mean, unbiased var) per BatchNorm."""
    first, second = [], []
    for x in batches:
        h = net.conv1(x)
        first.append(h)
        m, v = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        w, b = net.bn1.weight.view(1, -1, 1, 1), net.bn1.bias.view(1, -1, 1, 1)
        second.append(net.conv2(torch.relu((h - m) / torch.sqrt(v + net.bn1.eps) * w + b)))
    out = []
    for hs in (first, second):
        flat = torch.cat([h.transpose(0, 1).reshape(h.shape[1], -1) for h in hs], 1)
        out.append((flat.mean(1), flat.var(1, unbiased=True)))
    return out


def test_recalibrate_bn_gives_exact_statistics_of_the_pruned_model():
    torch.manual_seed(0)
    net = _Net().double().train()
    graph = chip.find_groups(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    p = plan(net, None, {"conv1": 0.5}, input_size=(1, 3, 8, 8), graph=graph)
    pruned = chip.apply(net, p)
    assert pruned.conv1.out_channels == 3
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) for n in (5, 7, 4)]
    momentum = pruned.bn1.momentum
    with torch.no_grad():
        expected = _direct_stats(pruned, batches)
    assert recalibrate_bn(pruned, [(x, None) for x in batches], 3) is pruned
    for bn, (mean, var) in zip((pruned.bn1, pruned.bn2), expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 3
    assert pruned.training and pruned.drop.training and pruned.bn1.momentum == momentum
    two = _direct_stats(pruned, batches[:2])  # num_batches stops early
    recalibrate_bn(pruned, batches, 2)
    torch.testing.assert_close(pruned.bn2.running_var, two[1][1], rtol=1e-12, atol=1e-12)


def test_recalibrate_bn_refuses_short_loaders_and_leaves_the_model_as_it_was():
    net = _Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(4, 3, 8, 8)]
    with pytest.raises(ChipError, match="needs 3 batches but the loader gave 1"):
        recalibrate_bn(net, batches, 3)
    with pytest.raises(ChipError, match="at least 2 images"):
        recalibrate_bn(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)),
                       [torch.randn(1, 4)], 1)  # fmt: skip
    with pytest.raises(ChipError, match="positive integer"):
        recalibrate_bn(net, batches, 0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"allocation": "best"}, "unknown allocation 'best'; expected one of uniform, global"),
        ({"allocation": "sensitivity"}, "measures each group's loss on data; pass data="),
        ({"allocation": "sensitivity", "data": []}, "needs 4 batches .* the data gave 0"),
        ({"allocation": "sensitivity", "data": [torch.zeros(2, 3, 8, 8)] * 4}, "targets"),
        ({"allocation": "global"}, "'global' ranks channel scores across groups; pass scores"),
        ({"allocation": "global", "target": 0.3}, "spreads a budget"),
        ({"allocation": {"name": "sensitivity", "ladder": (0.5, 1.0)}}, "kept fractions in"),
        ({"allocation": {"name": "global", "width": 3}}, "unknown allocation settings"),
        ({"allocation": {"name": "sensitivity", "loss": "mse"}}, "loss 'mse': expected one of ce"),
    ],
)
def test_bad_allocation_input_is_one_line(kwargs, message):
    model = create("resnet20", num_classes=4)
    kwargs = {"target": "flops=0.5", **kwargs}
    with pytest.raises(ChipError, match=message) as info:
        plan(model, None, input_size=(1, 3, 8, 8), progress=False, **kwargs)
    assert "\n" not in str(info.value)


# -- command line --------------------------------------------------------------------------------

SYNTH = ["--data", "synthetic", "--data-opt", "train_size=64", "--data-opt", "num_classes=4",
         "--data-opt", "image_size=8", "--batch-size", "16"]  # fmt: skip


def test_cli_plan_with_sensitivity_and_prune_with_recalibrated_bn(capsys, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(create("resnet20", num_classes=4).state_dict(), ckpt)
    model_args = ["--arch", "resnet20", "--checkpoint", ckpt, "--quiet"]
    code = cli.main(
        [str(a) for a in ["plan", *model_args, "--flops", "0.5", "--allocation", "sensitivity",
                          *SYNTH, "--json", "--out", tmp_path / "plan.json"]]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["allocation"]["name"] == "sensitivity"
    assert out["macs_kept"] <= 0.5 and out["allocation"]["loss"]
    assert out["input_size"] == [1, 3, 8, 8]  # the data's size, not resnet20's declared 32x32
    code = cli.main(
        [str(a) for a in ["prune", *model_args, "--plan", tmp_path / "plan.json",
                          "--recalibrate-bn", "2", *SYNTH, "--out", tmp_path / "p.chip"]]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "re-estimated on 2 batches" in text
    pruned = chip.load(tmp_path / "p.chip")
    unrecal = chip.apply(
        create("resnet20", num_classes=4, checkpoint=ckpt),
        chip.PruningPlan.load(tmp_path / "plan.json"),
    )
    assert not torch.equal(pruned.bn1.running_var, unrecal.bn1.running_var)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--flops", "0.5", "--allocation", "best"], "invalid choice: 'best'"),
        (["plan", "--flops", "0.5", "--allocation", "sensitivity"], "needs --data"),
        (["plan", "--rate", "0.3", "--allocation", "global"], "spreads a budget"),
        (["prune", "--flops", "0.5", "--scores", "s", "--recalibrate-bn", "2", "--checkpoint", "c"],
         "--recalibrate-bn needs --data"),
        (["prune", "--plan", "p.json", "--allocation", "global", "--checkpoint", "c"],
         "--plan already fixes the widths"),
        (["prune", "--flops", "0.5", "--scores", "s", "--recalibrate-bn", "-1", "--checkpoint", "c"],
         "expected an integer >= 0"),
    ],
)  # fmt: skip
def test_cli_bad_allocation_flags_exit_2_before_any_work(capsys, tmp_path, argv, message):
    out = tmp_path / "out.json"
    code = cli.main([*argv, "--arch", "resnet20", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# -- chip run ------------------------------------------------------------------------------------


def _run_config(out, **changes):
    from helpers import TINY_RUN

    cfg = json.loads(json.dumps(TINY_RUN))
    cfg["out_dir"] = str(out)
    cfg["data"]["options"]["train_size"] = 64
    cfg["finetune"]["epochs"] = 1
    for section, values in changes.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_run_with_sensitivity_allocation_and_recalibrated_bn(tmp_path):
    from chip import pipeline

    out = tmp_path / "run"
    cfg = _run_config(out, plan={"allocation": "sensitivity"}, prune={"recalibrate_bn": 2})
    summary = pipeline.run(cfg, progress=False)
    p = chip.PruningPlan.load(out / "plan.json")
    assert p.allocation["name"] == "sensitivity" and p.stats["macs_kept"] <= 0.5
    assert summary["stages"]["plan"]["allocation"] == "sensitivity"
    assert summary["stages"]["prune"]["recalibrate_bn"] == 2
    plain = chip.apply(chip.models.create("resnet20", num_classes=4,
                                          checkpoint=out / "baseline" / "best.pt"), p)  # fmt: skip
    pruned = chip.load(out / "pruned.chip")
    assert not torch.equal(pruned.bn1.running_mean, plain.bn1.running_mean)
    # another allocation redoes the plan (and what follows), not the baseline or the scores
    before = {f.stem: f.stat().st_mtime_ns for f in (out / "stages").glob("*.json")}
    pipeline.run(_run_config(out, plan={"allocation": "global"}), progress=False)
    after = {f.stem: f.stat().st_mtime_ns for f in (out / "stages").glob("*.json")}
    assert after["score"] == before["score"] and after["plan"] != before["plan"]
    assert chip.PruningPlan.load(out / "plan.json").allocation["name"] == "global"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"plan": {"allocation": "best"}}, "'plan.allocation' must be one of uniform, global"),
        ({"plan": {"allocation": "global"}, "target": {"flops": None, "rate": 0.3}},
         "spreads a budget"),
        ({"plan": {"allocation": "sensitivity"}, "calibration": {"batch_size": 32}},
         "plan.allocation sensitivity reads 4 calibration batches of 32 images"),
        ({"prune": {"recalibrate_bn": -1}}, "'prune.recalibrate_bn' must be >= 0"),
    ],
)  # fmt: skip
def test_run_bad_allocation_settings_fail_before_any_work(tmp_path, changes, message):
    from chip import pipeline

    out = tmp_path / "run"
    cfg = _run_config(out, **changes)
    cfg["target"] = {k: v for k, v in cfg["target"].items() if v is not None}
    with pytest.raises(ChipError, match=message):
        pipeline.run(cfg, progress=False)
    assert not out.exists()
