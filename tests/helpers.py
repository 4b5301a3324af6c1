"""Shared test data (importable from the tests: pytest puts this folder on sys.path)."""

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).parent / "scripts"


def load_module(path: Path, name: str):
    """Import the file ``path`` as module ``name``, registered in ``sys.modules`` (dataclasses
    with postponed annotations look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """Import ``tests/scripts/<name>.py`` (scripts that also run as subprocesses) as a module."""
    return load_module(SCRIPTS / f"{name}.py", f"chip_test_{name}")


# a whole `chip run` in a few seconds: ResNet-20 on 48 synthetic 8x8 images
TINY_RUN = {
    "arch": "resnet20",
    "seed": 0,
    "threads": 1,
    "data": {
        "name": "synthetic",
        "batch_size": 16,
        "image_size": 8,
        "options": {"train_size": 48, "val_size": 32, "num_classes": 4},
    },
    "baseline": {"epochs": 1, "warmup_epochs": 0, "lr": 0.05},
    "calibration": {"batches": 1, "batch_size": 16},
    "target": {"flops": 0.5},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "lr": 0.01},
}


# ------------------------------------------------------------------ IDX (MNIST-format) files


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, array, gz):
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(root, rng, gz, train=5, test=4):
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", train), ("t10k", test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0] = 0
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz)
        out += [x, y]
    return tuple(out)
