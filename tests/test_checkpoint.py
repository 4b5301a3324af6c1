"""Weight loading: layouts, prefixes, safe unpickling and one-line mismatch errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import chip.models as M
from chip.checkpoint import (
    check_state_dict,
    extract_state_dict,
    load_state_dict_file,
    load_torch_file,
    load_weights,
)
from chip.errors import ChipError


class NotATensor:
    """A picklable object that ``weights_only=True`` must refuse."""


def _prefixed(sd, prefix="module."):
    return {prefix + k: v for k, v in sd.items()}


LAYOUTS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "module_raw": lambda sd: _prefixed(sd),
    "module_state_dict": lambda sd: {"state_dict": _prefixed(sd), "best_prec1": torch.tensor(93.0)},
    "model": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
    "net": lambda sd: {"net": _prefixed(sd), "acc": 93.2, "epoch": 299},
    "compiled_ddp": lambda sd: _prefixed(_prefixed(sd, "_orig_mod."), "module."),
}


@pytest.fixture(scope="module")
def trained():
    """A resnet20 with non-default weights and BN statistics, its input and its output."""
    torch.manual_seed(1)
    model = M.create("resnet20")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3, 32, 32))  # moves BN running stats away from the init
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def _fresh_output(trained, source, **kwargs):
    _, x, _ = trained
    torch.manual_seed(123)  # different init than ``trained``
    model = M.create("resnet20")
    load_weights(model, source, **kwargs)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_file(tmp_path, trained, layout):
    model, _, y = trained
    path = tmp_path / f"{layout}.pt"
    torch.save(LAYOUTS[layout](model.state_dict()), path)
    assert torch.equal(_fresh_output(trained, path), y)
    assert torch.equal(_fresh_output(trained, str(path)), y)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_in_memory(trained, layout):
    model, _, y = trained
    assert torch.equal(_fresh_output(trained, LAYOUTS[layout](model.state_dict())), y)


def test_round_trip_via_create(tmp_path, trained):
    model, x, y = trained
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": _prefixed(model.state_dict())}, path)
    loaded = M.create("resnet20", checkpoint=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_safetensors(tmp_path, trained):
    model, _, y = trained
    path = tmp_path / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert torch.equal(_fresh_output(trained, path), y)


def test_load_state_dict_file_normalises(tmp_path, trained):
    model, _, _ = trained
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": _prefixed(model.state_dict())}, path)
    state = load_state_dict_file(path)
    assert list(state) == list(model.state_dict())
    assert all(v.device.type == "cpu" for v in state.values())


def test_prefix_only_stripped_when_on_every_key():
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert set(extract_state_dict(sd)) == {"module.a", "b"}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ChipError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_and_unexpected_keys(trained):
    model, _, _ = trained
    sd = dict(model.state_dict())
    del sd["layer2.1.conv1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    msg = _error(load_weights, M.create("resnet20"), sd)
    assert "layer2.1.conv1.weight" in msg and "extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg


def test_shape_mismatch_lists_both_shapes(trained):
    model, _, _ = trained
    msg = _error(load_weights, M.create("resnet20", num_classes=100), model.state_dict())
    assert "fc.weight" in msg and "(10, 64)" in msg and "(100, 64)" in msg


def test_shape_mismatch_fails_even_when_not_strict(trained):
    model, _, _ = trained
    target = M.create("resnet20", num_classes=100)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    _error(load_weights, target, model.state_dict(), strict=False)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_wrong_architecture_lists_first_keys_only(trained):
    model, _, _ = trained
    msg = _error(load_weights, M.create("resnet32"), model.state_dict())
    assert "missing 72" in msg and "more" in msg and "resnet32" in msg
    assert len(msg) < 400


def test_non_strict_reports_missing(trained):
    model, x, y = trained
    sd = dict(model.state_dict())
    dropped = sd.pop("fc.bias")
    target = M.create("resnet20")
    result = load_weights(target, sd, strict=False)
    assert list(result.missing_keys) == ["fc.bias"] and not result.unexpected_keys
    with torch.no_grad():
        target.fc.bias.copy_(dropped)
        assert torch.equal(target.eval()(x), y)


def test_non_tensor_pickle_refused_without_trust_code(tmp_path, trained):
    model, _, y = trained
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": model.state_dict(), "args": NotATensor()}, path)
    msg = _error(load_state_dict_file, path)
    assert "trust_code=True" in msg and "--trust-code" in msg and str(path) in msg
    _error(M.create, "resnet20", checkpoint=path)
    assert torch.equal(_fresh_output(trained, path, trust_code=True), y)


def test_whole_module_pickle_needs_trust_code(tmp_path, trained):
    model, _, y = trained
    path = tmp_path / "module.pt"
    torch.save({"model": model}, path)
    _error(load_state_dict_file, path)
    assert torch.equal(_fresh_output(trained, path, trust_code=True), y)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "resnet_56.pt"
    assert str(path) in _error(load_state_dict_file, path)
    assert str(tmp_path) in _error(load_weights, M.create("resnet20"), tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    assert str(path) in _error(load_state_dict_file, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01junk")
    assert str(bad) in _error(load_state_dict_file, bad)


@pytest.mark.parametrize(
    "obj", [[torch.zeros(1)], {}, {"state_dict": {"a": 1}}, {"a": torch.zeros(1), "b": "text"}]
)
def test_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    _error(load_state_dict_file, path)
    _error(extract_state_dict, obj)


# ------------------------------------------------------------------------------- trust_code


def test_trust_code_false_refuses_full_pickle_naming_trust_code(tmp_path, trained):
    model, _, y = trained
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": model.state_dict(), "args": NotATensor()}, path)
    for fn, args in ((load_torch_file, (path,)), (load_weights, (M.create("resnet20"), path))):
        msg = _error(fn, *args, trust_code=False)
        assert "trust_code=True" in msg and "--trust-code" in msg and "NotATensor" in msg
        assert str(path) in msg and "unsafe_pickle" not in msg
    assert torch.equal(_fresh_output(trained, path, trust_code=True), y)


# ----------------------------------------------------------------- the one state-dict check


def _broken(sd):
    """``sd`` with one key missing, one unexpected and one of another shape."""
    sd = dict(sd)
    del sd["layer2.1.conv1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["fc.weight"] = torch.zeros(7, 64)
    return sd


def test_check_state_dict_reports_each_kind(tmp_path, trained):
    model, _, _ = trained
    sd = _broken(model.state_dict())
    msg = _error(check_state_dict, M.create("resnet20"), sd)
    assert msg.startswith("checkpoint does not fit resnet20 (1 missing, 1 unexpected, 1 of another")
    assert "missing 1: 'layer2.1.conv1.weight'" in msg and "unexpected 1: 'extra.weight'" in msg
    assert "shape mismatch 1: 'fc.weight' (7, 64) vs model (10, 64)" in msg
    msg = _error(check_state_dict, M.create("resnet20"), sd, strict=False, hint="a hint")
    assert "(1 of another shape)" in msg and "missing" not in msg and msg.endswith("; a hint")
    check_state_dict(M.create("resnet20"), model.state_dict())  # fits: no error
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": sd}, path)
    msg = _error(load_weights, M.create("resnet20"), path)  # a plain checkpoint file
    assert msg.startswith(f"checkpoint {path} does not fit resnet20 (1 missing, 1 unexpected, 1 ")
    assert all(k in msg for k in ("'layer2.1.conv1.weight'", "'extra.weight'", "'fc.weight'"))
