"""Structures beyond the paper's zoo, one small module per kind, each against the plain definition.

Every model is float64 with random weights. "Masked original" is the definition of pruning
(``chip.prune.masked_forward_hooks``): the original whose consumers do not see the removed
channels, with cross-channel norms taken over the kept channels; the hooks themselves are checked
against hand computations of that definition here.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import chip
from chip.ci import channel_independence
from chip.counting import count
from chip.errors import ChipError, ChipWarning
from chip.groups import find_groups, register_pruner
from chip.planning import PruningPlan, plan
from chip.prune import apply, masked_forward_hooks

RTOL = 1e-9


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (p.dim() == 1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _scores(graph, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.channels, generator=gen, dtype=torch.float64) for g in graph}


def _masked(model, p, x):
    graph = find_groups(model, x[:1], check=False)
    with torch.no_grad():
        handles = masked_forward_hooks(model, p, graph)
        try:
            return model(x)
        finally:
            for h in handles:
                h.remove()


def _prune_and_compare(model, target, size, seed=1):
    """Plan with random scores, apply, and return (plan, pruned, max relative error vs masked)."""
    input_size = (1, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChipWarning)
        graph = find_groups(model, torch.zeros(input_size, dtype=torch.float64))
        p = plan(model, _scores(graph, seed), target, input_size=input_size, graph=graph)
    pruned = apply(model, p)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        plain, masked, out = model(x), _masked(model, p, x), pruned(x)
    assert (plain - masked).abs().max() > 1e-6 * plain.abs().max()  # pruning changed something
    counts = count(pruned, input_size)
    assert (counts.params, counts.macs) == (p.stats["params"], p.stats["macs"])
    return p, pruned, float((out - masked).abs().max() / masked.abs().max())


# -- 1. grouped convolutions ----------------------------------------------------------------------


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.bn2(self.grouped(x)))
        return self.fc(self.head(x).mean((2, 3)))


def test_grouped_conv_keeps_equal_counts_and_same_input_positions():
    model = _random(Grouped())
    p, pruned, err = _prune_and_compare(model, 0.25, (3, 8, 8))
    assert err <= RTOL
    conv = pruned.grouped
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 12, 12)
    stem_keep, out_keep = p.groups["stem"].keep, p.groups["grouped"].keep
    # the grouped conv reads 4 blocks of 4 inputs: the same positions survive in every block
    assert [[k % 4 for k in stem_keep if k // 4 == b] for b in range(4)] == [
        sorted({k % 4 for k in stem_keep})
    ] * 4
    # its output keeps the same number of channels in every block
    assert [sum(k // 4 == b for k in out_keep) for b in range(4)] == [3, 3, 3, 3]


def test_grouped_conv_input_units_chosen_by_mean_score():
    """The definition: units are positions j (channels j, j+4, j+8, j+12); keep the units with
    the largest mean score."""
    model = _random(Grouped())
    graph = find_groups(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    scores = _scores(graph, 3)
    p = plan(model, scores, 0.5, input_size=(1, 3, 8, 8), graph=graph)
    unit_mean = [float(scores["stem"][[j, j + 4, j + 8, j + 12]].mean()) for j in range(4)]
    best = sorted(sorted(range(4), key=lambda j: -unit_mean[j])[:2])
    assert p.groups["stem"].keep == sorted(j + 4 * b for j in best for b in range(4))
    assert graph["stem"].step == 4 and graph["grouped"].step == 4


def test_torchvision_resnext_and_regnet_block_prune():
    for name in ("resnext50_32x4d", "regnet_x_400mf"):
        model = _random(torchvision.models.get_model(name, num_classes=5))
        p, pruned, err = _prune_and_compare(model, "flops=0.5", (3, 32, 32))
        assert err <= RTOL, name
        assert p.stats["macs_kept"] <= 0.5
        for m in pruned.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0


# -- 2. GroupNorm ---------------------------------------------------------------------------------


def test_group_norm_keeps_equal_counts_per_norm_group():
    model = _random(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 8, 1),
            nn.Flatten(),
            nn.Linear(8 * 36, 3),
        )
    )
    p, pruned, err = _prune_and_compare(model, 0.3, (3, 6, 6))
    assert err <= RTOL
    keep = p.groups["0"].keep
    assert len(keep) == 12 and [sum(k // 4 == b for k in keep) for b in range(4)] == [3] * 4
    assert (pruned[1].num_groups, pruned[1].num_channels) == (4, 12)


def test_masked_group_norm_is_the_norm_over_kept_channels():
    """The oracle hook against the slow definition: per sample and norm group, mean and biased
    variance over the kept channels and all positions."""
    gn = _random(nn.Sequential(nn.GroupNorm(2, 8)))
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    removed = [1, 6]
    kept = [c for c in range(8) if c not in removed]

    class FakeGraph:  # one group whose member is the norm itself
        def __getitem__(self, name):
            return chip.groups.ChannelGroup(
                "g", 8, (), (), (chip.groups.Member("0", torch.arange(8).view(-1, 1), "out", 1),)
            )

    handles = masked_forward_hooks(gn, {"g": removed}, FakeGraph())
    with torch.no_grad():
        out = gn(x)
    for h in handles:
        h.remove()
    norm = gn[0]
    for n in range(2):
        for block in (range(0, 4), range(4, 8)):
            chans = [c for c in block if c in kept]
            vals = x[n, chans]
            mean, var = vals.mean(), ((vals - vals.mean()) ** 2).mean()
            for c in chans:
                want = (x[n, c] - mean) / torch.sqrt(var + norm.eps) * norm.weight[c] + norm.bias[c]
                assert torch.allclose(out[n, c], want, atol=1e-12)


# -- 3. channel-reorganising ops, 4. split / chunk --------------------------------------------------


def test_pixel_shuffle_group_is_kept_whole_with_a_warning():
    model = _random(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
            nn.PixelShuffle(2),
            nn.Conv2d(4, 8, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
    )
    with pytest.warns(ChipWarning, match=r"2: its 16 channels do not fit the 4 channels of 4"):
        p = plan(model, None, 0.25, input_size=(1, 3, 8, 8))
    assert "2" in p.skipped and "2" not in p.groups
    assert p.groups["0"].kept == 12 and p.groups["4"].kept == 6  # the rest still prunes
    _, _, err = _prune_and_compare(model, 0.25, (3, 8, 8))
    assert err <= RTOL


class PartialConv(nn.Module):
    """A conv on the first 8 of 32 channels (torch.split), concatenated back."""

    def __init__(self):
        super().__init__()
        self.p = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        u, v = torch.split(F.relu(self.p(x)), [8, 24], 1)
        return self.fc(F.relu(self.c(torch.cat([self.a(u), v], 1))).mean((2, 3)))


def test_split_keeps_only_the_affected_group_whole():
    model = _random(PartialConv())
    graph = find_groups(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    assert "torch.split/chunk" in graph.skipped["p"]
    # Torch-Pruning cannot size the concatenation after the split, so it couples `a` with `p`:
    # both stay whole; the rest of the model still prunes
    assert set(graph.skipped) == {"p"} and [g.name for g in graph] == ["c"]
    p, _, err = _prune_and_compare(model, 0.5, (3, 8, 8))
    assert err <= RTOL and p.groups["c"].kept == 4


def test_shufflenet_prunes_around_its_channel_shuffles():
    model = _random(torchvision.models.shufflenet_v2_x0_5(num_classes=5))
    p, _, err = _prune_and_compare(model, "flops=0.5", (3, 32, 32))
    assert err <= RTOL and p.stats["macs_kept"] <= 0.5
    assert p.skipped and all("split/chunk" in r or "Torch-Pruning" in r for r in p.skipped.values())


# -- 5. transposed convolutions -------------------------------------------------------------------


class ShuffleBinarised(nn.Module):
    """A channel shuffle by view/transpose, then a binarised (straight-through sign) output:
    the output hides most of what happens inside."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.c1(F.relu(self.c0(x)))
        n, c, h, w = x.shape
        x = self.c2(x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w))
        x = x + (torch.sign(x) - x).detach()
        return self.fc(x.mean((2, 3))).sign()


