"""The latency cost model (chip.latency: measure_table, detect_step, latency_table) and latency
budgets / round_to="auto" in chip.plan, with a fake layer timer: no wall-clock assertions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import chip
from chip.allocation import Allocation, solve
from chip.counting import WidthCounter
from chip.errors import ChipError
from chip.latency import detect_step, latency_table, measure_latency, measure_table, table_key
from chip.models import create
from chip.planning import plan

pytestmark = pytest.mark.filterwarnings("ignore::chip.errors.ChipWarning")


def blocked(module, shape, out_c, in_c):
    """A oneDNN-like fake: time grows with the 8-channel blocks of both sides."""
    hw = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[0] * hw * math.ceil(out_c / 8) * math.ceil(in_c / 8) * 1e-4


def smooth(module, shape, out_c, in_c):
    hw = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[0] * hw * out_c * in_c * 1e-6


@pytest.mark.parametrize("step", [1, 2, 8, 16])
def test_detect_step_on_a_step_shaped_curve(step):
    widths = list(range(1, 65))
    times = [math.ceil(w / step) * 0.5 + 1.0 for w in widths]
    assert detect_step(widths, times, 64) == step


def test_detect_step_respects_the_group_unit_and_noise():
    widths = list(range(2, 65, 2))
    times = [math.ceil(w / 8) * (1 + 0.01 * (w % 3)) for w in widths]  # 8-steps, 2 % noise
    assert detect_step(widths, times, 64, unit=2) == 8
    assert detect_step([4, 8, 12, 16], [1.0, 1.0, 2.0, 2.0], 16, unit=4) == 8


def test_detect_step_on_a_measured_shape_linear_below_the_first_block_with_an_outlier():
    # the shape oneDNN gave here at batch 64 (ResNet-56 stage 3): time falls channel by channel
    # below 16, then is flat in blocks of 16; one timing is an outlier
    widths = list(range(1, 65))
    times = [0.8 + 0.05 * w if w <= 16 else 1.1 + math.ceil(w / 16) for w in widths]
    times[40] *= 1.5
    assert detect_step(widths, times, 64) == 16
    linear = [0.8 + 0.05 * w for w in widths]
    assert detect_step(widths, linear, 64) == 1
    # flat only below the first 16-block and linear above: no step
    flat_low = [1.0 if w <= 16 else 1.0 + 0.05 * w for w in widths]
    assert detect_step(widths, flat_low, 64) == 1


def test_table_of_a_blocked_timer_finds_8_channel_steps_and_round_to_auto_uses_them():
    model = create("resnet20", num_classes=4).eval()
    graph = chip.find_groups(model, torch.zeros(1, 3, 16, 16))
    table = measure_table(model, graph, (1, 3, 16, 16), time_layer=blocked)
    assert set(table.steps) == {g.name for g in graph}
    assert all(s == 8 for s in table.steps.values())
    assert table.predict({}) == pytest.approx(table.base_ms)
    p = plan(model, None, "flops=0.5", round_to="auto", input_size=(1, 3, 16, 16),
             time_layer=blocked)  # fmt: skip
    assert all(w % 8 == 0 for w in p.widths().values())
    assert p.stats["round_to"] == table.steps and p.stats["macs_kept"] <= 0.5
    smooth_table = measure_table(model, graph, (1, 3, 16, 16), time_layer=smooth)
    assert all(s == 1 for s in smooth_table.steps.values())


@pytest.mark.parametrize("auto_faster", [True, False])
def test_round_to_auto_keeps_its_steps_only_where_they_measure_faster(monkeypatch, auto_faster):
    """round_to="auto" measures its plan against the plan round_to=1 gives and keeps the
    faster; a fake measurement says which (here by whether every width is a multiple of 8,
    as the blocked table's steps make them)."""
    from chip import latency

    real_table = latency.latency_table
    monkeypatch.setattr(latency, "latency_table",
                        lambda m, g, s, time_layer=None: real_table(m, g, s, time_layer=blocked))  # fmt: skip
    seen = []

    def ms(widths):
        seen.append(dict(widths))
        stepped = all(w % 8 == 0 for w in widths.values())
        return 1.0 if stepped == auto_faster else 2.0

    monkeypatch.setattr(latency, "compare_widths", lambda model, graph, size: _compare(ms))
    model = create("resnet20", num_classes=4).eval()
    p = plan(model, None, "flops=0.5", round_to="auto", input_size=(1, 3, 16, 16))
    check = p.stats["latency"]["round_to_check"]
    assert len(seen) == 2 and seen[0] != seen[1]  # the two plans, compared
    assert p.stats["macs_kept"] <= 0.5
    if auto_faster:
        assert check == {"auto_ms": 1.0, "step1_ms": 2.0, "kept": "auto"}
        assert all(w % 8 == 0 for w in p.widths().values()) and set(
            p.stats["round_to"].values()
        ) == {8}
    else:
        assert check == {"auto_ms": 2.0, "step1_ms": 1.0, "kept": "step 1"}
        assert p.widths() == seen[1] and set(p.stats["round_to"].values()) == {1}


def test_round_to_auto_gives_macs_back_where_they_cost_no_time():
    # time only in the first stage (16x16 maps, 8-channel blocks); narrowing stages 2-3 saves
    # nothing, so the steps given back after the uniform rate should go there first
    def first_stage_only(module, shape, out_c, in_c):
        return blocked(module, shape, out_c, in_c) if shape[-1] == 16 else 1e-3

    model = create("resnet20", num_classes=4).eval()
    size = (1, 3, 16, 16)
    graph = chip.find_groups(model, torch.zeros(size))
    table = measure_table(model, graph, size, time_layer=first_stage_only)
    counter = WidthCounter(model, graph, size)
    timed, _ = solve("macs", 0.5, graph, counter, table.steps, Allocation(), latency=table)
    plain, _ = solve("macs", 0.5, graph, counter, table.steps, Allocation())
    for widths in (timed, plain):
        assert counter(widths)[1] / counter.base_macs <= 0.5
    assert table.predict(timed) < table.predict(plain)
    later = [g.name for g in graph if not g.name.startswith(("conv1", "layer1"))]
    assert sum(timed[n] for n in later) > sum(plain[n] for n in later)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_latency_budget_is_met_on_the_table(allocation):
    model = create("resnet20", num_classes=4).eval()
    x = torch.randn(16, 3, 16, 16)
    scores = chip.calibrate(model, [x[:8], x[8:]], num_batches=2, progress=False)
    p = plan(model, scores, "latency=0.6", input_size=(1, 3, 16, 16), time_layer=smooth,
             allocation=allocation, latency_batch=4)  # fmt: skip
    lat = p.stats["latency"]
    assert 0.59 <= lat["predicted_ms"] / lat["base_ms"] <= 0.6
    assert lat["batch"] == 4 and lat["threads"] == torch.get_num_threads()
    # the prediction against the fake timer summed over the pruned model's layers: exact, since
    # the fake is a product of an output and an input term (as the table's model assumes)
    pruned = chip.apply(model, p)
    truth = measure_table(pruned, chip.find_groups(pruned, torch.zeros(1, 3, 16, 16)),
                          (4, 3, 16, 16), time_layer=smooth).base_ms  # fmt: skip
    assert truth == pytest.approx(lat["predicted_ms"], rel=1e-9)


def test_latency_table_cache_keys(monkeypatch):
    model = create("resnet20", num_classes=4).eval()
    graph = chip.find_groups(model, torch.zeros(1, 3, 8, 8))
    calls = []

    def counting(*args):
        calls.append(1)
        return smooth(*args)

    latency_table(model, graph, (1, 3, 8, 8), time_layer=counting)
    assert calls
    calls.clear()
    latency_table(model, graph, (1, 3, 8, 8), time_layer=counting)
    assert calls == []  # hit
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        latency_table(model, graph, (1, 3, 8, 8), time_layer=counting)
    finally:
        torch.set_num_threads(before)
    assert calls  # another thread count is a miss
    base = table_key(model, (1, 3, 8, 8))
    assert table_key(model.to("meta"), (1, 3, 8, 8))["device"] == "meta" != base["device"]
    assert table_key(create("resnet20", num_classes=4), (2, 3, 8, 8)) != base


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "latency=1.5"}, "budget latency='1.5': expected a fraction"),
        ({"target": "latency=0.5", "latency_batch": 0}, "latency_batch must be a positive"),
        ({"round_to": "fast"}, "round_to must be a positive integer or 'auto'"),
    ],
)
def test_bad_latency_input_is_one_line(kwargs, message):
    model = create("resnet20", num_classes=4)
    kwargs = {"target": "flops=0.5", **kwargs}
    with pytest.raises(ChipError, match=message):
        plan(model, None, input_size=(1, 3, 8, 8), time_layer=smooth, **kwargs)


