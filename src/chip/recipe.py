"""Training recipes as plain data (no torch import): :class:`TrainConfig` and its defaults.

The defaults of :class:`TrainConfig` are the paper's CIFAR-10 fine-tuning recipe
(``docs/method.md`` section 5); :data:`BASELINE_DEFAULTS` are what ``chip train`` and ``chip run``
change for training from scratch. :mod:`chip.train` runs a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ChipError

__all__ = ["AMP_MODES", "BASELINE_DEFAULTS", "SCHEDULE_NAMES", "TrainConfig"]

SCHEDULE_NAMES = ("cosine", "step", "constant")
"""Learning-rate schedules (``chip.train.SCHEDULES`` has their functions)."""

AMP_MODES = ("none", "bf16", "fp16")
"""Mixed-precision modes (``chip.utils.AMP_DTYPES`` has their autocast dtypes)."""

BASELINE_DEFAULTS = {"epochs": 200, "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1}
"""The :class:`TrainConfig` fields that differ when training a baseline from scratch."""


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters; defaults are the paper's CIFAR-10 recipe (docs/method.md section 5)."""

    epochs: int = 400
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-3
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: int = 5
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    seed: int = 0
    sync_bn: bool = False
    log_every: int = 10
    clip_grad: float | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.schedule not in SCHEDULE_NAMES:
            raise ChipError(
                f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULE_NAMES)}"
            )
        if self.amp not in AMP_MODES:
            raise ChipError(f"unknown amp {self.amp!r}: expected one of {', '.join(AMP_MODES)}")
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "log_every": self.log_every >= 1,
            "clip_grad": self.clip_grad is None or self.clip_grad > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ChipError(
                f"invalid train config {values}: expected epochs/batch_size/log_every >= 1, "
                "lr > 0, 0 <= momentum < 1, weight_decay/warmup_epochs >= 0, "
                "0 <= label_smoothing < 1, clip_grad None or > 0"
            )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a mapping (e.g. YAML); unknown keys raise :class:`ChipError`."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ChipError(
                f"unknown train config key(s) {', '.join(unknown)}: valid keys are "
                f"{', '.join(valid)}"
            )
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain-Python dict (milestones as a list), safe for JSON and ``weights_only`` loads."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d
