"""Tests of chip.count (params / conv+linear MACs) and chip.latency (behaviour, never timings)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torchvision
from torch import nn

import chip
from chip.counting import CONVENTION, Counts, LayerCount, count, format_count, reduction
from chip.errors import ChipError
from chip.latency import LatencyResult, measure_latency

# --------------------------------------------------------------------------- tiny hand-built models


class Tiny(nn.Module):
    """Grouped conv, depthwise conv, a 1x1 conv called twice, a linear on rows, a linear on a
    flattened map; BatchNorm and Dropout so that train/eval mode matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # 4x8x8 -> 8x8x8
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # -> 8x4x4
        self.shared = nn.Conv2d(8, 8, 1)  # called twice
        self.rows = nn.Linear(8, 6)  # on (16 rows, 8 features)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 6, 5)  # on the flattened map

    def forward(self, x):
        x = self.dw(self.bn(self.conv(x)).relu())
        x = self.shared(self.shared(x))
        x = self.rows(x.flatten(2).transpose(1, 2))  # (N, 16, 8) -> (N, 16, 6)
        return self.fc(self.drop(x.flatten(1)))


# (name, macs) in execution order, by hand from the shapes for a 1x4x8x8 input:
#   conv out elements * (in_channels / groups) * kernel, linear in * out * rows
TINY_EXPECTED = [
    ("conv", (8 * 8 * 8) * (4 // 2) * (3 * 3)),
    ("dw", (8 * 4 * 4) * (8 // 8) * (3 * 3)),
    ("shared", (8 * 4 * 4) * 8 * 1),
    ("shared", (8 * 4 * 4) * 8 * 1),
    ("rows", 8 * 6 * 16),
    ("fc", (16 * 6) * 5 * 1),
]


def conv1d_model():
    return nn.Sequential(nn.Conv1d(3, 6, 5, stride=2, groups=3), nn.ReLU(), nn.Conv1d(6, 4, 1))


def conv3d_model():
    return nn.Sequential(
        nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), nn.Flatten(), nn.Linear(4 * 3 * 5 * 5, 7)
    )


# name -> (builder, input_size, [(layer name, macs by hand)])
HAND_CASES = {
    "tiny": (Tiny, (1, 4, 8, 8), TINY_EXPECTED),
    # L=20, k=5, stride 2 -> L_out = (20 - 5) // 2 + 1 = 8
    "conv1d": (conv1d_model, (1, 3, 20), [("0", 6 * 8 * (3 // 3) * 5), ("2", 4 * 8 * 6 * 1)]),
    "conv3d": (
        conv3d_model,
        (1, 2, 3, 5, 5),
        [("0", 4 * 3 * 5 * 5 * 2 * (1 * 3 * 3)), ("2", 4 * 3 * 5 * 5 * 7)],
    ),
}


def all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# ------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(
    "build, input_size, params, macs",
    [
        pytest.param(
            lambda: chip.models.create("resnet56"),
            (1, 3, 32, 32),
            853_018,
            125_485_696,
            id="resnet56",
        ),
        pytest.param(
            lambda: torchvision.models.resnet50(num_classes=1000),
            (1, 3, 224, 224),
            25_557_032,
            4_089_184_256,
            id="resnet50",
        ),
    ],
)
def test_paper_baselines(build, input_size, params, macs):
    counts = count(build(), input_size)
    assert (counts.params, counts.macs) == (params, macs)
    assert counts.convention == CONVENTION
    assert counts.input_size == input_size


# ------------------------------------------------------------------------------- hand-built oracle


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_macs_match_hand_computation(case):
    build, input_size, expected = HAND_CASES[case]
    model = build()
    counts = count(model, input_size)
    assert [(layer.name, layer.macs) for layer in counts.layers] == expected
    assert counts.macs == sum(m for _, m in expected)
    assert counts.params == sum(p.numel() for p in model.parameters())


def test_layer_records_shapes_and_own_params():
    model = Tiny()
    layers = count(model, (1, 4, 8, 8)).layers
    by_name = {layer.name: layer for layer in layers}
    assert by_name["conv"] == LayerCount(
        "conv", "Conv2d", 8 * 2 * 9 + 8, 8 * 8 * 8 * 2 * 9, (1, 4, 8, 8), (1, 8, 8, 8)
    )
    assert by_name["rows"].in_shape == (1, 16, 8) and by_name["rows"].out_shape == (1, 16, 6)
    assert [layer.params for layer in layers if layer.name == "shared"] == [8 * 8 + 8] * 2


@pytest.mark.parametrize("batch", [2, 5])
def test_batch_dim_is_ignored(batch):
    model = Tiny()
    one = count(model, (1, 4, 8, 8))
    many = count(model, (batch, 4, 8, 8))
    assert many.macs == one.macs and many.params == one.params
    assert many.input_size == (batch, 4, 8, 8)


def test_tied_parameters_counted_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    counts = count(model, (1, 4))
    assert counts.params == 16
    assert counts.macs == 2 * 16


# ---------------------------------------------------------------------------- transposed convs


def upsampler():
    """Conv2d 3->8 (4x4), ConvTranspose2d 8->4 k2 s2 (4x4 -> 8x8), Conv2d 4->2 1x1 (8x8)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 2, 1)
    )


def test_transposed_conv_is_counted():
    counts = count(upsampler(), (1, 3, 4, 4))
    # 8*4*4 outputs * 3*3*3 + 8*4*4 inputs * 4*2*2 + 2*8*8 outputs * 4
    assert [(layer.name, layer.macs) for layer in counts.layers] == [
        ("0", 3_456),
        ("1", 2_048),
        ("2", 512),
    ]
    assert counts.macs == 6_016


def test_transposed_conv_layer_record():
    model = upsampler()
    layer = count(model, (1, 3, 4, 4)).layers[1]
    assert layer == LayerCount(
        "1", "ConvTranspose2d", 8 * 4 * 2 * 2 + 4, 2_048, (1, 8, 4, 4), (1, 4, 8, 8)
    )
    assert layer.params == sum(p.numel() for p in model[1].parameters())


def transposed_macs_by_definition(c_in, c_out, groups, kernel, in_spatial):
    """One MAC per (input channel, input position, output channel of its group, kernel offset):
    a transposed conv multiplies every input element by each weight that connects it to an
    output; enumerated literally, not from a closed form."""
    per_group_in, per_group_out = c_in // groups, c_out // groups
    macs = 0
    for ci in range(c_in):
        group = ci // per_group_in
        outs = range(group * per_group_out, (group + 1) * per_group_out)
        for _pos, _co, _offset in itertools.product(
            itertools.product(*map(range, in_spatial)),
            outs,
            itertools.product(*map(range, kernel)),
        ):
            macs += 1
    return macs


# id -> (layer, input_size, hand-written MACs: in_ch * positions * out_ch/groups * kernel volume)
TRANSPOSED_CASES = {
    "grouped2d": (
        lambda: nn.ConvTranspose2d(6, 9, (3, 2), stride=2, padding=1, output_padding=1, groups=3),
        (1, 6, 5, 7),
        6 * (5 * 7) * (9 // 3) * (3 * 2),
    ),
    "depthwise2d": (
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, bias=False),
        (1, 4, 3, 3),
        4 * (3 * 3) * 1 * (3 * 3),
    ),
    "1d": (lambda: nn.ConvTranspose1d(3, 5, 4, stride=3, dilation=2), (1, 3, 6), 3 * 6 * 5 * 4),
    "3d": (
        lambda: nn.ConvTranspose3d(2, 4, (2, 3, 1), stride=(1, 2, 2), groups=2),
        (1, 2, 2, 3, 4),
        2 * (2 * 3 * 4) * (4 // 2) * (2 * 3 * 1),
    ),
}


@pytest.mark.parametrize("case", sorted(TRANSPOSED_CASES))
def test_transposed_conv_macs_by_definition(case):
    build, input_size, expected = TRANSPOSED_CASES[case]
    layer = build()
    assert expected == transposed_macs_by_definition(
        layer.in_channels, layer.out_channels, layer.groups, layer.kernel_size, input_size[2:]
    )
    counts = count(nn.Sequential(layer), input_size)
    assert counts.macs == expected
    (record,) = counts.layers
    assert record.kind == type(layer).__name__
    assert record.in_shape == input_size
    assert record.out_shape == tuple(layer(torch.zeros(input_size)).shape)


# --------------------------------------------------------------------------- model left untouched


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": [name for name, _ in model.named_buffers()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "devices": {t.device for t in model.state_dict().values()},
        "grads": [p.grad for p in model.parameters()],
        "hooks": all_hooks(model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for field in ("buffers", "attrs", "training", "devices", "hooks"):
        assert before[field] == after[field], field
    assert all(g is None for g in after["grads"])


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_model_left_exactly_as_it_was(mode):
    model = Tiny()
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
    before = snapshot(model)
    count(model, (1, 4, 8, 8))
    assert_same(before, snapshot(model))  # BN running stats untouched even in train mode


def test_hooks_removed_and_mode_restored_when_forward_fails():
    model = Tiny().train()
    before = snapshot(model)
    with pytest.raises(ChipError, match="input_size"):
        count(model, (1, 3, 8, 8))  # wrong channel count: fails inside the forward
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "bad", [(), (1,), (1, 3, 0, 8), (1, 3, 8.0, 8), (True, 4, 8, 8), "1x4x8x8", None, 5]
)
def test_bad_input_size(bad):
    with pytest.raises(ChipError, match="input_size"):
        count(Tiny(), bad)


def test_explicit_device_keeps_model_where_it_was():
    model = Tiny()
    before = snapshot(model)
    assert count(model, (1, 4, 8, 8), device="cpu").macs == sum(m for _, m in TINY_EXPECTED)
    assert_same(before, snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_count_on_cuda_matches_cpu():
    model = Tiny()
    before = snapshot(model)
    assert count(model, (1, 4, 8, 8), device="cuda") == count(model, (1, 4, 8, 8))
    assert_same(before, snapshot(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
@pytest.mark.parametrize("measure", [count, measure_latency])
def test_unavailable_cuda_is_a_user_error(measure):
    with pytest.raises(ChipError, match="not available"):
        measure(Tiny(), (1, 4, 8, 8), device="cuda")


def test_to_dict_is_json_and_round_trips():
    counts = count(Tiny(), (2, 4, 8, 8))
    data = json.loads(json.dumps(counts.to_dict()))
    assert data["params"] == counts.params and data["macs"] == counts.macs
    assert data["input_size"] == [2, 4, 8, 8]
    assert [layer["name"] for layer in data["layers"]] == [name for name, _ in TINY_EXPECTED]
    assert Counts.from_dict(data) == counts


def test_table_lists_every_call_and_the_total():
    counts = count(Tiny(), (1, 4, 8, 8))
    lines = counts.table().splitlines()
    # header, rule, one row per call, rule, total, convention
    assert len(lines) == len(TINY_EXPECTED) + 5
    rows = lines[2 : 2 + len(TINY_EXPECTED)]
    for line, (name, macs) in zip(rows, TINY_EXPECTED, strict=True):
        assert line.split()[0] == name and line.endswith(f"{macs:,}")
    assert lines[-2].startswith("total") and lines[-2].endswith(f"{counts.macs:,}")
    assert len({len(line) for line in rows}) == 1  # right-aligned numbers: equal widths
    assert CONVENTION in lines[-1]


@pytest.mark.parametrize(
    "n, unit, text",
    [
        (853_018, "M", "0.853M"),
        (125_485_696, "M", "125.486M"),
        (4_089_184_256, "G", "4.089G"),
        (1_500, "K", "1.500K"),
        (0, "M", "0.000M"),
    ],
)
def test_format_count(n, unit, text):
    assert format_count(n, unit) == text


def test_format_count_rejects_unknown_unit():
    with pytest.raises(ChipError, match="unit"):
        format_count(10, "X")


@pytest.mark.parametrize("before, after", [(100, 25), (125_485_696, 65_943_040), (7, 7), (3, 0)])
def test_reduction(before, after):
    assert reduction(before, after) == pytest.approx((before - after) / before * 100)


def test_reduction_needs_positive_before():
    with pytest.raises(ChipError):
        reduction(0, 1)


# ---------------------------------------------------------------------------------------- latency


@pytest.mark.parametrize("mode", ["train", "mixed"])
@pytest.mark.parametrize("repeats, warmup", [(1, 0), (4, 2)])
def test_latency_fields_and_model_untouched(mode, repeats, warmup):
    model = Tiny().train()
    if mode == "mixed":
        model.bn.eval()
    before = snapshot(model)
    result = measure_latency(model, (3, 4, 8, 8), repeats=repeats, warmup=warmup)
    assert isinstance(result, LatencyResult)
    assert result.repeats == repeats and result.batch_size == 3
    assert result.device == "cpu" and result.threads == torch.get_num_threads()
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.images_per_s == pytest.approx(3 * 1000 / result.median_ms)
    assert_same(before, snapshot(model))
    assert json.loads(json.dumps(result.to_dict()))["repeats"] == repeats


def test_latency_runs_in_eval_inference_mode_on_one_fixed_input():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled(), x))
            return self.lin(x)

    model = Probe().train()
    rng_before = torch.get_rng_state()
    measure_latency(model, (2, 4), warmup=2, repeats=3)
    assert len(seen) == 2 + 3
    assert all(not training and inference for training, inference, _ in seen)
    assert all(x is seen[0][2] for _, _, x in seen)  # generated once
    assert torch.equal(torch.get_rng_state(), rng_before)  # private generator
    measure_latency(model, (2, 4), warmup=0, repeats=1)
    assert torch.equal(seen[-1][2], seen[0][2])  # fixed seed
    assert model.training


def percentile(values, q):
    """Linear-interpolation percentile, by hand."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fake_timer(durations_ms, calls):
    """Stand-in for the perf_counter timer: runs the model, reports the next scripted time."""
    it = iter(durations_ms)

    def timer(run):
        calls.append(run())
        return next(it)

    return timer


@pytest.mark.parametrize("repeats", [1, 4, 10])
def test_latency_statistics_of_timed_runs(monkeypatch, repeats):
    durations = [float(v) for v in (7, 1, 9, 3, 3, 12, 5, 2, 8, 4)][:repeats]
    calls = []
    monkeypatch.setattr("chip.latency._cpu_timer", fake_timer(durations, calls))
    result = measure_latency(Tiny(), (2, 4, 8, 8), warmup=3, repeats=repeats)
    assert len(calls) == repeats and all(out.shape == (2, 5) for out in calls)
    assert result.repeats == repeats
    assert result.median_ms == pytest.approx(percentile(durations, 50))
    assert result.p10_ms == pytest.approx(percentile(durations, 10))
    assert result.p90_ms == pytest.approx(percentile(durations, 90))


def test_latency_min_time_extends_repeats(monkeypatch):
    calls = []
    monkeypatch.setattr("chip.latency._cpu_timer", fake_timer([5.0] * 100, calls))
    result = measure_latency(Tiny(), (1, 4, 8, 8), warmup=0, repeats=2, min_time_s=0.05)
    assert result.repeats == len(calls) == 10  # 10 x 5 ms reaches 50 ms
    short = measure_latency(Tiny(), (1, 4, 8, 8), warmup=0, repeats=3, min_time_s=0.001)
    assert short.repeats == 3  # repeats is a floor


@pytest.mark.parametrize("amp", [None, "bf16", torch.bfloat16, True])
def test_latency_channels_last_and_amp_leave_model_alone(amp):
    model = Tiny()
    before = snapshot(model)
    weight_strides = model.conv.weight.stride()
    result = measure_latency(model, (1, 4, 8, 8), warmup=1, repeats=2, channels_last=True, amp=amp)
    assert result.repeats == 2
    assert_same(before, snapshot(model))
    assert model.conv.weight.stride() == weight_strides


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"min_time_s": -1.0}, "min_time_s"),
        ({"amp": "int8"}, "amp"),
        ({"channels_last": True}, "channels_last"),
    ],
)
def test_latency_bad_arguments(kwargs, match):
    size = (1, 4) if "channels_last" in kwargs else (1, 4, 8, 8)
    model = nn.Linear(4, 4) if "channels_last" in kwargs else Tiny()
    with pytest.raises(ChipError, match=match):
        measure_latency(model, size, **kwargs)
