"""Tests of chip.train: schedules, label smoothing, train/eval passes, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import SCRIPTS, load_script
from torch.utils.data import DataLoader

from chip.errors import ChipError
from chip.train import (
    SCHEDULES,
    CheckpointSaver,
    TrainConfig,
    build_criterion,
    build_lr_fn,
    build_optimizer,
    evaluate,
    fit,
    get_rng_state,
    load_training_state,
    paper_lr,
    resolve_amp,
    seed_epoch,
    set_rng_state,
    step_lr,
    train_one_epoch,
)

tiny = load_script("tiny")


def _loader(n=24, num_classes=4, batch=8, seed=123, **kw):
    return DataLoader(tiny.make_dataset(n, num_classes, seed=seed), batch_size=batch, **kw)


# ------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "epoch,step,expected", [(0, 0, 1.0200e-05), (5, 0, 0.01), (200, 0, 5.0994e-03)]
)
def test_paper_lr_spec_values(epoch, step, expected):
    assert paper_lr(0.01, epoch, step, 196, 400) == pytest.approx(expected, rel=1e-4)


def test_paper_lr_warmup_monotone_then_cosine_decay():
    iters, epochs = 196, 400
    warm = [paper_lr(0.01, e, s, iters, epochs) for e in range(5) for s in range(iters)]
    assert all(b > a for a, b in zip(warm, warm[1:], strict=False))
    assert warm[-1] <= paper_lr(0.01, 5, 0, iters, epochs)
    decay = [paper_lr(0.01, e, 0, iters, epochs) for e in range(5, epochs)]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] > 0
    # within a post-warm-up epoch the lr is constant (integer epoch in the cosine)
    assert paper_lr(0.01, 7, 0, iters, epochs) == paper_lr(0.01, 7, 195, iters, epochs)


@pytest.mark.parametrize("epoch", [0, 29, 30, 31, 59, 60, 61, 89, 90, 120])
@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_step_lr(epoch, gamma):
    milestones = (60, 30, 90)  # unsorted on purpose
    expected = 0.1
    for m in milestones:
        if epoch >= m:
            expected *= gamma
    got = step_lr(0.1, epoch, 3, 10, 120, milestones=milestones, gamma=gamma)
    assert got == pytest.approx(expected, rel=1e-12)


def test_step_lr_warmup():
    lrs = [
        step_lr(0.1, e, s, 4, 10, warmup_epochs=2, milestones=(5,))
        for e in range(2)
        for s in range(4)
    ]
    assert lrs == pytest.approx([0.1 * k / 8 for k in range(1, 9)])


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_build_lr_fn_matches_registry(schedule):
    cfg = TrainConfig(epochs=20, lr=0.2, schedule=schedule, warmup_epochs=2, milestones=(10,))
    lr_fn = build_lr_fn(cfg, iters_per_epoch=7)
    fn, extra = SCHEDULES[schedule]
    kwargs = {k: getattr(cfg, k) for k in extra}
    for epoch, step in [(0, 0), (1, 6), (2, 0), (10, 3), (19, 6)]:
        assert lr_fn(epoch, step) == fn(0.2, epoch, step, 7, 20, warmup_epochs=2, **kwargs)


# ---------------------------------------------------------------------------------- config


def test_config_from_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig.from_dict({"epochs": 3, "milestones": [1, 2], "amp": "bf16"})
    assert cfg.milestones == (1, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ChipError, match="unknown train config key.*lrr.*valid keys are.*epochs"):
        TrainConfig.from_dict({"lrr": 0.1})


@pytest.mark.parametrize(
    "bad",
    [
        {"schedule": "poly"},
        {"amp": "fp8"},
        {"lr": 0.0},
        {"label_smoothing": 1.0},
        {"epochs": 0},
        {"clip_grad": -1.0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ChipError):
        TrainConfig(**bad)


def test_fp16_on_cpu_warns_and_falls_back_bf16_allowed():
    with pytest.warns(UserWarning, match="fp16"):
        assert resolve_amp("fp16", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_build_optimizer_decays_all_parameters():
    model = tiny.tiny_cnn()
    cfg = TrainConfig(lr=0.3, momentum=0.99, weight_decay=1e-4)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (1e-4, 0.99, False)


# ---------------------------------------------------------------------------- label smoothing


def _smoothed_ce_oracle(logits, target, eps):
    k = logits.shape[1]
    q = (1 - eps) * F.one_hot(target, k).double() + eps / k
    return -(q * F.log_softmax(logits.double(), dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("k", [2, 10])
def test_label_smoothing_matches_explicit_targets(eps, k):
    logits = torch.randn(16, k) * 3
    target = torch.randint(0, k, (16,))
    got = build_criterion(TrainConfig(label_smoothing=eps))(logits, target)
    assert got.item() == pytest.approx(_smoothed_ce_oracle(logits, target, eps).item(), rel=1e-5)


def test_fit_uses_label_smoothing_from_cfg(tmp_path):
    eps = 0.3
    model = tiny.tiny_cnn(dropout=0.0)
    val = _loader(20, seed=7)
    cfg = TrainConfig(epochs=1, lr=0.05, warmup_epochs=0, label_smoothing=eps)
    result = fit(model, _loader(), val, cfg, tmp_path, progress=False)
    model.eval()
    x, y = val.dataset.tensors
    with torch.no_grad():
        oracle = _smoothed_ce_oracle(model(x), y, eps).item()
        plain = F.cross_entropy(model(x), y).item()
    assert result["history"][-1]["val_loss"] == pytest.approx(oracle, rel=1e-5)
    assert plain != pytest.approx(oracle, rel=1e-3)


# --------------------------------------------------------------------------- train / evaluate


@pytest.mark.parametrize("clip_grad", [None, 0.5])
def test_train_one_epoch_equals_bare_loop(clip_grad):
    """Same data order and lr per iteration -> bitwise the same weights as a plain SGD loop."""
    cfg = TrainConfig(epochs=3, lr=0.1, schedule="cosine", warmup_epochs=1, clip_grad=clip_grad)
    loader = _loader(30, batch=8)  # 4 iterations, last one short
    torch.manual_seed(1)
    ours, ref = tiny.tiny_cnn(dropout=0.0), tiny.tiny_cnn(dropout=0.0)
    ref.load_state_dict(ours.state_dict())
    lr_fn = build_lr_fn(cfg, len(loader))
    calls = []

    def recording_lr_fn(epoch, step):
        calls.append((epoch, step))
        return lr_fn(epoch, step)

    opt = build_optimizer(ours, cfg)
    stats = train_one_epoch(
        ours, nn.CrossEntropyLoss(), opt, loader, "cpu", 1, cfg, recording_lr_fn, progress=False
    )
    assert set(calls) == {(1, s) for s in range(len(loader))}

    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    ref.train()
    losses, correct = [], 0
    for step, (x, y) in enumerate(loader):
        for g in ref_opt.param_groups:
            g["lr"] = lr_fn(1, step)
        out = ref(x)
        loss = F.cross_entropy(out, y)
        ref_opt.zero_grad()
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(ref.parameters(), clip_grad)
        ref_opt.step()
        losses.append(loss.item() * len(y))
        correct += (out.argmax(1) == y).sum().item()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert stats["n"] == 30
    assert stats["loss"] == pytest.approx(sum(losses) / 30, rel=1e-6)
    assert stats["top1"] == pytest.approx(100 * correct / 30)
    assert stats["lr"] == lr_fn(1, len(loader) - 1)
    assert stats["images_per_s"] > 0


@pytest.mark.parametrize("amp,channels_last", [("bf16", False), ("none", True)])
def test_train_one_epoch_amp_and_channels_last_run(amp, channels_last):
    cfg = TrainConfig(epochs=1, lr=0.05, amp=amp, channels_last=channels_last, warmup_epochs=0)
    model = tiny.tiny_cnn()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        build_optimizer(model, cfg),
        _loader(),
        "cpu",
        0,
        cfg,
        build_lr_fn(cfg, 3),
        progress=True,
    )
    assert math.isfinite(stats["loss"]) and stats["n"] == 24
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("num_classes", [3, 10])
@pytest.mark.parametrize("batch", [1, 7])
def test_evaluate_matches_per_sample_oracle(num_classes, batch):
    model = tiny.tiny_cnn(num_classes)
    model.train()
    loader = _loader(19, num_classes, batch=batch, seed=5)
    got = evaluate(model, loader, "cpu")
    assert model.training  # mode restored
    model.eval()
    k = min(5, num_classes)
    loss = c1 = c5 = 0.0
    with torch.no_grad():
        for x, y in loader.dataset:
            logits = model(x[None])[0]
            loss += F.cross_entropy(logits[None], y[None]).item()
            order = sorted(range(num_classes), key=lambda c: -logits[c].item())
            c1 += order[0] == y.item()
            c5 += y.item() in order[:k]
    assert got["n"] == 19
    assert got["top1"] == pytest.approx(100 * c1 / 19)
    assert got["top5"] == pytest.approx(100 * c5 / 19)
    assert got["loss"] == pytest.approx(loss / 19, rel=1e-5)
    if num_classes <= 5:
        assert got["top5"] == 100.0


# ------------------------------------------------------------------------------ checkpoints


def _save_one(saver, model, epoch, metric, **kw):
    opt = build_optimizer(model, TrainConfig())
    return saver.save(model, opt, epoch, metric, TrainConfig(epochs=9), **kw)


def test_checkpoint_saver_best_and_contents(tmp_path):
    saver = CheckpointSaver(tmp_path)
    model = tiny.tiny_cnn()
    flags = [
        _save_one(saver, model, e, m, extra={"plan": [0.1, 0.2]})
        for e, m in enumerate([10.0, 30.0, 20.0, 30.0, 40.0])
    ]
    assert flags == [True, True, False, False, True]
    last = load_training_state(tmp_path / "last.pt")  # weights_only load
    best = load_training_state(tmp_path / "best.pt")
    assert last["epoch"] == 4 and last["best_epoch"] == 4 and last["best_metric"] == 40.0
    assert best["epoch"] == 4 and best["metric"] == 40.0
    assert set(last) >= {"model", "optimizer", "scaler", "cfg", "rng", "extra", "history"}
    assert last["extra"] == {"plan": [0.1, 0.2]} and last["cfg"]["epochs"] == 9
    for k, v in model.state_dict().items():
        assert torch.equal(last["model"][k], v)


def _fail_mid_write(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    raise OSError("disk full")


@pytest.mark.parametrize("failure", ["torch_save_raises", "unpicklable_extra"])
def test_failed_save_leaves_previous_last_intact(tmp_path, monkeypatch, failure):
    saver = CheckpointSaver(tmp_path)
    model = tiny.tiny_cnn()
    _save_one(saver, model, 0, 50.0)
    before = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    extra = None
    if failure == "torch_save_raises":
        monkeypatch.setattr(torch, "save", _fail_mid_write)
    else:
        extra = {"fn": lambda: None}
    with pytest.raises((OSError, AttributeError, TypeError, pickle.PicklingError)):
        _save_one(saver, model, 1, 10.0, extra=extra)
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert load_training_state(tmp_path / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from chip.utils import atomic_save

    state = get_rng_state()
    atomic_save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_training_state_missing_file_is_chip_error(tmp_path):
    with pytest.raises(ChipError, match="not found"):
        load_training_state(tmp_path / "nope.pt")


class Opaque:
    """A picklable object that a weights-only load refuses (stored in ``extra``)."""

    def __init__(self, value=3):
        self.value = value


def test_load_training_state_needs_trust_code_for_pickled_extra(tmp_path):
    model = tiny.tiny_cnn()
    _save_one(CheckpointSaver(tmp_path), model, 0, 1.0, extra={"opaque": Opaque(5)})
    with pytest.raises(ChipError, match=r"trust_code=True \(CLI: --trust-code\)") as err:
        load_training_state(tmp_path / "last.pt")
    assert "Opaque" in str(err.value) and "trusted=" not in str(err.value)
    fresh = tiny.tiny_cnn()
    ckpt = load_training_state(tmp_path / "last.pt", fresh, trust_code=True)
    assert ckpt["extra"]["opaque"].value == 5
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


# ------------------------------------------------------------------------ determinism / fit


def _order(loader):
    return torch.cat([y for _, y in loader]).tolist(), torch.cat([x for x, _ in loader])


@pytest.mark.parametrize("generator", [False, True])
def test_seed_epoch_makes_data_order_a_function_of_seed_and_epoch(generator):
    ds = tiny.AugmentedDataset(*tiny.make_tensors(40))

    def make():
        gen = torch.Generator() if generator else None
        return DataLoader(ds, batch_size=8, shuffle=True, generator=gen)

    a, b = make(), make()
    _order(a)  # a's generators have moved on; seed_epoch must reset them
    seed_epoch(a, 0, 3)
    ya, xa = _order(a)
    torch.manual_seed(999)  # unrelated RNG use in between must not matter
    torch.rand(5)
    seed_epoch(b, 0, 3)
    yb, xb = _order(b)
    assert ya == yb and torch.equal(xa, xb)  # same order and same augmentation
    seed_epoch(a, 0, 4)
    assert _order(a)[0] != ya


def test_fit_writes_metrics_checkpoints_and_resumes(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05, warmup_epochs=1)
    seen = []
    result = fit(
        tiny.tiny_cnn(),
        _loader(),
        _loader(20, seed=7),
        cfg,
        tmp_path,
        extra={"arch": "tiny"},
        progress=False,
        on_epoch_end=lambda e, r: seen.append(e),
    )
    assert seen == [0, 1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    keys = {
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "lr",
        "time",
        "images_per_s",
    }
    assert keys <= set(rows[0])
    assert result["best_top1"] == max(r["val_top1"] for r in rows)
    assert rows[result["best_epoch"]]["val_top1"] == result["best_top1"]
    assert load_training_state(tmp_path / "last.pt")["extra"] == {"arch": "tiny"}

    cfg3 = TrainConfig(epochs=3, lr=0.05, warmup_epochs=1)
    resumed = fit(
        tiny.tiny_cnn(),
        _loader(),
        _loader(20, seed=7),
        cfg3,
        tmp_path,
        resume=True,
        progress=False,
        on_epoch_end=lambda e, r: seen.append(e),
    )
    assert seen == [0, 1, 2]
    assert [r["epoch"] for r in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][:2] == rows
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def _run_script(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPTS / "train_tiny.py"), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    """Kill at epoch 2, step 3 (48 images/epoch, batch 8), resume: same weights as no crash."""
    full = _run_script("--out", tmp_path / "full", "--final", tmp_path / "full.pt")
    kill_at = 2 * 48 + 3 * 8 + 1
    crashed = _run_script("--out", tmp_path / "crash", "--kill-at", kill_at)
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    assert load_training_state(tmp_path / "crash" / "last.pt")["epoch"] == 1
    resumed = _run_script("--out", tmp_path / "crash", "--resume", "--final", tmp_path / "res.pt")
    for proc in (full, resumed):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]

    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "res.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = tiny.tiny_cnn().state_dict()  # sanity: training moved the weights
    assert not torch.equal(init["0.weight"], a["0.weight"])

    def rows(d):
        drop = ("time", "images_per_s")
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]

    assert rows("crash") == rows("full") and len(rows("full")) == 4


def test_recipe_names_match_the_training_tables():
    from chip.recipe import AMP_MODES, SCHEDULE_NAMES
    from chip.train import SCHEDULES
    from chip.utils import AMP_DTYPES

    assert tuple(SCHEDULES) == SCHEDULE_NAMES and tuple(AMP_DTYPES) == AMP_MODES
