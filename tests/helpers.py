"""Shared test data (importable from the tests: pytest puts this folder on sys.path)."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def load_script(name: str):
    """Import ``tests/scripts/<name>.py`` (scripts that also run as subprocesses) as a module."""
    spec = importlib.util.spec_from_file_location(f"chip_test_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# a whole `chip run` in a few seconds: ResNet-20 on 48 synthetic 8x8 images
TINY_RUN = {
    "arch": "resnet20",
    "seed": 0,
    "threads": 1,
    "data": {"name": "synthetic", "batch_size": 16, "image_size": 8,
             "options": {"train_size": 48, "val_size": 32, "num_classes": 4}},
    "baseline": {"epochs": 1, "warmup_epochs": 0, "lr": 0.05},
    "calibration": {"batches": 1, "batch_size": 16},
    "target": {"flops": 0.5},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "lr": 0.01},
}
