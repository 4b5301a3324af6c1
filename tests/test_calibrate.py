"""calibrate(): hook points, the streaming CI pass against a plain oracle, determinism, persistence."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

import chip
from chip.calibration import ChannelScores, calibrate, hook_points, reference_points
from chip.ci import channel_independence_oracle
from chip.errors import ChipError
from chip.groups import find_groups

# The reference hooks the last stage's final block output; chip scores that stream where its
# consumer reads it, after the global pool (docs/method.md section 1). That stream is never pruned by the paper.
POOLED_LAST = {
    "resnet56": ("layer3.8.relu2", "flatten"),
    "resnet110": ("layer3.17.relu2", "flatten"),
    "resnet50": ("layer4.2.relu:2", "fc:input"),
}


@pytest.mark.parametrize(
    "arch,size", [("resnet56", 32), ("resnet110", 32), ("vgg16_bn", 32), ("resnet50", 64)]
)
def test_hook_points_match_reference(arch, size):
    model = chip.models.create(arch)
    example = torch.randn(2, 3, size, size)
    graph = find_groups(model, example)
    ours = [p.label for p in hook_points(model, graph, example)]
    ref = reference_points(arch)
    if arch in POOLED_LAST:
        ref_last, ours_last = POOLED_LAST[arch]
        ref = [ours_last if r == ref_last else r for r in ref]
    else:  # VGG: the reference does not score conv 13 nor the hidden classifier layer
        assert ours[len(ref) :] == ["flatten", "classifier.relu1"]
        ours = ours[: len(ref)]
    assert ours == ref


def test_coupled_groups_of_resnet56():
    model = chip.models.create("resnet56")
    example = torch.randn(1, 3, 32, 32)
    graph = find_groups(model, example)
    points = hook_points(model, graph, example)
    by_group = {}
    for p in points:
        by_group.setdefault(p.group, []).append(p.label)
    # stem + stage-1 stream: the stem output and the 9 block outputs
    assert by_group["conv1"] == ["relu"] + [f"layer1.{b}.relu2" for b in range(9)]
    assert by_group["layer1.3.conv1"] == ["layer1.3.relu1"]
    assert set(graph["conv1"].producers) == {"conv1"} | {f"layer1.{b}.conv2" for b in range(9)}
    # stage-1 stream is read by the stage-2 shortcut too (its input channels)
    assert "layer2.0.shortcut" in graph["conv1"].consumer_names
    assert "layer2.0.shortcut" in graph["layer2.0.conv2"].producers
    assert len(graph) == 3 + 27


class TinyNet(nn.Module):
    """Stem + two residual blocks sharing a stream, a pooled conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act0 = nn.ReLU()
        self.a = nn.Conv2d(6, 5, 3, padding=1)
        self.act_a = nn.ReLU()
        self.b = nn.Conv2d(5, 6, 3, padding=1)
        self.act_b = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Conv2d(6, 7, 3, padding=1)
        self.act_c = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        s = self.act0(self.stem(x))
        s = self.act_b(self.b(self.act_a(self.a(s))) + s)
        h = self.act_c(self.c(self.pool(s)))
        return self.fc(torch.flatten(self.gap(h), 1))


def _batches(n_batches=3, n=5, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, size, size, generator=g), torch.zeros(n)) for _ in range(n_batches)]