def test_a_wrong_mapping_hidden_by_the_output_is_still_refused():
    model = _random(ShuffleBinarised())
    graph = find_groups(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    assert set(graph.skipped) == {"c1"} and {g.name for g in graph} == {"c0", "c2"}
    assert "changes what 'c2' computes" in graph.skipped["c1"]
    with pytest.warns(ChipWarning, match=r"c1: pruning it changes what 'c2' computes"):
        p = plan(model, _scores(graph), 0.5, input_size=(1, 3, 8, 8))
    assert p.groups["c0"].kept == 8 and "c1" in p.skipped
    assert apply(model, p).c2.in_channels == 16  # verified against the masked original inside
    # a plan that prunes it anyway (made on an unchecked graph) fails verification by name
    unchecked = find_groups(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64), check=False)
    bad = plan(model, _scores(unchecked), 0.5, input_size=(1, 3, 8, 8), graph=unchecked)
    assert bad.groups["c1"].kept == 8
    with pytest.raises(ChipError, match=r"verification failed for group 'c1'.*'c2' computes"):
        apply(model, bad)


def test_transposed_conv_groups_and_counts():
    model = _random(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 2, 1),
        )
    )
    graph = find_groups(model, torch.zeros(1, 3, 4, 4, dtype=torch.float64))
    assert [g.name for g in graph] == ["0", "2"]
    p, pruned, err = _prune_and_compare(model, 0.5, (3, 4, 4))
    assert err <= RTOL
    assert p.stats["base_macs"] == 6016
    assert (pruned[2].in_channels, pruned[2].out_channels) == (4, 2)
    # after pruning: conv 3->4 at 4x4, transposed conv 4->2 (per input position), 1x1 conv 2->2
    assert p.stats["macs"] == 16 * 4 * 27 + 16 * 4 * 2 * 4 + 64 * 2 * 2


