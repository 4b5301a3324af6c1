"""A user's own CNN, for the command-line tests: a residual add and a concatenation of two branches.

Loaded as ``tests/user_model.py:build`` (needs ``--trust-code``: chip imports it only then).
"""

import torch
import torch.nn as nn


class UserNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.left = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(3 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))  # residual add
        x = torch.cat([self.left(x), self.right(x)], 1)  # two branches
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def build(width: int = 8, num_classes: int = 10) -> nn.Module:
    return UserNet(width, num_classes)


def build_fixed() -> nn.Module:
    """A builder that takes no arguments: the data's class count is not passed to it."""
    return UserNet(8, 10)