def test_calibrate_equals_plain_oracle():
    model = TinyNet().double()
    data = [(x.double(), y) for x, y in _batches()]
    scores = calibrate(model, data, num_batches=3, progress=False, seed=None)

    # the oracle: capture each consumer input the slow way, per-sample CI by masked SVDs
    captured = {"act0": [], "act_a": [], "pool": [], "fc_in": []}
    hooks = [
        model.act0.register_forward_hook(lambda m, i, o: captured["act0"].append(o.clone())),
        model.act_a.register_forward_hook(lambda m, i, o: captured["act_a"].append(o.clone())),
        model.pool.register_forward_hook(lambda m, i, o: captured["pool"].append(o.clone())),
        model.fc.register_forward_pre_hook(lambda m, i: captured["fc_in"].append(i[0].clone())),
    ]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    oracle = {
        k: torch.cat([channel_independence_oracle(t) for t in v]).mean(0)
        for k, v in captured.items()
    }

    assert set(scores.points) == {"act0", "act_a", "pool", "fc:input"}
    torch.testing.assert_close(scores.points["act0"], oracle["act0"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(scores.points["act_a"], oracle["act_a"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(scores.points["pool"], oracle["pool"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(scores.points["fc:input"], oracle["fc_in"], rtol=1e-7, atol=1e-9)
    # the stream group (stem + b) is read by conv a (act0) and conv c (pool): its score is the
    # mean of those two hook points
    stream = scores.point_group["act0"]
    assert scores.point_group["pool"] == stream
    torch.testing.assert_close(scores.groups[stream], (oracle["act0"] + oracle["pool"]) / 2)
    assert scores.num_samples == 15


def test_calibrate_leaves_model_alone():
    model = TinyNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, _batches(), num_batches=2, progress=False)
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class NoisyLoader:
    """Each iteration draws fresh random 'augmentation' from the global torch RNG."""

    def __iter__(self):
        for _ in range(4):
            yield torch.rand(4, 3, 8, 8) * 2, torch.zeros(4)


def test_calibrate_is_deterministic_for_a_seed():
    model = TinyNet()
    a = calibrate(model, NoisyLoader(), num_batches=3, seed=7, progress=False)
    b = calibrate(model, NoisyLoader(), num_batches=3, seed=7, progress=False)
    c = calibrate(model, NoisyLoader(), num_batches=3, seed=8, progress=False)
    assert all(torch.equal(a.points[k], b.points[k]) for k in a.points)
    assert not all(torch.equal(a.points[k], c.points[k]) for k in a.points)


def test_num_batches_limits_the_pass():
    model = TinyNet()
    scores = calibrate(model, _batches(n_batches=5), num_batches=2, progress=False)
    assert scores.num_samples == 10


def test_criteria_and_errors():
    model = TinyNet()
    calls = []

    def energy(fmaps):
        calls.append(tuple(fmaps.shape))
        return fmaps.flatten(2).pow(2).sum(-1) if fmaps.dim() > 2 else fmaps.pow(2)

    scores = calibrate(model, _batches(), num_batches=1, criterion=energy, progress=False)
    assert scores.meta["criterion"] == "energy"
    assert len(calls) == 4  # one call per hook point per batch, shared tensors scored once
    hr = calibrate(model, _batches(), num_batches=1, criterion="hrank", progress=False)
    assert all(((v >= 0) & (v <= 8)).all() for v in hr.points.values())
    with pytest.raises(ChipError, match="unknown criterion"):
        calibrate(model, _batches(), criterion="nope", progress=False)
    with pytest.raises(ChipError, match="num_batches"):
        calibrate(model, _batches(), num_batches=0, progress=False)
    with pytest.raises(ChipError, match="expected a tensor"):
        calibrate(model, [("a", "b")], progress=False)


def test_scores_save_load_and_reference_layout(tmp_path):
    model = chip.models.create("resnet20")
    scores = calibrate(model, _batches(n=4, size=32), num_batches=2, progress=False)
    path = tmp_path / "s.safetensors"
    scores.save(path)
    loaded = ChannelScores.load(path)
    assert loaded.point_group == scores.point_group and loaded.num_samples == scores.num_samples
    assert loaded.meta == json.loads(json.dumps(scores.meta))
    for k in scores.groups:
        assert torch.equal(loaded.groups[k], scores.groups[k])
    # the file is safetensors, not a pickle
    assert not path.read_bytes().startswith(b"PK") and not path.read_bytes().startswith(b"\x80")
    with pytest.raises(ChipError, match="not found"):
        ChannelScores.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(ChipError):
        ChannelScores.load(tmp_path / "junk")


def test_reference_export_import_round_trip(tmp_path):
    model = chip.models.create("resnet56")
    example = torch.randn(2, 3, 32, 32)
    graph = find_groups(model, example)
    points = hook_points(model, graph, example)
    g = torch.Generator().manual_seed(0)
    fake = {
        p.label: torch.rand(graph[p.group].channels, generator=g, dtype=torch.float64)
        for p in points
    }
    scores = ChannelScores.from_points(fake, {p.label: p.group for p in points})
    written = scores.export_reference(tmp_path, "resnet56")
    assert len(written) == 54  # 55 reference files minus the pooled last-stage output
    assert (tmp_path / "ci_conv1.npy").exists() and (tmp_path / "ci_conv2.npy").exists()
    back = ChannelScores.from_reference(tmp_path, "resnet56", points)
    for label in back.points:
        assert torch.equal(back.points[label], fake[label])
    # ci_conv3 is layer1.0.relu2 (a block output of the stage-1 stream)
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "ci_conv3.npy"), fake["layer1.0.relu2"].numpy())
    with pytest.raises(ChipError, match="no ci_conv"):
        ChannelScores.from_reference(tmp_path / "empty", "resnet56", points)


def test_reference_points_come_from_the_registry():
    info = chip.models.get_model_info
    for arch, n in (("resnet56", 55), ("resnet110", 109), ("vgg16_bn", 12), ("resnet50", 49)):
        assert reference_points(arch) == list(info(arch).reference_points)
        assert len(reference_points(arch)) == n
    assert reference_points("resnet56")[:3] == ["relu", "layer1.0.relu1", "layer1.0.relu2"]
    assert reference_points("resnet50")[:2] == ["maxpool", "layer1.0.relu:0"]
    assert reference_points("vgg16_bn")[-1] == "features.relu15"
    for arch in ("resnet20", "tv_resnet18", None):  # the reference code has no CI files for these
        with pytest.raises(
            ChipError,
            match=r"no reference CI layout for arch .*; expected one of "
            r"\['resnet110', 'resnet50', 'resnet56', 'vgg16_bn'\]",
        ):
            reference_points(arch)


def test_registered_arch_reference_round_trip(tmp_path, monkeypatch):
    """An architecture registered with its own hook points exports and imports the reference's
    ci_conv{k}.npy files with no edit of chip.calibration."""
    import numpy as np

    from chip.models import registry

    monkeypatch.setattr(registry, "_MODEL_TABLE", dict(registry._MODEL_TABLE))
    labels = ["act0", "act_b", "act_a", "pool", "fc:input"]  # act_b: a point chip does not hook
    chip.models.register_model(
        "tinynet", input_size=(3, 8, 8), num_classes=4, reference_points=lambda: labels
    )(lambda **kw: TinyNet())
    assert reference_points("tinynet") == labels
    model = chip.models.create("tinynet")
    scores = calibrate(model, _batches(), num_batches=2, progress=False)
    written = scores.export_reference(tmp_path, "tinynet")
    assert [p.name for p in written] == [
        "ci_conv1.npy",
        "ci_conv3.npy",
        "ci_conv4.npy",
        "ci_conv5.npy",
    ]
    assert np.array_equal(np.load(tmp_path / "ci_conv3.npy"), scores.points["act_a"].numpy())
    example = torch.randn(2, 3, 8, 8)
    points = hook_points(model, find_groups(model, example), example)
    back = ChannelScores.from_reference(tmp_path, "tinynet", points)
    assert set(back.points) == set(scores.points)
    for label in back.points:
        assert torch.equal(back.points[label], scores.points[label])
    for group in scores.groups:
        torch.testing.assert_close(back.groups[group], scores.groups[group])
    assert back.meta["arch"] == "tinynet"


def test_groups_of_torchvision_models():
    mb = torchvision.models.mobilenet_v2(num_classes=10)
    graph = find_groups(mb, torch.randn(1, 3, 32, 32))
    # an inverted residual: the expand conv, its depthwise conv (both in and out) and the project conv
    g = graph["features.2.conv.0.0"]
    assert "features.2.conv.1.0" in g.producers and "features.2.conv.1.0" in g.consumer_names
    assert "features.2.conv.2" in g.consumer_names
    vgg = torchvision.models.vgg11_bn(num_classes=10)
    graph = find_groups(vgg, torch.randn(1, 3, 32, 32))
    last = graph["features.25"]
    (fc,) = [c for c in last.consumers if c.name == "classifier.0"]
    assert tuple(fc.index.shape) == (512, 49)  # flatten: each channel feeds 7 x 7 features
    assert fc.index[1, 0] == 49


STREAM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import chip
    torch.set_num_threads(1)
    model = chip.models.create("resnet20")
    n = int(sys.argv[1])
    class Loader:
        def __iter__(self):
            for _ in range(n):
                yield torch.randn(32, 3, 32, 32), torch.zeros(32)
    chip.calibrate(model, Loader(), num_batches=n, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_rss_kb(n_batches: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, str(n_batches)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_calibration_streams():
    """Peak memory with 20 batches is no higher than with 2 (maps are never kept).

    Keeping the hooked maps would cost ~2 MB per hook point per batch (19 points): ~700 MB more
    for 18 extra batches; allow 40 MB of allocator noise.
    """
    two, twenty = _peak_rss_kb(2), _peak_rss_kb(20)
    assert twenty <= two + 40_000, (two, twenty)


def test_calibrate_restores_the_model_when_it_fails():
    model = TinyNet()
    model.train()

    def broken(fmaps):
        raise RuntimeError("criterion failed")

    with pytest.raises(RuntimeError, match="criterion failed"):
        calibrate(model, _batches(), num_batches=1, criterion=broken, progress=False)
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