# -- 6. consumers reading several groups, 7. modules called more than once -------------------------


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(11, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)).mean((2, 3)))


def test_every_branch_of_a_concatenation_is_scored_on_its_slice():
    model = _random(TwoBranches())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    scores = chip.calibrate(model, [x], num_batches=1, progress=False)
    assert set(scores.groups) == {"a", "b", "c"}
    with torch.no_grad():
        for name in ("a", "b"):
            direct = channel_independence(F.relu(getattr(model, name)(x))).mean(0)
            assert torch.allclose(scores[name], direct, rtol=1e-10, atol=0), name
    p, _, err = _prune_and_compare(model, 0.5, (3, 6, 6))
    assert err <= RTOL and p.groups["a"].kept == 3 and p.groups["b"].kept == 2


def test_densenet_scores_every_group_consumer_pair():
    """Each dense layer's conv reads the concatenation of every earlier group: one hook point per
    (group, consumer) pair, each on its own slice (before: 120 of 655 pairs)."""
    model = torchvision.models.densenet121(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = find_groups(model, x[:1], check=False)
    scores = chip.calibrate(model, [x], num_batches=1, progress=False, graph=graph)
    pairs = sum(len(g.consumers) for g in graph)
    assert pairs > 600 and len(scores.points) == pairs
    assert all(
        scores.points[p].numel() == graph[scores.point_group[p]].channels for p in scores.points
    )


class SharedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f1 = F.relu(self.a(x))
        f2 = F.relu(self.b(f1))
        return torch.cat([self.head(f1).flatten(1), self.head(f2).flatten(1)], 1)


def test_every_call_of_a_shared_module_is_scored():
    model = _random(SharedHead())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    scores = chip.calibrate(model, [x], num_batches=1, progress=False)
    assert len(scores.points) == 2 and set(scores.point_group.values()) == {"a"}
    with torch.no_grad():
        f1 = F.relu(model.a(x))
        f2 = F.relu(model.b(f1))
    want = (channel_independence(f1).mean(0) + channel_independence(f2).mean(0)) / 2
    assert torch.allclose(scores["a"], want, rtol=1e-10, atol=0)
    _, _, err = _prune_and_compare(model, 0.5, (3, 8, 8))
    assert err <= RTOL


# -- 8. channels-last layers, LayerNorm and layer scale ---------------------------------------------


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: conv, permute to NHWC, LayerNorm, MLP, layer scale, permute back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.ones(16))
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.ln(y.permute(0, 2, 3, 1))
        z = self.fc2(F.gelu(self.fc1(z))) * self.gamma
        return self.out(y + z.permute(0, 3, 1, 2)).mean((2, 3))


def test_channels_last_consumers_are_scored_on_their_channel_axis():
    model = _random(ChannelsLast())
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)  # H != W != C: axes cannot be confused
    scores = chip.calibrate(model, [x], num_batches=1, progress=False)
    assert scores["a"].shape == (16,) and scores["fc1"].shape == (32,)
    with torch.no_grad():
        ln_out = model.ln(model.a(x).permute(0, 2, 3, 1))
        hidden = F.gelu(model.fc1(ln_out))
    want_fc1 = channel_independence(hidden.permute(0, 3, 1, 2)).mean(0)
    assert torch.allclose(scores["fc1"], want_fc1, rtol=1e-10, atol=0)


