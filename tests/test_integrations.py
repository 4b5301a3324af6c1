"""CHIPImportance inside real Torch-Pruning pruner runs: the kept channels are chip's top-k."""

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import chip
from chip.calibration import calibrate
from chip.errors import ChipError
from chip.groups import CUSTOM_PRUNERS, find_groups
from chip.integrations import CHIPImportance
from chip.models import create


def tiny_cnn():
    """Plain conv stack with a flatten (2x2 spatial) into the classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(40, 3),
    )


MODELS = {
    "resnet20": (lambda: create("resnet20"), "fc"),
    "tiny_cnn": (tiny_cnn, "8"),
}


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)


@pytest.fixture(params=list(MODELS))
def calibrated(request):
    build, fc = MODELS[request.param]
    model = build().eval()
    _randomize_bn(model)
    images = torch.randn(6, 3, 16, 16)
    scores = calibrate(model, [images[:3], images[3:]], 2, progress=False)
    return model, fc, images, scores


@pytest.mark.parametrize("pass_model", [True, False])
def test_base_pruner_keeps_chips_top_k(calibrated, pass_model):
    model, fc, images, scores = calibrated
    original = copy.deepcopy(model)
    example = images[:1]
    expected_plan = chip.plan(original, scores, 0.5, input_size=tuple(example.shape))
    expected = chip.apply(original, expected_plan)  # chip's own surgery: tested against masking

    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=CHIPImportance(scores, model if pass_model else None),
        pruning_ratio=0.5,
        ignored_layers=[model.get_submodule(fc)],
        customized_pruners=dict(CUSTOM_PRUNERS),
    )
    pruner.step()

    got, want = model.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    # explicitly: every conv producer holds the original filters of the expected keep sets
    graph = find_groups(original, example)
    checked = 0
    for g in graph:
        keep = expected_plan.groups[g.name].keep
        assert len(keep) == int(g.channels * 0.5)
        for name in g.producers:
            module = original.get_submodule(name)
            if not isinstance(module, nn.Conv2d):
                continue
            source = graph.group_of(name, "in")
            keep_in = expected_plan.groups[source].keep if source else range(module.in_channels)
            want_w = module.weight[keep][:, list(keep_in)]
            assert torch.equal(model.get_submodule(name).weight, want_w), name
            checked += 1
    assert checked >= len(graph)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected(images))


def test_partial_group_follows_root_order():
    model = create("resnet20").eval()
    images = torch.randn(2, 3, 16, 16)
    scores = calibrate(model, [images], 1, progress=False)
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=images[:1], customized_pruners=dict(CUSTOM_PRUNERS)
    )
    importance = CHIPImportance(scores, model)
    # rooted at a later producer of the stage-1 stream; chip names the group after conv1
    group = dg.get_pruning_group(model.layer1[1].conv2, tp.prune_conv_out_channels, idxs=[5, 2, 9])
    torch.testing.assert_close(importance(group), scores["conv1"][[5, 2, 9]].float())
    group = dg.get_pruning_group(model.layer2[0].conv1, tp.prune_conv_out_channels, idxs=[7, 0])
    torch.testing.assert_close(importance(group), scores["layer2.0.conv1"][[7, 0]].float())


def test_unmatched_group_is_a_clear_error():
    model = create("resnet20").eval()
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.randn(1, 3, 16, 16), customized_pruners=dict(CUSTOM_PRUNERS)
    )
    importance = CHIPImportance({"some.other.layer": torch.ones(4)}, model)
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    with pytest.raises(ChipError, match="no chip group matches"):
        importance(group)
    with pytest.raises(ChipError, match="ChannelScores"):
        CHIPImportance({})


def test_is_a_torch_pruning_importance():
    assert issubclass(CHIPImportance, tp.importance.Importance)
    assert chip.CHIPImportance is CHIPImportance
