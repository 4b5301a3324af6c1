"""Model zoo: shapes, parameter counts, reference key names and the option-A shortcut.

Oracles are independent of the model code: parameter counts from a hand formula, state_dict key
sets generated from the docs/method.md section 8 naming patterns, and forwards recomputed with plain
``torch.nn.functional`` calls on the model's own state_dict.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import chip.models as M
from chip.errors import ChipError
from chip.models import CifarResNet, PadShortcut
from chip.models.vgg_cifar import VGG_CFGS

ZOO = M.list_models()
CIFAR_RESNETS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
FAST_SIZE = {"resnet50": (3, 64, 64)}  # keep the ImageNet model cheap on CPU
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _input(name: str, batch: int = 2, channels: int | None = None) -> torch.Tensor:
    c, h, w = FAST_SIZE.get(name, M.arch_input_size(name))
    return torch.randn(batch, channels or c, h, w)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- hand-count oracles
def _conv(cin: int, cout: int, k: int = 3, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _resnet_cifar_params(depth: int, num_classes: int = 10, in_channels: int = 3) -> int:
    n = (depth - 2) // 6
    total = _conv(in_channels, 16) + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += _conv(cin, width) + _conv(width, width) + 4 * width
            cin = width
    return total + 64 * num_classes + num_classes


def _vgg_params(cfg, num_classes: int = 10, in_channels: int = 3) -> int:
    total, cin = 0, in_channels
    for item in cfg:
        if item != "M":
            total += _conv(cin, item, bias=True) + 2 * item
            cin = item
    return total + (cin * cin + cin) + 2 * cin + (cin * num_classes + num_classes)


def _resnet_cifar_keys(depth: int, head: str) -> set[str]:
    n = (depth - 2) // 6
    keys = {"conv1.weight", *(f"bn1.{k}" for k in BN_KEYS), f"{head}.weight", f"{head}.bias"}
    for stage in (1, 2, 3):
        for b in range(n):
            for i in (1, 2):
                keys.add(f"layer{stage}.{b}.conv{i}.weight")
                keys.update(f"layer{stage}.{b}.bn{i}.{k}" for k in BN_KEYS)
    return keys


def _vgg_keys(cfg) -> set[str]:
    keys = set()
    for i, item in enumerate(cfg):
        if item != "M":
            keys.update({f"features.conv{i}.weight", f"features.conv{i}.bias"})
            keys.update(f"features.norm{i}.{k}" for k in BN_KEYS)
    keys.update(f"classifier.linear{j}.{k}" for j in (1, 2) for k in ("weight", "bias"))
    keys.update(f"classifier.norm1.{k}" for k in BN_KEYS)
    return keys


# ----------------------------------------------------------------------------- registry
def test_zoo_contents():
    assert {"resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "resnet50"} <= set(ZOO)
    assert M.arch_input_size("resnet56") == (3, 32, 32)
    assert M.arch_input_size("vgg16_bn") == (3, 32, 32)
    assert M.arch_input_size("resnet50") == (3, 224, 224)


def test_unknown_model_lists_names():
    with pytest.raises(ChipError) as info:
        M.create("resnet57")
    msg = str(info.value)
    assert "\n" not in msg and "resnet57" in msg
    assert all(name in msg for name in ZOO)
    with pytest.raises(ChipError):
        M.arch_input_size("nope")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": -1}, {"num_classes": 2.5}])
def test_bad_kwargs(kwargs):
    with pytest.raises(ChipError):
        M.create("resnet20", **kwargs)


def test_register_model_duplicate_rejected():
    with pytest.raises(ValueError):
        M.register_model("resnet20")(lambda num_classes, in_channels: None)


EXPECTED_INFO = {  # arch -> (input size, classes, sparsity positions, reference points)
    "resnet20": ((3, 32, 32), 10, 12, None),
    "resnet32": ((3, 32, 32), 10, 18, None),
    "resnet44": ((3, 32, 32), 10, 24, None),
    "resnet56": ((3, 32, 32), 10, 30, 55),
    "resnet110": ((3, 32, 32), 10, 57, 109),
    "vgg16_bn": ((3, 32, 32), 10, 12, 12),
    "resnet50": ((3, 224, 224), 1000, 20, 49),
}

SPARSITY_HELP = {  # the one-line help of the "expected exactly N rates (...)" error
    "vgg16_bn": "one rate per conv for the first 12 convs",
    "resnet50": "stem, 3 stream rates for stages 1-3, one inner rate per bottleneck (16)",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_INFO))
def test_model_info_facts(name):
    """Every architecture fact chip uses lives in its ModelInfo (docs/method.md sections 3, 8)."""
    info = M.get_model_info(name)
    size, classes, positions, points = EXPECTED_INFO[name]
    assert (info.name, info.input_size, info.num_classes) == (name, size, classes)
    assert not hasattr(info, "dataset")
    assert len(info.sparsity) == len(info.sparsity.positions) == positions
    assert info.sparsity.help == SPARSITY_HELP.get(
        name, f"stem, stage-1 and stage-2 stream rates, one inner rate per block ({positions - 3})"
    )
    assert all(isinstance(g, tuple) for g in info.sparsity.positions)
    assert (None if info.reference_points is None else len(info.reference_points)) == points
    if name in CIFAR_RESNETS:  # the stem writes the stage-1 stream: position 0 follows position 1
        (note,) = info.sparsity.ignored
        assert (note.position, note.follows) == (0, 1)
        assert info.sparsity.positions[0] == ()
        assert note.message([0.5, 0.15]) == (
            "stem rate 0.5 ignored: the stem writes the stage-1 residual stream, a coupled group "
            "that takes the stage-1 rate 0.15"
        )
        assert note.message([0.0, 0.15]) is None and note.message([0.15, 0.15]) is None
    else:
        assert info.sparsity.ignored == ()


def test_resnet50_lives_in_its_own_module():
    from chip.models import resnet50 as module

    assert M.get_model_info("resnet50").builder is module.resnet50
    assert module.resnet50.__module__ == "chip.models.resnet50"


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"positions": []}, ValueError),
        ({"positions": [["conv1"], [""]]}, ValueError),
        ({"positions": [["conv1"]], "ignored": (M.IgnoredRate(0, 1, "x"),)}, ValueError),
    ],
)
def test_sparsity_layout_rejects(kwargs, error):
    with pytest.raises(error):
        M.SparsityLayout(**kwargs)


def test_sparsity_layout_normalises(monkeypatch):
    layout = M.SparsityLayout(positions=lambda: [["a", "b"], [], ["c"]])
    assert layout.positions == (("a", "b"), (), ("c",))
    assert layout.help == "3 positions" and layout.ignored == ()
    from chip.models import registry

    monkeypatch.setattr(registry, "_MODEL_TABLE", dict(registry._MODEL_TABLE))
    with pytest.raises(TypeError):
        M.register_model("fake_bad", sparsity=[["a"]])(lambda **kw: None)
    with pytest.raises(ValueError):
        M.register_model("fake_bad", reference_points=["ok", ""])(lambda **kw: None)
    M.register_model("fake_ok", input_size=[1, 8, 8], reference_points=lambda: ["x"])(
        lambda **kw: None
    )
    info = M.get_model_info("fake_ok")
    assert info.input_size == (1, 8, 8) and info.reference_points == ("x",)
    assert info.sparsity is None and info.num_classes == 10


def test_trust_code(tmp_path):
    """A checkpoint holding non-tensor objects loads only when trusted."""
    import argparse

    source = M.create("resnet20")
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ChipError):
        M.create("resnet20", checkpoint=path)
    model = M.create("resnet20", checkpoint=path, trust_code=True)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


# ----------------------------------------------------------------------------- zoo-wide
@pytest.mark.parametrize("name", ZOO)
def test_forward_shape(name):
    model = M.create(name).eval()
    default_classes = 1000 if name == "resnet50" else 10
    assert model.chip_arch == name
    assert model.chip_kwargs == {"num_classes": default_classes, "in_channels": 3}
    with torch.no_grad():
        out = model(_input(name, batch=1))
    assert out.shape == (1, default_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_in_channels_and_rebuild(name):
    model = M.create(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(_input(name, channels=1)).shape == (2, 7)
    assert model.chip_kwargs == {"num_classes": 7, "in_channels": 1}
    twin = M.create(model.chip_arch, **model.chip_kwargs)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_param_count(name):
    n = _n_params(M.create(name))
    if name in CIFAR_RESNETS:
        assert n == _resnet_cifar_params(CIFAR_RESNETS[name])
        assert _n_params(M.create(name, num_classes=100, in_channels=1)) == _resnet_cifar_params(
            CIFAR_RESNETS[name], 100, 1
        )
    elif name == "vgg16_bn":
        assert n == _vgg_params(VGG16_CFG)
    else:
        assert n == 25_557_032  # torchvision ResNet-50 (docs/method.md section 4)


def test_param_count_published():
    """Numbers of docs/method.md section 4 and the hand count of ResNet-110 / VGG-16-BN (option A, 10 classes)."""
    assert _resnet_cifar_params(56) == 853_018
    assert _n_params(M.create("resnet56")) == 853_018
    assert _n_params(M.create("resnet110")) == 1_727_962
    assert _n_params(M.create("vgg16_bn")) == 14_991_946


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys(name):
    keys = set(M.create(name).state_dict())
    assert not any("shortcut" in k for k in keys)
    if name in CIFAR_RESNETS:
        head = "linear" if name == "resnet110" else "fc"
        assert keys == _resnet_cifar_keys(CIFAR_RESNETS[name], head)
    elif name == "vgg16_bn":
        assert keys == _vgg_keys(VGG16_CFG)
    else:
        assert keys == set(torchvision.models.resnet50().state_dict())


def test_reference_key_examples():
    r56 = M.create("resnet56").state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer3.8.bn2.running_mean", "fc.weight"):
        assert key in r56
    assert "linear.weight" in M.create("resnet110").state_dict()
    vgg = M.create("vgg16_bn").state_dict()
    for key in ("features.conv0.weight", "features.norm14.weight", "classifier.linear1.weight"):
        assert key in vgg
    assert VGG_CFGS["vgg16"] == VGG16_CFG


# ----------------------------------------------------------------------------- functional oracles
def _bn(x, sd, prefix):
    return F.batch_norm(
        x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training=False, eps=1e-5,
    )  # fmt: skip


def _randomize_bn(model):
    """Non-trivial BN statistics so that eval-mode oracles test them."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _resnet_oracle(sd, depth, head, x):
    """The reference's forward, with the reference's F.pad lambda shortcut."""
    n = (depth - 2) // 6
    out = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"))
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            h = F.relu(
                _bn(
                    F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"
                )
            )
            h = _bn(F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            if stride == 2:
                planes = h.shape[1]
                short = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                short = out
            out = F.relu(h + short)
    out = out.mean(dim=(2, 3))
    return F.linear(out, sd[f"{head}.weight"], sd[f"{head}.bias"])


@pytest.mark.parametrize("name,head", [("resnet20", "fc"), ("resnet110", "linear")])
def test_resnet_matches_functional_oracle(name, head):
    model = _randomize_bn(M.create(name))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expect = _resnet_oracle(model.state_dict(), CIFAR_RESNETS[name], head, x)
        torch.testing.assert_close(model(x), expect, rtol=1e-4, atol=1e-5)


def test_vgg_matches_functional_oracle():
    model = _randomize_bn(M.create("vgg16_bn"))
    sd = model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = x
        for i, item in enumerate(VGG16_CFG):
            if item == "M":
                out = F.max_pool2d(out, 2, 2)
            else:
                conv = F.conv2d(
                    out, sd[f"features.conv{i}.weight"], sd[f"features.conv{i}.bias"], padding=1
                )
                out = F.relu(_bn(conv, sd, f"features.norm{i}"))
        out = F.avg_pool2d(out, 2).flatten(1)
        out = F.linear(out, sd["classifier.linear1.weight"], sd["classifier.linear1.bias"])
        out = F.relu(_bn(out, sd, "classifier.norm1"))
        out = F.linear(out, sd["classifier.linear2.weight"], sd["classifier.linear2.bias"])
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- PadShortcut
@pytest.mark.parametrize(
    "cin,cout,stride", [(16, 32, 2), (32, 64, 2), (3, 8, 2), (4, 4, 1), (5, 8, 1)]
)
def test_pad_shortcut_matches_fpad(cin, cout, stride):
    sc = PadShortcut(cin, cout, stride)
    x = torch.randn(2, cin, 9, 10)
    extra = cout - cin
    expect = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, extra // 2, extra - extra // 2))
    assert torch.equal(sc(x), expect)
    assert (sc.in_channels, sc.out_channels) == (cin, cout)


def test_pad_shortcut_buffers_not_persistent():
    sc = PadShortcut(16, 32)
    assert dict(sc.state_dict()) == {}
    assert {name for name, _ in sc.named_buffers()} == {"src", "dst"}
    assert sc.src.dtype == sc.dst.dtype == torch.long
    assert sc.dst.tolist() == list(range(8, 24))


def _pruned_like(sc: PadShortcut, src, dst, out_channels=None) -> PadShortcut:
    sc.src = torch.tensor(src)
    sc.dst = torch.tensor(dst)
    sc.in_channels = len(src)
    if out_channels is not None:
        sc.out_channels = out_channels
    return sc


def test_pad_shortcut_custom_indices_against_loop():
    sc = _pruned_like(PadShortcut(4, 6), [0, 2], [1, 3], out_channels=5)
    x = torch.randn(3, 4, 8, 8)
    expect = torch.zeros(3, 5, 4, 4)
    for s, d in zip([0, 2], [1, 3], strict=True):
        expect[:, d] = x[:, s, ::2, ::2]
    assert torch.equal(sc(x), expect)


def _tiny_resnet() -> CifarResNet:
    """ResNet-8 (one block per stage) whose stage-2 shortcut copies only 2 channels."""
    model = _randomize_bn(CifarResNet(8, num_classes=10))
    _pruned_like(model.layer2[0].shortcut, [0, 2], [1, 3])
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # deprecated, still supported
def test_jit_script_and_trace():
    model = _tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(scripted(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
        other = torch.randn(1, 3, 16, 16)  # the trace must not bake in the batch/spatial size
        torch.testing.assert_close(traced(other), model(other), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy (TorchScript) exporter
def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    model = _tiny_resnet()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    assert path.stat().st_size > 0
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    reference = pytest.importorskip("onnx.reference", reason="onnx.reference is unavailable")
    got = reference.ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_channels_last():
    model = _tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    sc = model.layer2[0].shortcut
    y = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(sc(y), sc(y.contiguous()), rtol=0, atol=0)


def test_autocast():
    model = _tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
            half = model.layer2[0].shortcut(torch.randn(2, 16, 8, 8, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.1, atol=0.1)


def test_backward_through_inplace_relus():
    model = CifarResNet(8).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())
