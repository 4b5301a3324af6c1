"""chip.save / chip.load / load_info and the TorchScript / ONNX exports.

Oracles: the model that was saved (outputs compared with ``torch.equal`` after loading in a NEW
Python process), the original model with the removed channels zeroed
(:func:`chip.prune.masked_forward_hooks`), the plan itself for the metadata, and ONNX's own
reference evaluator for the ONNX export.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import chip
import chip.models as M
from chip.artifact import export_onnx, export_torchscript, load, load_info, load_plan, save
from chip.errors import ChipError
from chip.groups import find_groups
from chip.models import PadShortcut
from chip.planning import plan
from chip.prune import apply, masked_forward_hooks

# case -> (arch, create kwargs, target or None for unpruned)
CASES = {
    "resnet20_pruned": (
        "resnet20",
        {},
        "[0.]+[0.3]*2+[0.4]*9",
    ),  # stage-1/2 streams: option-A pruned
    "resnet20_uniform": ("resnet20", {"num_classes": 7}, 0.5),
    "vgg16_bn_pruned": ("vgg16_bn", {}, 0.4),
    "resnet20_unpruned": ("resnet20", {"num_classes": 5, "in_channels": 1}, None),
}
PRUNED_RESNET = "resnet20_pruned"


def _randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so every channel matters."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.3, 0.3, generator=gen)
    return model.eval()


def _build(case: str):
    """(original, pruned-or-original, plan, graph, input) for ``case``; random scores, seeded."""
    arch, kwargs, target = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    original = _randomize(M.create(arch, **kwargs), gen)
    x = torch.randn(2, kwargs.get("in_channels", 3), 32, 32, generator=gen)
    if target is None:
        return original, original, None, None, x
    graph = find_groups(original, torch.zeros(1, 3, 32, 32))
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in graph}
    p = plan(original, scores, target, graph=graph)
    return original, apply(original, p).eval(), p, graph, x


@pytest.fixture(scope="module")
def zoo():
    return {case: _build(case) for case in CASES}


@pytest.fixture(scope="module")
def saved(zoo, tmp_path_factory):
    """Every case saved once (with extra metadata) into one directory."""
    directory = tmp_path_factory.mktemp("artifacts")
    for case, (_, model, *_rest) in zoo.items():
        save(model, directory / f"{case}.safetensors", extra={"case": case, "top1": 0.5})
    save_file({case: item[-1] for case, item in zoo.items()}, directory / "inputs.safetensors")
    return directory


FRESH_PROCESS = textwrap.dedent("""
    import pickle, sys
    import torch
    from safetensors.torch import load_file, save_file
    import chip, chip.artifact

    def refuse(*args, **kwargs):
        raise AssertionError("chip.load must not unpickle anything")

    torch.load = torch.serialization.load = refuse
    pickle.load = pickle.loads = refuse
    torch.set_num_threads(1)
    directory, cases = sys.argv[1], sys.argv[2:]
    inputs = load_file(f"{directory}/inputs.safetensors")
    outputs = {}
    for case in cases:
        model = chip.load(f"{directory}/{case}.safetensors")
        assert not model.training
        with torch.no_grad():
            outputs[case] = model(inputs[case])
        for name, buf in model.named_buffers():
            if name.endswith(("shortcut.src", "shortcut.dst")):
                outputs[f"{case}/{name}"] = buf
    save_file(outputs, f"{directory}/outputs.safetensors")