def test_layer_norm_is_taken_over_the_kept_channels():
    model = _random(ChannelsLast())
    p, pruned, err = _prune_and_compare(model, 0.5, (3, 5, 7))
    assert err <= RTOL
    assert pruned.gamma.shape == (8,) and pruned.ln.normalized_shape == (8,)
    # the definition, by hand: LayerNorm over the kept channels of the stream
    keep = p.groups["a"].keep
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        y = model.a(x).permute(0, 2, 3, 1)[..., keep]
        mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        want = (y - mean) / torch.sqrt(var + model.ln.eps) * model.ln.weight[keep] + model.ln.bias[
            keep
        ]
        got = pruned.ln(pruned.a(x).permute(0, 2, 3, 1))
    assert torch.allclose(got, want, atol=1e-12)


# -- 10. training flags ---------------------------------------------------------------------------


def test_frozen_batch_norms_keep_their_flags():
    model = torchvision.models.resnet18(num_classes=4).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 32, 32)
    scores = chip.calibrate(model, [x], num_batches=1, progress=False)
    p = plan(model, scores, 0.3, input_size=(1, 3, 32, 32))
    pruned = apply(model, p)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: m.training for n, m in pruned.named_modules()} == flags
    assert sum(not f for f in flags.values()) == 20  # the 20 frozen BatchNorms


# -- 11. counts -----------------------------------------------------------------------------------


class SideConv(nn.Module):
    """A conv outside every group (its output is the model output) beside a prunable pair."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 2, 3, padding=1)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.side(x) + self.b(F.relu(self.a(x)))


def test_plan_counts_every_layer():
    model = _random(SideConv())
    rate0 = plan(model, None, 0.0, input_size=(1, 3, 6, 6))
    assert rate0.stats["macs_kept"] == 1.0 and rate0.stats["params_kept"] == 1.0
    p, _, err = _prune_and_compare(model, 0.5, (3, 6, 6))
    side = 36 * 2 * 27
    assert p.stats["base_macs"] == side + 36 * 8 * 27 + 36 * 2 * 8
    assert p.stats["macs"] == side + 36 * 4 * 27 + 36 * 2 * 4 and err <= RTOL


# -- 12. the oracle after a concatenation -----------------------------------------------------------


class Dense(nn.Module):
    """DenseNet-style: each layer reads the concatenation of everything before it, through a BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 3, 3, padding=1))
        self.norm = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


def test_masked_oracle_zeroes_each_group_at_its_offset():
    model = _random(Dense())
    graph = find_groups(model, torch.zeros(1, 3, 5, 5, dtype=torch.float64))
    seen = {}
    with torch.no_grad():
        hooks = masked_forward_hooks(model, {"l1.2": [1]}, graph)  # l1's channel 1 = input 4 + 1
        handle = model.l2[2].register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0]))
        model(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    for h in hooks + [handle]:
        h.remove()
    zero = seen["x"].abs().sum((0, 2, 3)) == 0
    assert zero.tolist() == [False] * 5 + [True] + [False]
    p, _, err = _prune_and_compare(model, 0.34, (3, 5, 5))
    assert err <= RTOL and all(g.kept < g.channels for g in p.groups.values())


# -- the safety net and refusals ------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class WrongScalePruner(chip.groups.PadShortcutPruner):
    """A broken custom pruner: always drops the FIRST channels, whatever it is asked."""

    def prune_out_channels(self, layer, idxs):
        layer.weight = nn.Parameter(layer.weight.data[len(idxs) :])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.weight.numel()

    get_in_channels = get_out_channels


@pytest.fixture
def wrong_pruner():
    register_pruner(Scale, WrongScalePruner())
    yield
    chip.groups.CUSTOM_PRUNERS.pop(Scale)


def _scaled():
    return _random(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
            Scale(8),
            nn.ReLU(),
            nn.Conv2d(8, 2, 1),
        )
    )


def test_check_refuses_a_group_a_wrong_pruner_breaks(wrong_pruner):
    model = _scaled()
    with pytest.warns(ChipWarning, match="changes what the model computes"):
        p = plan(model, None, 0.5, input_size=(1, 3, 6, 6))
    assert "changes what the model computes" in p.skipped["2"]
    assert p.groups["0"].kept == 4
    assert apply(model, p) is not None  # the rest is pruned and verified


