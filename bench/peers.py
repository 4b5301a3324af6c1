"""Prune a model to a MACs budget with two peer tools, for the studies that compare them with chip.

* :func:`tp_prune`: Torch-Pruning 1.6.1 (``tp.pruner.BasePruner``, the old ``MetaPruner``) with
  ``GroupMagnitudeImportance(p=2)`` (L2 norm of every weight in a channel group), global or
  per-layer ranking, pruned in small iterative steps until the MACs budget is met.
* :func:`fastnas_prune`: NVIDIA ModelOpt 0.47.0 FastNAS (``modelopt.torch.prune``, mode
  ``"fastnas"``): per-layer sensitivity of a score (held-out top-1 or loss) to each width, then a
  binary search for the best sub-net under a FLOPs limit.

MACs are chip's (:func:`chip.count`): multiply-accumulates of conv and linear layers for ONE image.
Both functions work on a deep copy and return ``(pruned_model, achieved_fraction)`` where
``achieved_fraction = pruned MACs / original MACs`` (the caller checks it against the budget).
The peer packages are imported inside the functions, so this module imports without them::

    pip install torch-pruning==1.6.1
    pip install nvidia-modelopt==0.47.0 requests huggingface_hub torchprofile==0.0.4

Model-specific note: chip's CIFAR ResNets use an option-A pad shortcut (``PadShortcut``) that
neither tool knows. Torch-Pruning gets chip's own pruner for it (``customized_pruners``), so it
prunes the residual streams too; FastNAS keeps the stem and the three residual streams at full
width (measured on resnet20) and prunes only the inner conv of each block.

    python bench/peers.py          # CPU smoke run on random Fashion-MNIST-shaped data (~2 min)
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import chip

FASTNAS_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # ModelOpt's default width grid


def macs_of(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """chip's MACs of ``model`` for one image shaped like ``example_inputs`` (N, C, H, W)."""
    return chip.count(model, tuple(example_inputs.shape)).macs


def _custom_tp_pruners() -> dict:
    """Torch-Pruning pruners for layers it cannot trace (chip's pad shortcut and any registered)."""
    from chip.groups import CUSTOM_PRUNERS, PadShortcutPruner
    from chip.models import PadShortcut

    return {PadShortcut: PadShortcutPruner(), **CUSTOM_PRUNERS}


def tp_prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    macs_fraction: float,
    *,
    global_pruning: bool,
    ignored_layers: list[nn.Module] | None = None,
    steps: int = 200,
    max_ratio: float = 0.9,
) -> tuple[nn.Module, float]:
    """Torch-Pruning (L2 group magnitude) of a copy of ``model`` down to a MACs budget.

    Args:
        model: the model to prune (left unchanged); channels on axis 1 (NCHW).
        example_inputs: an input batch (N, C, H, W) on the model's device, for tracing and MACs.
        macs_fraction: budget in (0, 1]: stop at the first step where
            ``MACs(pruned) <= macs_fraction * MACs(model)``.
        global_pruning: rank channels of all groups together (True) or prune every group by the
            same ratio (False).
        ignored_layers: layers of ``model`` whose OUTPUT channels are kept; None = the last
            ``nn.Linear`` (the classifier).
        steps: Torch-Pruning ``iterative_steps``; step ``k`` prunes a channel ratio of
            ``k / steps * max_ratio`` (so one step removes ``max_ratio / steps`` of the channels).
        max_ratio: Torch-Pruning ``pruning_ratio`` reached at the last step.

    Returns:
        ``(pruned_copy, achieved_fraction)``, the copy in eval mode, at the first step meeting the
        budget: ``achieved_fraction <= macs_fraction``, below it by up to one step's worth
        (per-layer pruning narrows all layers of one width at once: 0.480 for a 0.5 budget on
        resnet20). Takes ~1-2 s on resnet20 at 28x28 (one CPU thread).

    Raises:
        ValueError: ``macs_fraction`` not in (0, 1], or the budget not met after all ``steps``.
    """
    import torch_pruning as tp

    if not 0 < macs_fraction <= 1:
        raise ValueError(f"macs_fraction must be in (0, 1], got {macs_fraction}")
    names = {m: n for n, m in model.named_modules()}
    model = copy.deepcopy(model).eval()
    copies = dict(model.named_modules())
    if ignored_layers is None:
        ignored_layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    else:  # the caller names layers of the original: use their copies
        ignored_layers = [copies[names[m]] for m in ignored_layers]
    base = macs_of(model, example_inputs)
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=global_pruning,
        pruning_ratio=max_ratio,
        iterative_steps=steps,
        ignored_layers=ignored_layers,
        customized_pruners=_custom_tp_pruners(),
    )
    frac = 1.0
    while frac > macs_fraction:
        if pruner.current_step >= steps:
            raise ValueError(
                f"Torch-Pruning reached {frac:.3f} of the MACs, budget {macs_fraction}"
            )
        pruner.step()
        frac = macs_of(model, example_inputs) / base
    return model, frac