""")


@pytest.fixture(scope="module")
def fresh_outputs(saved):
    """Load every artifact in ONE new Python process (torch.load / pickle disabled there)."""
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved), *CASES],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(saved / "outputs.safetensors")


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fresh_process_roundtrip(case, zoo, fresh_outputs):
    _, model, *_, x = zoo[case]
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(fresh_outputs[case], expected)


@pytest.mark.slow
def test_fresh_process_rebuilds_pad_shortcuts(zoo, fresh_outputs):
    """The non-persistent src/dst buffers come back from the plan, not from the file."""
    model = zoo[PRUNED_RESNET][1]
    shortcuts = {n: m for n, m in model.named_modules() if isinstance(m, PadShortcut)}
    assert len(shortcuts) == 2
    for name, sc in shortcuts.items():
        assert torch.equal(fresh_outputs[f"{PRUNED_RESNET}/{name}.src"], sc.src)
        assert torch.equal(fresh_outputs[f"{PRUNED_RESNET}/{name}.dst"], sc.dst)
    # the test means something only if pruning moved the shortcut away from the default layout
    first = shortcuts["layer2.0.shortcut"]
    assert not torch.equal(first.src, torch.arange(first.src.numel()))


@pytest.mark.parametrize("case", [c for c, (_, _, t) in CASES.items() if t is not None])
def test_loaded_equals_masked_original(case, zoo, saved):
    """Independent oracle: the original model with the removed channels zeroed."""
    original, _, p, graph, x = zoo[case]
    loaded = load(saved / f"{case}.safetensors")
    handles = masked_forward_hooks(original, p, graph)
    try:
        with torch.no_grad():
            expected = original(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    assert loaded.chip_plan.to_dict() == p.to_dict()


def test_resave_is_byte_identical(saved, tmp_path):
    path = saved / f"{PRUNED_RESNET}.safetensors"
    again = save(
        load(path), tmp_path / "again.safetensors", extra={"case": PRUNED_RESNET, "top1": 0.5}
    )
    assert again.read_bytes() == path.read_bytes()


def test_dtype_and_kwargs_preserved(tmp_path):
    model = _randomize(
        M.create("resnet20", num_classes=3), torch.Generator().manual_seed(1)
    ).double()
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert loaded.chip_arch == "resnet20" and loaded.chip_kwargs == {
        "num_classes": 3,
        "in_channels": 3,
    }
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_pruned_twice_round_trips(tmp_path):
    model = _randomize(M.create("resnet20"), torch.Generator().manual_seed(2)).eval()
    once = apply(model, plan(model, None, 0.25))
    twice = apply(once, plan(once, None, 0.5))
    assert [p.to_dict() for p in twice.chip_earlier_plans] == [once.chip_plan.to_dict()]
    path = save(twice, tmp_path / "twice.safetensors")
    loaded = load(path)
    assert loaded.conv1.out_channels == twice.conv1.out_channels == 6
    assert loaded.chip_plan.to_dict() == twice.chip_plan.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), twice(x))
    assert save(loaded, tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


# -------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("case", list(CASES))
def test_load_info(case, zoo, saved):
    arch, kwargs, target = CASES[case]
    _, model, p, *_ = zoo[case]
    path = saved / f"{case}.safetensors"
    info = load_info(path)
    assert info["format"] == "chip.artifact" and info["format_version"] == 1
    assert info["arch"] == arch and info["kwargs"] == model.chip_kwargs
    assert info["builder"] is None
    assert info["chip_version"] == chip.__version__
    assert info["torch_version"] == str(torch.__version__)
    assert info["extra"] == {"case": case, "top1": 0.5}
    assert info["tensors"] == len(model.state_dict())
    assert info["bytes"] == path.stat().st_size
    assert info["pruned"] is (target is not None)
    if p is None:
        assert info["plan"] is None and load_plan(path) is None
        return
    widths = {name: [g.kept, g.channels] for name, g in p.groups.items()}
    assert info["plan"]["widths"] == widths
    assert info["plan"]["pruned_groups"] == sum(k < c for k, c in widths.values()) > 0
    assert info["plan"]["target"] == str(target)
    assert load_plan(path).to_dict() == p.to_dict()


def test_load_info_reads_no_tensors(saved, monkeypatch):
    monkeypatch.setattr("safetensors.torch.load_file", _refuse)
    monkeypatch.setattr("safetensors.safe_open", _refuse)
    assert load_info(saved / f"{PRUNED_RESNET}.safetensors")["arch"] == "resnet20"


@pytest.mark.parametrize("extra", [{"bad": {1, 2}}, {"nan": float("nan")}, ["not", "a", "dict"]])
def test_extra_must_be_json(extra, tmp_path):
    with pytest.raises(ChipError, match="JSON"):
        save(M.create("resnet20"), tmp_path / "m.safetensors", extra=extra)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- no pickle, atomic
def _refuse(*args, **kwargs):
    raise AssertionError("must not be called")


def test_file_is_safetensors_not_pickle(saved, monkeypatch):
    path = saved / f"{PRUNED_RESNET}.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert not zipfile.is_zipfile(path)  # torch.save's format
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["chip.artifact"])
    assert header["format"] == "chip.artifact" and header["format_version"] == 1
    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    assert isinstance(load(path), nn.Module)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    model = M.create("resnet20")
    path = save(model, tmp_path / "m.safetensors", extra={"version": 1})
    before = path.read_bytes()

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # fails after the bytes were written to the temp file
    with pytest.raises(OSError, match="disk full"):
        save(model, path, extra={"version": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    monkeypatch.undo()
    assert load_info(path)["extra"] == {"version": 1}


# ---------------------------------------------------------------------------------------- errors
def _rewrite(src, dst, edit=None, tensors=None) -> str:
    """Copy an artifact, editing its chip header dict with ``edit`` (a tampered file)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["chip.artifact"])
    if edit is not None:
        edit(header)
    meta["chip.artifact"] = json.dumps(header)
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=meta)
    return str(dst)