def test_apply_names_the_group_when_verification_fails(wrong_pruner):
    model = _scaled()
    graph = find_groups(model, torch.zeros(1, 3, 6, 6, dtype=torch.float64), check=False)
    p = plan(model, None, 0.5, input_size=(1, 3, 6, 6), graph=graph)  # unchecked: prunes "2"
    with pytest.raises(ChipError, match=r"verification failed for group '2' \(layers 2, 3, 5\)"):
        apply(model, p)
    wrong = apply(model, p, verify=False)  # without the net it is silently wrong
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert (wrong(x) - _masked(model, p, x)).abs().max() > 1e-3


def test_a_failed_inplace_apply_leaves_the_model_as_it_was(wrong_pruner):
    model = _scaled()
    graph = find_groups(model, torch.zeros(1, 3, 6, 6, dtype=torch.float64), check=False)
    p = plan(model, None, 0.5, input_size=(1, 3, 6, 6), graph=graph)
    conv = model[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ChipError, match="verification failed"):
        apply(model, p, inplace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model[2] is conv and conv.out_channels == 8 and conv.weight.shape[0] == 8
    assert not hasattr(model, "chip_plan")
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_skipped_groups_round_trip_and_cannot_be_asked_for(tmp_path):
    model = _random(PartialConv())
    with pytest.warns(ChipWarning, match="p: its channels pass through torch.split"):
        p = plan(model, None, 0.5, input_size=(1, 3, 8, 8))
    p.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json").skipped == p.skipped
    assert "p" in json.loads((tmp_path / "plan.json").read_text())["skipped"]
    with (
        pytest.raises(ChipError, match="layer 'p' cannot be pruned: its channels pass through"),
        pytest.warns(ChipWarning),
    ):
        plan(model, None, {"p": 0.5}, input_size=(1, 3, 8, 8))
    edited = PruningPlan.from_dict(
        {
            **p.to_dict(),
            "groups": {**p.to_dict()["groups"], "p": {"channels": 8, "keep": list(range(4))}},
        }
    )
    with pytest.raises(ChipError, match="group 'p' cannot be pruned"):
        apply(model, edited)


def test_a_model_on_the_meta_device_is_refused_in_one_line():
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=4)
    for step in (
        lambda: plan(model, None, 0.5, input_size=(1, 3, 32, 32)),
        lambda: chip.score(model, [torch.randn(2, 3, 32, 32)]),
        lambda: chip.score(model, criterion="l1", example_inputs=torch.randn(1, 3, 32, 32)),
    ):
        with pytest.raises(ChipError, match=r"meta device .*'conv1.weight'.*to_empty"):
            step()


def test_volumetric_convs_calibrate_prune_and_refuse_hrank_by_name():
    model = _random(
        nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(8, 4, 1),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
    )
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    scores = chip.score(model, data, "chip", num_batches=2)
    assert set(scores.groups) == {"0", "3", "5"}
    # group "3" is read by conv 5 alone: its scores are CI of conv 5's 5-D input, flattened
    with torch.no_grad():
        maps = torch.cat([model[:5](x) for x in data])
    want = channel_independence(maps.flatten(2)).mean(0)
    torch.testing.assert_close(scores.groups["3"], want, rtol=1e-9, atol=1e-12)
    p = plan(model, scores, 0.5, input_size=(1, 3, 4, 6, 6))
    pruned = apply(model, p)  # verified against the masked original inside
    assert pruned[3].out_channels == 4 and pruned[5].in_channels == 4
    with pytest.raises(ChipError, match=r"'hrank' ranks 2-D .* 3-D maps .* use criterion 'chip'"):
        chip.score(model, data, "hrank", num_batches=1)


class ArgmaxOutput(nn.Module):
    def __init__(self, cut: str):
        super().__init__()
        self.cut = cut
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 4, 1)
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.c0(x))
        if self.cut == "argmax":
            return self.c1(y).argmax(1)
        with torch.no_grad():
            z = self.c2(y)
        return self.c1(y) + z[:, :4]


def test_layers_the_trace_cannot_reach_are_named():
    with pytest.raises(ChipError, match=r"no channel groups: layers c0, c1 run but .* argmax"):
        plan(ArgmaxOutput("argmax"), None, 0.5, input_size=(1, 3, 8, 8))
    with pytest.warns(ChipWarning, match=r"leaves layers c2 as they are: they run but are not"):
        p = plan(ArgmaxOutput("no_grad"), None, 0.5, input_size=(1, 3, 8, 8))
    assert "c0" in p.skipped  # c2 reads c0's channels unseen: chip refuses to prune them