# -- command line (real timing of tiny layers; only shapes and fields are checked) ---------------


def test_cli_plan_with_a_latency_target_prints_and_writes_latency(capsys, tmp_path):
    from chip import cli

    code = cli.main(["plan", "--arch", "resnet20", "--input-size", "3,16,16", "--latency", "0.95",
                     "--round-to", "auto", "--json", "--quiet", "--threads", "1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["batch"] == 1 and out["threads"] == 1 and out["device"] == "cpu"
    # the plan is checked on pruned copies: the measured ratio is what the budget is held to
    assert 0 < out["measured_latency_ratio"] and out["latency_ms"] > 0
    assert out["measured_base_latency_ms"] > 0 and out["latency_rounds"][0]["asked"] == 0.95
    code = cli.main(["plan", "--arch", "resnet20", "--input-size", "3,8,8", "--flops", "0.5",
                     "--round-to", "auto", "--quiet"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "round to auto" in text and "ms predicted" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--latency", "0.5", "--device", "cuda"], "device 'cuda' is not available"),
        (["--latency", "1.5"], "budget latency=1.5: expected a fraction"),
        (["--flops", "0.5", "--round-to", "fast"], "expected an integer >= 1, got 'fast'"),
        (["--latency", "0.5", "--latency-batch", "0"], "expected an integer >= 1, got '0'"),
    ],
)
def test_cli_bad_latency_flags_exit_2(capsys, tmp_path, argv, message):
    from chip import cli

    out = tmp_path / "p.json"
    code = cli.main(
        ["plan", "--arch", "resnet20", "--input-size", "3,8,8", *argv, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_config_takes_latency_targets_and_round_to_auto():
    from helpers import TINY_RUN

    from chip import config

    cfg = json.loads(json.dumps(TINY_RUN))
    cfg["target"] = {"latency": 0.5, "round_to": "auto"}
    cfg["plan"] = {"latency_batch": 8}
    full = config.validate_config(cfg)
    assert config.resolve_target(full["target"]) == {"latency": 0.5}
    cfg["target"]["round_to"] = "fast"
    with pytest.raises(ChipError, match="must be an integer >= 1 or 'auto', got 'fast'"):
        config.validate_config(cfg)


def test_prediction_scales_the_other_operations_with_the_kept_activations():
    from chip.latency import LatencyTable

    layers = {"conv": {"ms": 4.0, "sides": [["g", [[2, 1.0], [4, 4.0]]]]}}
    rest = {"half_widths": {"g": 2, "h": 4}, "weights": {"g": [300, 4], "h": [100, 8]},
            "half_ms": 5.0}  # fmt: skip
    table = LatencyTable(10.0, layers, {"g": 1}, {}, rest)
    rest["a_half"] = table._kept_activations(rest["half_widths"])
    assert rest["a_half"] == pytest.approx((150 + 50) / 400)
    # whole: 6 ms of other operations; at the half widths: 5 - 1 = 4 ms; linear in between
    assert table.predict({}) == pytest.approx(10.0)
    assert table.predict({"g": 2, "h": 4}) == pytest.approx(5.0)
    assert table.predict({"g": 2}) == pytest.approx(6.0 - 2.0 * 0.375 / 0.5 + 1.0)
    a = (300 * 3 / 4 + 100 * 4 / 8) / 400
    expected_rest = 6.0 + (6.0 - 4.0) * (a - 1.0) / (1.0 - rest["a_half"])
    assert table.predict({"g": 3, "h": 4}) == pytest.approx(expected_rest + 2.5)
    assert LatencyTable(10.0, layers, {}, {}).predict({"g": 2}) == pytest.approx(7.0)


class DepthwiseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.b(torch.relu(self.dw(torch.relu(self.bn(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def test_depthwise_convs_are_timed_once_and_predicted_exactly():
    model = DepthwiseNet().eval()
    p = plan(model, None, "latency=0.6", input_size=(1, 3, 8, 8), time_layer=smooth)
    pruned = chip.apply(model, p)
    truth = measure_table(pruned, chip.find_groups(pruned, torch.zeros(1, 3, 8, 8)),
                          (1, 3, 8, 8), time_layer=smooth).base_ms  # fmt: skip
    assert truth == pytest.approx(p.stats["latency"]["predicted_ms"], rel=1e-9)
    real = plan(model, None, "flops=0.6", round_to="auto", input_size=(1, 3, 8, 8))  # real timer
    assert set(real.stats["round_to"]) == set(real.groups)


def test_a_noisy_half_width_timing_never_makes_fewer_channels_slower():
    from chip.latency import LatencyTable

    layers = {"conv": {"ms": 4.0, "sides": [["g", [[2, 1.0], [4, 4.0]]]]}}
    rest = {"half_widths": {"g": 2}, "weights": {"g": [100, 4]}, "half_ms": 20.0, "a_half": 0.5}
    table = LatencyTable(10.0, layers, {"g": 1}, {}, rest)  # half width measured slower
    assert table.predict({"g": 2}) == pytest.approx(6.0 + 1.0)  # other operations: unchanged


def test_layers_that_promise_more_than_the_half_width_model_saves_are_scaled_to_it():
    """Isolated layers can shrink faster than the model does (several CPU threads): the
    prediction then matches the measured half-width model, and the whole model stays whole."""
    from chip.latency import LatencyTable

    layers = {"conv": {"ms": 8.0, "sides": [["g", [[2, 1.0], [3, 4.5], [4, 8.0]]]]}}
    rest = {"half_widths": {"g": 2}, "weights": {"g": [100, 4]}, "half_ms": 8.0, "a_half": 0.5}
    table = LatencyTable(10.0, layers, {"g": 1}, {}, rest)
    assert table.predict({}) == pytest.approx(10.0)
    assert table.predict({"g": 2}) == pytest.approx(8.0)  # the measured half-width model
    assert table.predict({"g": 3}) == pytest.approx(10.0 - (2.0 / 7.0) * 3.5)
    assert table.predict({"g": 2}) < table.predict({"g": 3}) < table.predict({"g": 4})


def test_a_latency_budget_is_corrected_until_the_measured_model_meets_it():
    """The table predicts savings the hardware does not deliver: asked budgets shrink until the
    measured pruned model meets the target (fake solver and timer: one width, ms = 2 + width)."""
    from chip.errors import ChipError
    from chip.latency import meet_latency

    def solve_at(fraction):  # predicts ms = 10 * width / 8 for width in 1..8 (base 10 ms)
        width = max(1, min(8, int(fraction * 8)))
        if fraction < 1 / 8:
            raise ChipError("cannot be met")
        return {"g": width}, {"asked": fraction}

    def measure(widths):  # the truth: 2 ms the pruning cannot remove
        return 10.0 if widths is None else 2.0 + widths["g"]

    widths, record, info = meet_latency(solve_at, 0.5, _compare(measure))
    second = 0.5 * 0.5 * (1 - 0.03 / 2) / 0.6  # aimed inside the band [0.485, 0.5]
    assert [r["asked"] for r in info["rounds"]] == [0.5, pytest.approx(second)]
    assert widths == {"g": 3} and info["measured_ratio"] == pytest.approx(0.5)
    assert record == {"asked": pytest.approx(second)}
    # an unreachable target: the fastest plan measured, with a warning
    from chip.errors import ChipWarning

    with pytest.warns(ChipWarning, match=r"latency=0.2: the fastest plan found measures 0.300"):
        widths, _, info = meet_latency(solve_at, 0.2, _compare(measure))
    assert widths == {"g": 1} and info["measured_ratio"] == pytest.approx(0.3)


def test_every_group_whole_predicts_the_measured_model_and_latency_1_keeps_all():
    """A layer on two groups timed separately at full width (noise: 4.0 vs 4.4 ms) still
    predicts the measured whole model at full widths, so latency=1 prunes nothing."""
    from chip.latency import LatencyTable

    layers = {
        "conv": {"ms": 4.4, "sides": [["g", [[2, 1.0], [4, 4.0]]], ["h", [[4, 2.2], [8, 4.4]]]]}
    }
    rest = {"half_widths": {"g": 2, "h": 4}, "weights": {"g": [100, 4], "h": [100, 8]},
            "half_ms": 6.0, "a_half": 0.5}  # fmt: skip
    table = LatencyTable(10.0, layers, {"g": 1, "h": 1}, {}, rest)
    assert table.predict({"g": 4, "h": 8}) == table.predict({}) == 10.0
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    p = plan(model, None, "latency=1", input_size=(1, 3, 8, 8), time_layer=smooth)
    assert all(g.kept == g.channels for g in p.groups.values())


def test_latency_on_the_meta_device_is_one_line(capsys):
    from chip import cli

    argv = [
        "plan",
        "--arch",
        "resnet20",
        "--input-size",
        "3,8,8",
        "--latency",
        "0.6",
        "--device",
        "meta",
    ]
    assert cli.main(argv) == 2
    assert "--device meta holds no data" in capsys.readouterr().err
    with pytest.raises(ChipError, match="meta device"):
        measure_latency(torch.nn.Linear(2, 2, device="meta"), (1, 2))


@pytest.mark.parametrize("op_ms, loop", [(0.01, 128), (0.3, 4), (5.0, 1), (1e-5, 256)])
def test_layer_timing_loops_short_operations_into_long_samples(op_ms, loop):
    """A sample runs the operation back to back until it lasts ``_SAMPLE_MS`` (1 ms), at most
    256 times, and reports the time per run; the fake timer's jitter is per sample, so looping
    divides it by ``loop``."""
    from chip.latency import _median_ms

    runs, sizes = [0], []
    jitter = iter([0.0] + [0.05, -0.05, 0.02, 0.0, 0.01])  # the first timing sets the loop

    def op():
        runs[0] += 1

    def timer(run):
        before = runs[0]
        run()
        sizes.append(runs[0] - before)
        return sizes[-1] * op_ms + next(jitter)

    assert _median_ms(op, timer) == pytest.approx(op_ms + 0.01 / loop)
    assert sizes == [1] + [loop] * 5
    assert runs[0] == 2 + 1 + 5 * loop  # two warm-up runs first


def test_latency_corrections_stay_inside_the_bracket_of_over_and_undershoots():
    from chip.latency import _bracketed, meet_latency

    below, above = {"asked": 0.6, "measured": 0.40}, {"asked": 0.8, "measured": 0.56}
    aim = 0.5 * (1 - 0.03 / 2)
    inside = 0.6 + (aim - 0.40) * 0.2 / 0.16
    assert _bracketed(0.9, [below, above], 0.5, aim, 0.03) == pytest.approx(inside)
    assert _bracketed(0.7, [below, above], 0.5, aim, 0.03) == 0.7  # already inside
    assert _bracketed(0.9, [below], 0.5, aim, 0.03) == 0.9  # no bracket yet
    swapped = [{**below, "asked": 0.9}, above]  # noise: out of order, left alone
    assert _bracketed(0.95, swapped, 0.5, aim, 0.03) == 0.95

    # a table that over-predicts small plans: the measured ratio is 0.2 + 0.8 a^4 of the asked a;
    # the band is reached in the sixth round (four, the old default, ended at 0.438)
    def solve_at(fraction):
        return {"g": round(fraction * 10_000)}, {}

    def measure(widths):
        return 10.0 if widths is None else 10.0 * (0.2 + 0.8 * (widths["g"] / 10_000) ** 4)

    _, _, info = meet_latency(solve_at, 0.5, _compare(measure))
    assert 0.485 <= info["measured_ratio"] <= 0.5
    assert len(info["rounds"]) <= 6


def test_interleaved_timing_cancels_the_machine_slowing_down(monkeypatch):
    """Halfway through, every run takes 50 % longer (a neighbour's job starts): the ratio of
    adjacent turns (A, B, A, B, ...) is still the true 0.5. Two medians taken one after the
    other (the unpruned model, then the pruned one) read 0.75. Runs shorter than a block are
    timed k at a time after an untimed run."""
    from chip import latency

    runs, slow_after = [], [100]

    class Cost(nn.Module):  # a model that only says how long it takes
        def __init__(self, ms):
            super().__init__()
            self.ms = ms

        def forward(self, x):
            runs.append(self.ms)
            return x

    def timer(run):
        first = len(runs)
        run()
        return sum(runs[first:]) * (1.5 if len(runs) > slow_after[0] else 1.0)

    monkeypatch.setattr(latency, "_cpu_timer", timer)
    base, pruned = Cost(10.0), Cost(5.0)
    ta, tb = latency.interleaved_ms([base, pruned], (1, 3, 4, 4), min_time_s=1.5, warmup=2,
                                    block_ms=20.0)  # fmt: skip
    # warm-up and the first timed run, then turns: 1 untimed + 2 timed runs of base (10 ms
    # fill 20 ms), 1 + 4 of pruned
    assert runs[:6] == [10.0] * 3 + [5.0] * 3 and runs[6:9] == [10.0] * 3
    assert runs[9:14] == [5.0] * 5 and runs[14:17] == [10.0] * 3
    assert len(ta) == len(tb) and set(ta) == {10.0, 15.0} and set(tb) == {5.0, 7.5}
    assert float(np.median(np.asarray(tb) / np.asarray(ta))) == pytest.approx(0.5)
    runs.clear()  # one after the other: the slow part falls mostly on the pruned model
    slow_after[0] = 30
    sequential = [latency.interleaved_ms([m], (1, 3, 4, 4), min_time_s=0.5, warmup=0,
                                         block_ms=1.0)[0] for m in (base, pruned)]  # fmt: skip
    assert np.median(sequential[1]) / np.median(sequential[0]) == pytest.approx(0.75)


def test_detect_step_where_the_multiples_are_faster_than_their_block():
    """The shape oneDNN gave on one CPU at batch 64 (ResNet-50 at 112x112): flat in blocks of 16,
    but the multiple of 16 itself 10 % faster than the 15 widths padded up to it. Rounding up
    costs no time: a step of 16 (the two-sided test "flat within the block" found none).
    Multiples slower than their block are no step."""
    widths = list(range(1, 65))
    times = [0.05 * w if w <= 16 else 1.0 + math.ceil(w / 16) for w in widths]
    times = [t * (0.9 if w % 16 == 0 and w > 16 else 1.0) for w, t in zip(widths, times)]
    assert detect_step(widths, times, 64) == 16
    slow_multiples = [t * (1.5 if w % 16 == 0 and w > 16 else 1.0) for w, t in zip(widths, times)]
    assert detect_step(widths, slow_multiples, 64) == 1


def _compare(ms):
    """A ``compare`` for meet_latency / faster_widths from a fake ``ms(widths)``."""

    def compare(a, b):
        x, y = ms(a), ms(b)
        return x, y, y / x

    return compare