def _drop_one_inner_channel(h):
    group = h["plan"]["groups"]["layer1.0.conv1"]
    group["keep"] = group["keep"][:-1]


def _shift_stream_keep(h):
    """Same widths, other channels: only the rebuilt shortcut index buffers can notice."""
    group = h["plan"]["groups"]["conv1"]
    kept = set(group["keep"])
    group["keep"] = sorted(kept ^ {min(kept), min(set(range(group["channels"])) - kept)})


TAMPERED = {
    "plan_width": (_drop_one_inner_channel, "do not match the rebuilt model"),
    "plan_indices": (_shift_stream_keep, "buffer 'layer2.0.shortcut"),
    "plan_garbage": (lambda h: h.update(plan={"format": "nope"}), "not a chip pruning plan"),
    "plan_channels": (
        lambda h: h["plan"]["groups"]["conv1"].update(channels=17),
        "cannot re-apply the stored plan: group 'conv1' has 16 channels",
    ),
    "other_arch": (lambda h: h.update(arch="resnet32"), "another architecture"),
    "unknown_arch": (lambda h: h.update(arch="resnet999"), "unknown model 'resnet999'"),
    "bad_kwargs": (lambda h: h["kwargs"].update(depth=3), "takes num_classes and in_channels only"),
}


@pytest.mark.parametrize("kind", list(TAMPERED))
def test_tampered_header(kind, saved, tmp_path):
    edit, message = TAMPERED[kind]
    path = _rewrite(saved / f"{PRUNED_RESNET}.safetensors", tmp_path / "t.safetensors", edit)
    with pytest.raises(ChipError, match=message) as err:
        load(path)
    assert "\n" not in str(err.value)


def test_unpruned_weights_with_state_mismatch(saved, tmp_path):
    src = saved / "resnet20_unpruned.safetensors"
    tensors = load_file(str(src))
    tensors.pop("fc.bias")
    with pytest.raises(ChipError, match=r"1 missing.*'fc.bias'"):
        load(_rewrite(src, tmp_path / "t.safetensors", tensors=tensors))


def _plain_safetensors(path):
    save_file({"w": torch.zeros(2)}, str(path))


def _torch_pickle(path):
    torch.save({"w": torch.zeros(2)}, path)


def _truncated(path, source):
    path.write_bytes(source.read_bytes()[:-100])


def _newer(path, source):
    _rewrite(source, path, lambda h: h.update(format_version=9))


def _other_format(path, source):
    _rewrite(source, path, lambda h: h.update(format="someone.else"))


