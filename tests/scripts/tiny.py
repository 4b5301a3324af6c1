"""Tiny model and synthetic data shared by the training tests and their subprocess scripts."""

from __future__ import annotations

import os
import signal

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset


def tiny_cnn(num_classes: int = 4, dropout: float = 0.2) -> nn.Sequential:
    """Conv-BN-ReLU-Dropout-pool-linear: exercises BN buffers and the dropout RNG."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def make_tensors(n: int, num_classes: int = 4, size: int = 8, seed: int = 123):
    """Images ``(n, 3, size, size)`` and labels that depend on the images (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    score = x.mean(dim=(2, 3)) @ torch.randn(3, num_classes, generator=g)
    y = score.argmax(dim=1)
    return x, y


def make_dataset(n: int, num_classes: int = 4, seed: int = 123) -> TensorDataset:
    return TensorDataset(*make_tensors(n, num_classes, seed=seed))


class AugmentedDataset(Dataset):
    """Random flip + noise from the global torch RNG; SIGKILLs itself at item call ``kill_at``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kill_at: int | None = None):
        self.x, self.y, self.kill_at, self.calls = x, y, kill_at, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        img = self.x[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img + 0.05 * torch.randn_like(img), self.y[i]