@torch.no_grad()
def evaluate(model: nn.Module, loader, score: str = "top1") -> float:
    """Score ``model`` as is on (x, y) batches: ``"top1"`` accuracy in %, or ``"loss"``: minus
    the mean cross-entropy (nats per image)."""
    device = next(model.parameters()).device
    hits = loss = n = 0
    for x, y in loader:
        logits = model(x.to(device))
        y = y.to(device)
        hits += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return 100.0 * hits / n if score == "top1" else -loss / n


def fastnas_prune(
    model: nn.Module,
    train_loader,
    score_loader,
    macs_fraction: float,
    example_inputs: torch.Tensor,
    *,
    score: str = "loss",
    ratios: tuple[float, ...] = FASTNAS_RATIOS,
    divisor: int = 1,
    calib_batch: int | None = None,
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """ModelOpt FastNAS pruning of a copy of ``model`` to a MACs budget.

    FastNAS measures, for every searchable width (conv ``out_channels``: ``ratios`` of the
    original, rounded to multiples of ``divisor``), how much the score drops when only that conv
    is narrowed, then binary-searches one sensitivity threshold for the best-scoring sub-net under
    the FLOPs limit (~12 steps). Every candidate gets its BatchNorm statistics recalibrated on 50
    cached batches before it is scored, so the cost is about ``len(ratios)`` x (searchable convs)
    x (50 calibration batches + one pass over ``score_loader``).

    Args:
        model: the model to prune (left unchanged).
        train_loader: (x, y) batches for BatchNorm recalibration; the first 50 are used, cycled
            if there are fewer (ModelOpt recalibrates only with a full 50-batch queue).
        score_loader: held-out (x, y) batches the search maximizes ``score`` on; keep it small.
        macs_fraction: budget in (0, 1]; the limit given to ModelOpt is
            ``2 * macs_fraction * MACs(model)`` FLOPs (it counts 2 FLOPs per conv/linear MAC,
            plus pooling; BatchNorm is not counted).
        example_inputs: an input batch (N, C, H, W); its first image is ModelOpt's dummy input.
        score: ``"loss"`` or ``"top1"`` (see :func:`evaluate`). It must vary with the width: a
            width whose score does not drop counts as free, and so do all wider ones, so a flat
            or coarse score shrinks convs far below the budget (resnet20, 256 held-out images,
            budget 0.5: ``"top1"`` gave 0.24 of the MACs, ``"loss"`` 0.40).
        ratios: width choices as fractions of each conv's channels (default: ModelOpt's 5 % grid).
        divisor: channel multiple (ModelOpt's default 32 would freeze 16- and 32-channel convs).
        calib_batch: images kept from each calibration batch (None = all); BN recalibration of
            every candidate uses ``50 * calib_batch`` images and dominates the run time.
        verbose: print ModelOpt's search-space tables, progress bars and search stats.

    Returns:
        ``(pruned_copy, achieved_fraction)``: a plain ``nn.Module`` of the original classes in eval
        mode (ModelOpt's export, its ``_modelopt_state`` attributes removed) and its chip MACs
        over the original's (<= ``macs_fraction``, often well below with a coarse score). Its
        BatchNorm statistics are those ModelOpt estimated in the search; re-estimating them on
        the exported model with the same 50 batches gives different ones (from the second block
        on, measured on resnet20), so compare tools after the same BN treatment.

    Raises:
        ValueError: ``macs_fraction`` not in (0, 1] or an unknown ``score``; also (from ModelOpt)
            a budget below the smallest sub-net of the search space.
    """
    import modelopt.torch.prune as mtp

    if not 0 < macs_fraction <= 1:
        raise ValueError(f"macs_fraction must be in (0, 1], got {macs_fraction}")
    if score not in ("top1", "loss"):
        raise ValueError(f"score must be 'top1' or 'loss', got {score!r}")
    model = copy.deepcopy(model).eval()
    device = next(model.parameters()).device
    dummy = example_inputs[:1].to(device)
    base = macs_of(model, dummy)
    calib = [
        x[:calib_batch].to(device) for x, _ in itertools.islice(itertools.cycle(train_loader), 50)
    ]
    convs = {"channels_ratio": tuple(ratios), "channel_divisor": divisor}
    rules = {"nn.Conv2d": {"*": convs}, "nn.BatchNorm2d": {"*": {"feature_divisor": divisor}}}
    # model.eval() is what makes ModelOpt recalibrate BN for the selected candidate (a patched
    # eval hook); the sensitivity pass does not call it itself, so the score function must.
    score_func = lambda m: evaluate(m.eval(), score_loader, score)  # noqa: E731
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet:
        warnings.filterwarnings("ignore", message=".*[Cc]heckpoint.*")  # a fresh search each call
        model, _ = mtp.prune(
            model,
            mode=[("fastnas", rules)],
            constraints={"flops": 2.0 * macs_fraction * base},
            dummy_input=dummy,
            config={
                "data_loader": calib,
                "collect_func": lambda x: x,
                "score_func": score_func,
                "checkpoint": f"{tmp}/search.pth",
                "verbose": verbose,
            },
        )
    for key in ("_modelopt_state", "_modelopt_state_version"):
        model.__dict__.pop(key, None)
    return model, macs_of(model, dummy) / base


def _smoke() -> None:
    """tp_prune (global, per layer) and fastnas_prune at 50 % and 30 % MACs on the CPU.

    Data: random 1x28x28 images whose label 0..9 shifts their mean brightness, so that a resnet20
    trained on them for one epoch scores above chance and FastNAS has a real score to keep.
    """
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def loader(n: int) -> DataLoader:
        y = torch.randint(0, 10, (n,))
        x = torch.randn(n, 1, 28, 28) + 0.1 * (y.view(-1, 1, 1, 1) - 4.5)
        return DataLoader(TensorDataset(x, y), batch_size=64)

    train, held_out = loader(50 * 64), loader(4 * 64)
    model = chip.models.create("resnet20", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for xb, yb in train:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    top1 = evaluate(model, held_out)
    print(f"trained 1 epoch in {time.perf_counter() - t0:.1f} s: held-out top-1 {top1:.1f} %")
    x = next(iter(held_out))[0]
    base = chip.count(model, (1, 1, 28, 28))
    print(f"resnet20 1x28x28: {base.macs / 1e6:.2f}M MACs, {base.params / 1e3:.1f}K params")
    runs = {
        "tp global": lambda f: tp_prune(model, x, f, global_pruning=True),
        "tp per-layer": lambda f: tp_prune(model, x, f, global_pruning=False),
        "fastnas": lambda f: fastnas_prune(
            model, train, held_out, f, x, ratios=(0.2, 0.4, 0.6, 0.8, 1.0), calib_batch=16
        ),
    }
    for name, run in runs.items():
        for frac in (0.5, 0.3):
            t0 = time.perf_counter()
            pruned, achieved = run(frac)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                shape = tuple(pruned.eval()(x[:8]).shape)
            top1 = evaluate(pruned, held_out)
            params = sum(p.numel() for p in pruned.parameters())
            print(
                f"{name:12s} budget {frac:.2f}: MACs {achieved:.3f}, params {params / 1e3:.1f}K, "
                f"top-1 {top1:.1f} %, {seconds:.1f} s, logits {shape}"
            )
            assert shape == (8, 10)


if __name__ == "__main__":
    _smoke()