BAD_FILES = {
    "missing": (lambda p, s: None, "artifact not found"),
    "empty": (lambda p, s: p.write_bytes(b""), "not a chip artifact"),
    "garbage": (lambda p, s: p.write_bytes(os.urandom(4096)), "not a chip artifact"),
    "json_garbage": (
        lambda p, s: p.write_bytes((8).to_bytes(8, "little") + b"[1, 2 ]x"),
        "not a chip artifact",
    ),
    "torch_pickle": (lambda p, s: _torch_pickle(p), "not a chip artifact"),
    "plain_safetensors": (lambda p, s: _plain_safetensors(p), "no chip metadata"),
    "truncated": (_truncated, "truncated or corrupt"),
    "newer_format": (_newer, "version 9, newer"),
    "other_format": (_other_format, "unknown format 'someone.else'"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files(kind, saved, tmp_path):
    make, message = BAD_FILES[kind]
    path = tmp_path / "bad.safetensors"
    make(path, saved / "resnet20_unpruned.safetensors")
    for reader in (load, load_info):
        with pytest.raises(ChipError, match=message) as err:
            reader(path)
        assert "\n" not in str(err.value)


def test_bad_map_location(saved):
    path = saved / "resnet20_unpruned.safetensors"
    with pytest.raises(ChipError, match="map_location"):
        load(path, map_location="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ChipError, match="CUDA is not available"):
            load(path, map_location="cuda")


# ----------------------------------------------------------------------- models outside the zoo
BUILDER_SOURCE = textwrap.dedent("""
    import torch.nn as nn

    def build(width=8, num_classes=4):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    not_callable = 3
""")


@pytest.fixture
def builder_module(tmp_path, monkeypatch):
    name = "chip_test_tinynet"
    (tmp_path / f"{name}.py").write_text(BUILDER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_non_zoo_model_needs_code(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ChipError, match="chip.models.create.*builder=.*export_torchscript"):
        save(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_builder_roundtrip(builder_module, tmp_path):
    import importlib

    module = importlib.import_module(builder_module)
    original = _randomize(module.build(width=8, num_classes=4), torch.Generator().manual_seed(2))
    p = plan(original, None, 0.5, input_size=(1, 3, 8, 8))
    pruned = apply(original, p).eval()
    path = save(
        pruned,
        tmp_path / "m.safetensors",
        builder=f"{builder_module}:build",
        builder_kwargs={"width": 8, "num_classes": 4},
    )
    assert load_info(path)["builder"] == f"{builder_module}:build"
    with pytest.raises(ChipError, match="trust_code=True"):
        load(path)
    loaded = load(path, trust_code=True)
    assert loaded[0].out_channels == 4
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_state_dict_metadata_roundtrip_mnasnet(pruned, tmp_path):
    """torchvision's MNASNet refuses a state dict without its ``version`` metadata."""
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(3)
    model = _randomize(torchvision.models.mnasnet0_5(weights=None, num_classes=10), gen)
    if pruned:
        model = apply(model, plan(model, None, 0.3, input_size=(1, 3, 64, 64))).eval()
    path = save(
        model,
        tmp_path / "m.safetensors",
        builder="torchvision.models:mnasnet0_5",
        builder_kwargs={"num_classes": 10},
    )
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["chip.artifact"])
    assert header["state_dict_metadata"] == {
        k: dict(v) for k, v in model.state_dict()._metadata.items()
    }
    assert header["state_dict_metadata"][""] == {"version": 2}
    loaded = load(path, trust_code=True)
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_header_without_state_dict_metadata_still_loads(saved, tmp_path):
    """Files written before ``state_dict_metadata`` existed load as before."""
    src = saved / f"{PRUNED_RESNET}.safetensors"
    path = _rewrite(src, tmp_path / "old.safetensors", lambda h: h.pop("state_dict_metadata"))
    with safe_open(path, "pt") as f:
        assert "state_dict_metadata" not in json.loads(f.metadata()["chip.artifact"])
    old, new = load(path), load(src)
    x = load_file(str(saved / "inputs.safetensors"))[PRUNED_RESNET]
    with torch.no_grad():
        assert torch.equal(old(x), new(x))
    assert load_info(path)["arch"] == "resnet20"


@pytest.mark.parametrize(
    "metadata",
    [
        [["", {"version": 1}]],
        "version 1",
        3,
        {"": 2},
        {"layer1": [1, 2]},
        {"": None},
    ],
    ids=["list", "string", "number", "entry_number", "entry_list", "entry_null"],
)
def test_malformed_state_dict_metadata(metadata, saved, tmp_path):
    path = _rewrite(
        saved / f"{PRUNED_RESNET}.safetensors",
        tmp_path / "t.safetensors",
        lambda h: h.update(state_dict_metadata=metadata),
    )
    with pytest.raises(ChipError, match="state_dict_metadata is malformed") as err:
        load(path)
    message = str(err.value)
    assert path in message and "dict of module prefix -> dict" in message and "\n" not in message


def test_unserialisable_state_dict_metadata_is_refused_on_save(tmp_path):
    model = M.create("resnet20")
    model.fc._version = {1, 2}  # state_dict() stores it as _metadata["fc"]["version"]
    with pytest.raises(ChipError, match="state_dict metadata is not JSON-serialisable"):
        save(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "builder, message",
    [
        ("no_colon", "expected 'package.module:function'"),
        ("a.b:c d", "expected 'package.module:function'"),
        ("chip_no_such_module_xyz:build", "cannot import"),
        ("{module}:missing", "has no 'missing'"),
        ("{module}:not_callable", "not callable"),
    ],
)
def test_bad_builder(builder, message, builder_module, tmp_path):
    with pytest.raises(ChipError, match=message):
        save(
            nn.Linear(2, 2),
            tmp_path / "m.safetensors",
            builder=builder.format(module=builder_module),
        )


# ---------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize("method", ["auto", "trace"])  # auto = script, as the zoo scripts
def test_export_torchscript(method, zoo, tmp_path):
    _, model, *_, x = zoo[PRUNED_RESNET]
    model.train()
    path = export_torchscript(model, tmp_path / "m.pt", x, method=method)
    assert model.training  # mode restored
    model.eval()
    scripted = torch.jit.load(str(path))
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))
        assert torch.equal(scripted(other), model(other))


def test_export_torchscript_bad_method(zoo, tmp_path):
    with pytest.raises(ChipError, match="unknown TorchScript method"):
        export_torchscript(
            zoo[PRUNED_RESNET][1], tmp_path / "m.pt", zoo[PRUNED_RESNET][-1], method="x"
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_onnx(zoo, tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
    reference = pytest.importorskip("onnx.reference", reason="onnx.reference is unavailable")
    _, model, *_, x = zoo[PRUNED_RESNET]
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["input"]
    evaluator = reference.ReferenceEvaluator(graph)
    other = torch.randn(3, 3, 32, 32)  # dynamic batch axis
    for inputs in (x, other):
        got = evaluator.run(None, {"input": inputs.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(inputs), rtol=1e-4, atol=1e-5)


def test_export_onnx_without_onnx(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ChipError, match="pip install onnx"):
        export_onnx(zoo[PRUNED_RESNET][1], tmp_path / "m.onnx", zoo[PRUNED_RESNET][-1])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------- trust_code, the shared state check


def test_untrusted_builder_is_refused_naming_trust_code(builder_module, tmp_path):
    import importlib

    model = importlib.import_module(builder_module).build(width=8, num_classes=4).eval()
    path = save(
        model,
        tmp_path / "m.safetensors",
        builder=f"{builder_module}:build",
        builder_kwargs={"width": 8, "num_classes": 4},
    )
    for flags in ({}, {"trust_code": False}):
        with pytest.raises(ChipError, match=r"trust_code=True \(CLI: --trust-code\)"):
            load(path, **flags)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load(path, trust_code=True)(x), model(x))


def test_state_mismatch_reports_each_kind(saved, tmp_path):
    """The artifact check is chip.checkpoint.check_state_dict: every kind, with key names."""
    src = saved / "resnet20_unpruned.safetensors"
    tensors = load_file(str(src))
    tensors.pop("layer2.1.conv1.weight")
    tensors["extra.weight"] = torch.zeros(3)
    tensors["fc.weight"] = torch.zeros(7, 64)
    path = _rewrite(src, tmp_path / "t.safetensors", tensors=tensors)
    with pytest.raises(ChipError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(
        f"{path}: stored weights do not match the rebuilt model resnet20 "
        "(1 missing, 1 unexpected, 1 of another shape): "
    )
    assert "missing 1: 'layer2.1.conv1.weight'" in msg and "unexpected 1: 'extra.weight'" in msg
    assert "shape mismatch 1: 'fc.weight' (7, 64) vs model (5, 64)" in msg
    assert msg.endswith("the plan or architecture in the header does not belong to these weights")
    assert "\n" not in msg


def test_artifact_imports_no_private_names():
    import ast

    import chip.artifact

    tree = ast.parse(open(chip.artifact.__file__).read())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not private
