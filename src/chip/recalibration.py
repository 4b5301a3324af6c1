"""BatchNorm re-estimation after pruning: running statistics measured again on a few batches.

A pruned model keeps its BatchNorm running statistics from before pruning, but every layer
downstream of a pruned group now sees different inputs, so the statistics no longer describe
them and the accuracy right after pruning says little (EagleEye, ECCV 2020, "adaptive BN").
:func:`recalibrate_bn` replaces every BatchNorm's running mean and variance with the exact
statistics of the inputs it receives over ``num_batches`` batches, without gradients.

As :func:`torch.optim.swa_utils.update_bn`, the pass runs the BatchNorm layers in training mode
(each batch is normalised with its own statistics, so a layer's inputs do not depend on the
running statistics being replaced); unlike it, every other module stays in eval mode (dropout is
off) and the variance is the pooled unbiased variance of all the values seen (update_bn averages
per-batch variances, which misses the spread between batch means). Both agree on the mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .calibration import split_batch
from .errors import ChipError
from .utils import eval_mode, first_line

__all__ = ["recalibrate_bn"]


class _Moments:
    """Per-channel count, mean and sum of squared deviations in float64 (Chan et al.'s pairwise
    update, so batches merge exactly and without cancellation)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def __call__(self, module: nn.Module, inputs) -> None:
        x = inputs[0].detach().to(torch.float64)
        x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N*spatial)
        n = x.shape[1]
        mean = x.mean(1)
        m2 = ((x - mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


class BatchNormState:
    """A copy of the buffers (running statistics, batch count) of some BatchNorm layers;
    :meth:`restore` writes them back in place."""

    def __init__(self, bns: list[nn.Module]):
        self._saved = [
            (bn, {k: v.clone() for k, v in bn.named_buffers(recurse=False)}) for bn in bns
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for bn, buffers in self._saved:
                for k, v in buffers.items():
                    getattr(bn, k).copy_(v)


def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on its data.

    Args:
        model: any module (returned as it came when it has no BatchNorm with running stats);
            run on the device its parameters are on.
        loader: yields input tensors, ``(inputs, targets)`` pairs or dicts with an ``image`` key
            (as :func:`chip.calibrate`); typically training batches.
        num_batches: how many batches to use (>= 1); fewer is an error.

    Returns ``model`` itself, its BatchNorm layers' ``running_mean`` set to the mean and
    ``running_var`` to the unbiased variance of each channel over all (sample, position) values
    of their inputs, in float64 then cast; ``num_batches_tracked`` to the number of batches.
    Every module keeps its training flag and BatchNorm its momentum.

    Raises:
        ChipError: ``num_batches`` < 1, the loader runs out first, or a batch too small for
            batch statistics (one value per channel).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ChipError(f"num_batches must be a positive integer, got {num_batches!r}")
    bns = _batchnorms(model)
    if not bns:
        return model
    device = next(iter(model.parameters()), torch.empty(0)).device
    moments = {bn: _Moments() for bn in bns}
    handles = [bn.register_forward_pre_hook(moments[bn]) for bn in bns]
    before = BatchNormState(bns)
    seen = 0
    try:
        with eval_mode(model), torch.no_grad():
            for bn in bns:
                bn.train()
            for batch in loader:
                if seen == num_batches:
                    break
                try:
                    model(split_batch(batch).to(device))
                except ValueError as exc:  # "Expected more than 1 value per channel"
                    raise ChipError(
                        f"BatchNorm re-estimation failed on batch {seen + 1} "
                        f"({first_line(exc)}); expected batches of at least 2 images"
                    ) from None
                seen += 1
    finally:
        for h in handles:
            h.remove()
        before.restore()  # the training-mode pass moved them by the momentum: undo it
    if seen < num_batches:
        raise ChipError(
            f"BatchNorm re-estimation needs {num_batches} batches but the loader gave {seen}; "
            "expected a loader with at least that many batches"
        )
    with torch.no_grad():
        for bn, mom in moments.items():
            if mom.mean is None:  # a BatchNorm the forward never reached keeps its statistics
                continue
            var = mom.m2 / max(mom.n - 1, 1)
            bn.running_mean.copy_(mom.mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(num_batches)
    return model
