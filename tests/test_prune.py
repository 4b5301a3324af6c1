"""Surgery (chip.prune.apply): the pruned model computes what the original computes with the
removed channels zeroed (the oracle :func:`chip.prune.masked_forward_hooks`), in float64.

Every model is built in float64 with random BatchNorm statistics and affine parameters (so BN is
not the identity), scored with random scores, planned, pruned and compared with the masked
original. Architectures are parametrised in the style of timm's model tests.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torchvision

import chip.models as M
from chip.counting import count
from chip.errors import ChipError
from chip.groups import PadShortcutPruner, find_groups
from chip.models.resnet_cifar import PadShortcut
from chip.planning import plan
from chip.prune import apply, masked_forward_hooks

RTOL = 1e-9  # relative to max |output|; float64 surgery is exact up to ~1e-14


def _tv(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _tv_vgg16_bn() -> nn.Module:
    """torchvision VGG-16-BN with a narrow classifier (25088 -> 64 -> 10 instead of 4096 wide):
    the same features, 7x7 avg-pool and flatten into a linear layer, ~100x fewer parameters.
    Built on the meta device first, so the 100M-parameter classifier is never initialised."""
    with torch.device("meta"):
        model = _tv("vgg16_bn")
    model.features.to_empty(device="cpu")
    for m in model.features.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10)
    )
    return model


# case id -> (builder, input size, target); the slow ones are marked below
CASES = {
    "resnet20-rate": (lambda: M.create("resnet20"), 32, 0.3),
    "resnet20-sparsity": (lambda: M.create("resnet20"), 32, "[0.]+[0.3]*2+[0.5]*9"),
    "resnet56-sparsity": (lambda: M.create("resnet56"), 32, "[0.]+[0.15]*2+[0.4]*27"),
    "vgg16_bn-sparsity": (lambda: M.create("vgg16_bn"), 32, "[0.5]*6+[0.3]*6"),
    "resnet50-sparsity": (lambda: M.create("resnet50"), 64, "[0.]+[0.1]*3+[0.35]*16"),
    "tv_resnet18": (lambda: _tv("resnet18"), 32, 0.3),
    "tv_resnet50": (lambda: _tv("resnet50"), 32, 0.3),
    "tv_vgg16_bn": (_tv_vgg16_bn, 32, 0.3),
    "tv_mobilenet_v2": (lambda: _tv("mobilenet_v2"), 32, 0.3),
}
SLOW = {"resnet50-sparsity", "tv_resnet50", "resnet56-sparsity"}
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]


def _randomise(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN statistics and affine parameters, so that BatchNorm is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


@functools.lru_cache(maxsize=None)
def prepared(case: str) -> dict:
    """Build, score, plan and prune one case once per session (results are never mutated)."""
    build, size, target = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    model = _randomise(build().double().eval(), gen)
    input_size = (1, 3, size, size)
    graph = find_groups(model, torch.zeros(input_size, dtype=torch.float64))
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in graph}
    p = plan(model, scores, target, graph=graph, input_size=input_size)
    before = _state(model)
    pruned = apply(model, p)
    return dict(
        model=model,
        graph=graph,
        plan=p,
        pruned=pruned,
        before=before,
        input_size=input_size,
        x=torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_pruned_equals_masked_original(case):
    c = prepared(case)
    model, pruned, x = c["model"], c["pruned"], c["x"]
    with torch.no_grad():
        plain = model(x)
        handles = masked_forward_hooks(model, c["plan"], c["graph"])
        try:
            masked = model(x)
        finally:
            for h in handles:
                h.remove()
        out = pruned(x)
    scale = masked.abs().max()
    assert out.shape == masked.shape
    assert (plain - masked).abs().max() > 1e-3 * scale  # the mask matters: the test can fail
    assert (out - masked).abs().max() <= RTOL * scale


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_pruned_is_smaller_and_counted(case):
    c = prepared(case)
    p, pruned, model = c["plan"], c["pruned"], c["model"]
    n_params = sum(t.numel() for t in pruned.parameters())
    assert n_params < sum(t.numel() for t in model.parameters())
    counts = count(pruned, c["input_size"])
    assert (counts.params, counts.macs) == (p.stats["params"], p.stats["macs"])
    assert pruned.chip_plan is p
    assert not pruned.training  # mode restored (the model was in eval mode)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_original_untouched(case):
    c = prepared(case)
    after = _state(c["model"])
    assert after.keys() == c["before"].keys()
    for k, v in c["before"].items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not hasattr(c["model"], "chip_plan")


def test_inplace_returns_same_model_and_keeps_train_mode():
    model = M.create("resnet20").train()
    p = plan(model, None, 0.5)
    pruned = apply(model, p, inplace=True)
    assert pruned is model and pruned.training
    assert model.conv1.out_channels == 8


# -- option-A shortcut ----------------------------------------------------------------------------


def _pad_pairs(src_keep: list[int], dst_keep: list[int], pad: int) -> list[tuple[int, int]]:
    """Hand computation: original channel c goes to c + pad; both re-numbered among the kept."""
    return [(src_keep.index(c), dst_keep.index(c + pad)) for c in src_keep if c + pad in dst_keep]


def test_pad_shortcut_renumbered_after_pruning():
    c = prepared("resnet20-sparsity")
    p, pruned = c["plan"], c["pruned"]
    k1, k2, k3 = (p.groups[g].keep for g in ("conv1", "layer2.0.conv2", "layer3.0.conv2"))
    assert (len(k1), len(k2), len(k3)) == (11, 22, 64)
    for sc, src_keep, dst_keep, pad in [
        (pruned.layer2[0].shortcut, k1, k2, 8),
        (pruned.layer3[0].shortcut, k2, k3, 16),
    ]:
        pairs = list(zip(sc.src.tolist(), sc.dst.tolist()))
        assert pairs == _pad_pairs(src_keep, dst_keep, pad)
        assert (sc.in_channels, sc.out_channels) == (len(src_keep), len(dst_keep))
    # some stage-1 channels land on removed stage-2 positions: the drop path is exercised
    assert len(pruned.layer2[0].shortcut.src) < len(k1)


@pytest.mark.parametrize("out_first", [True, False])
def test_pad_shortcut_pruner_order_independent(out_first):
    sc = PadShortcut(6, 12)  # channel c -> position c + 3
    drop_in, drop_out = [1, 4], [0, 3, 5, 8, 11]
    pruner = PadShortcutPruner()
    steps = [(pruner.prune_out_channels, drop_out), (pruner.prune_in_channels, drop_in)]
    for fn, idxs in steps if out_first else steps[::-1]:
        fn(sc, idxs)
    src_keep = [i for i in range(6) if i not in drop_in]
    dst_keep = [i for i in range(12) if i not in drop_out]
    assert list(zip(sc.src.tolist(), sc.dst.tolist())) == _pad_pairs(src_keep, dst_keep, 3)
    x = torch.randn(1, 6, 4, 4)
    full = PadShortcut(6, 12)(x)
    assert torch.equal(
        sc(x[:, src_keep]),
        full[:, dst_keep]
        * torch.isin(torch.tensor(dst_keep), torch.tensor(src_keep) + 3).view(1, -1, 1, 1),
    )


# -- coupled channels -----------------------------------------------------------------------------


@pytest.mark.slow
def test_coupled_stream_shares_one_kept_set():
    c = prepared("resnet56-sparsity")
    p, pruned, orig = c["plan"], c["pruned"], c["model"]
    keep_stream = p.groups["conv1"].keep
    n = len(keep_stream)
    assert n == 13
    writers = [pruned.conv1] + [b.conv2 for b in pruned.layer1]
    norms = [pruned.bn1] + [b.bn2 for b in pruned.layer1]
    readers = [b.conv1 for b in pruned.layer1] + [pruned.layer2[0].conv1]
    assert [w.out_channels for w in writers] == [n] * 10
    assert [b.num_features for b in norms] == [n] * 10
    assert [r.in_channels for r in readers] == [n] * 10
    keep_inner = p.groups["layer1.0.conv1"].keep
    assert torch.equal(
        pruned.layer1[0].conv2.weight, orig.layer1[0].conv2.weight[keep_stream][:, keep_inner]
    )
    assert torch.equal(
        pruned.layer1[3].bn2.running_var, orig.layer1[3].bn2.running_var[keep_stream]
    )
    assert torch.equal(pruned.conv1.weight, orig.conv1.weight[keep_stream])
    assert torch.equal(
        pruned.layer2[0].conv1.weight,
        orig.layer2[0].conv1.weight[p.groups["layer2.0.conv1"].keep][:, keep_stream],
    )


def test_stage3_stream_into_fc():
    """A uniform rate prunes the stage-3 stream too: fc keeps the matching input columns."""
    c = prepared("resnet20-rate")
    keep = c["plan"].groups["layer3.0.conv2"].keep
    assert len(keep) == 44
    assert torch.equal(c["pruned"].fc.weight, c["model"].fc.weight[:, keep])
    assert torch.equal(c["pruned"].fc.bias, c["model"].fc.bias)


def test_flatten_into_linear_keeps_spread_columns():
    """torchvision VGG: each conv-13 channel spreads over 49 features of the first linear layer."""
    c = prepared("tv_vgg16_bn")
    last = c["graph"].group_of("features.40", "out")
    keep = c["plan"].groups[last].keep
    cols = torch.tensor([ch * 49 + j for ch in keep for j in range(49)])
    assert torch.equal(
        c["pruned"].classifier[0].weight,
        c["model"].classifier[0].weight[c["plan"].groups["classifier.0"].keep][:, cols],
    )


# -- wrong model ----------------------------------------------------------------------------------


def test_already_pruned_model_rejected():
    c = prepared("resnet20-rate")
    with pytest.raises(ChipError, match="already pruned"):
        apply(c["pruned"], c["plan"])


@pytest.mark.parametrize(
    "other",
    [
        lambda: M.create("vgg16_bn"),
        lambda: M.create("resnet56"),  # has every group of resnet20, with the same widths
    ],
)
def test_other_architecture_rejected(other):
    p = prepared("resnet20-rate")["plan"]
    with pytest.raises(ChipError, match="another architecture"):
        apply(other().double(), p)


def test_other_torchvision_architecture_rejected():
    """A resnet18 plan names only groups that resnet34 also has (same widths)."""
    model = _tv("resnet18")
    p = plan(model, None, 0.3, input_size=(1, 3, 32, 32))
    with pytest.raises(ChipError, match="another architecture"):
        apply(_tv("resnet34"), p)


def test_an_edited_plan_gets_the_counts_of_what_it_prunes():
    model = M.create("resnet20")
    p = plan(model, None, 0.5)
    edited = plan(model, None, 0.5)
    edited.groups["conv1"].keep = edited.groups["conv1"].keep[:2]  # by hand, stats now stale
    pruned = apply(model, edited)
    counts = count(pruned, p.input_size)
    stats = pruned.chip_plan.stats
    assert (stats["params"], stats["macs"]) == (counts.params, counts.macs)
    assert stats["params"] < p.stats["params"] and stats["macs"] < p.stats["macs"]
    assert stats["macs_kept"] == counts.macs / stats["base_macs"]
    assert stats["base_macs"] == p.stats["base_macs"]
    assert apply(model, p).chip_plan is p  # a plan as made keeps its own stats
