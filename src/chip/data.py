"""Datasets and data loaders by name, with the standard transforms; no network unless asked.

A table (:data:`DATASETS`) maps a name to a builder. Every builder returns ``(train, val, info)``:
two map-style datasets yielding ``(image_tensor, int_label)`` and a :class:`DatasetInfo`.

======================  =====================================================================
name                    source (``root``)
======================  =====================================================================
``cifar10``             torchvision's layout: ``root/cifar-10-batches-py/{data_batch_1..5,
                        test_batch,batches.meta}`` (python pickles)
``cifar100``            ``root/cifar-100-python/{train,test,meta}``
``imagenet``            ImageFolder: ``root/train/<class>/*`` and ``root/val/<class>/*``
``mnist``               IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``root``
                        (or ``root/MNIST/raw``, where torchvision downloads them)
``fashion-mnist``       the same IDX names; default root ``/usr/share/datasets/fashion-mnist``
                        (Debian's ``dataset-fashion-mnist``), or ``root/FashionMNIST/raw``
``digits``              scikit-learn's bundled 8x8 digits (no files, no network)
``synthetic``           class patterns plus noise generated on the fly (tests, benchmarks)
======================  =====================================================================

Loaders: :func:`build_loader` (training / evaluation, optionally distributed) and
:func:`calibration_loader` (the seeded subset of augmented training images that CHIP scores on).
Missing or malformed data raises a one-line :class:`~chip.errors.ChipError` that names the path
and the expected layout.
"""

from __future__ import annotations

import contextlib
import gzip
import pickle
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
from torchvision import transforms as T

from chip.errors import ChipError

__all__ = [
    "DATASETS",
    "DatasetEntry",
    "ArrayDataset",
    "DatasetInfo",
    "SeededItems",
    "SyntheticDataset",
    "Resized",
    "build_data",
    "build_datasets",
    "build_loader",
    "calibration_loader",
    "dataset_names",
    "data_info",
    "get_dataset_info",
    "read_idx",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a pipeline need to know about a dataset.

    ``image_size`` is ``(H, W)`` of the tensors the *validation* transform yields (training crops
    have the same size). ``mean``/``std`` are the per-channel statistics used by ``Normalize``.
    ``classes`` holds the class names when known (may be empty).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------------------------
# generic datasets and seeding helpers
# --------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """Images held in memory as one ``(N, C, H, W)`` tensor plus integer labels.

    Items are ``(transform(images[i]), labels[i])``; ``images`` is typically ``uint8`` (the
    transform then starts with ``ConvertImageDtype``, the tensor equivalent of ``ToTensor``).
    ``targets`` is a list of ints, as in torchvision's datasets.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int], transform=None, classes=()):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N == len(labels) = {len(labels)}")
        self.images = images
        self.targets = [int(y) for y in labels]
        self.transform = transform
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Seed torch (CPU), ``random`` and NumPy's global RNGs; restore their states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededItems(Dataset):
    """Wrap a dataset so that item ``i`` is drawn with RNGs seeded from ``(seed, i)``.

    Random augmentation then becomes a pure function of ``(seed, i)``: the same on every call,
    in any order, in any worker. The callers' global RNG states are left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded_rng(_derive_seed(self.seed, index)):
            return self.dataset[index]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Share memory with ``array`` when it is contiguous and writable, else copy it once."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's pickled-batch layout, parsed here without md5 checks)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    downloader: Callable[..., Any]
    expected: str


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        torchvision.datasets.CIFAR10,
        "{data_batch_1..5,test_batch}",
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        torchvision.datasets.CIFAR100,
        "{train,test}",
    ),
}


def _str_keys(obj: Mapping) -> dict:
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: CIFAR's batches are pickles, but a file
    that asks for any other callable (the way a pickle runs code) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} (only arrays, lists, dicts and strings allowed)"
            )
        return super().find_class(module, name)


def _load_pickle(path: Path, title: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ChipError(f"malformed {title} file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise ChipError(f"malformed {title} file {path}: expected a pickled dict")
    return _str_keys(obj)


def _load_cifar_batch(path: Path, spec: _CifarLayout) -> tuple[np.ndarray, list[int]]:
    """One pickled batch -> (uint8 (n, 3, 32, 32), labels)."""
    batch = _load_pickle(path, spec.title)
    data, labels = batch.get("data"), batch.get(spec.label_key)
    want = f"expected keys b'data' (uint8, n x 3072) and b'{spec.label_key}'"
    if data is None or labels is None:
        raise ChipError(f"malformed {spec.title} file {path}: {want}, got {sorted(batch)}")
    data = np.asarray(data)
    labels = [int(y) for y in labels]
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(data) != len(labels)
    ):
        raise ChipError(
            f"malformed {spec.title} file {path}: {want} with n = {len(labels)} labels, "
            f"got data {data.dtype} {tuple(data.shape)}"
        )
    if labels and not 0 <= min(labels) <= max(labels) < spec.num_classes:
        raise ChipError(
            f"malformed {spec.title} file {path}: labels must lie in 0..{spec.num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_names(folder: Path, spec: _CifarLayout) -> tuple[str, ...]:
    path = folder / spec.meta_file
    if not path.exists():
        return ()
    names = _load_pickle(path, spec.title).get(spec.names_key)
    if names is None:
        raise ChipError(f"malformed {spec.title} meta file {path}: no b'{spec.names_key}'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_info(name: str, root: Path) -> DatasetInfo:
    spec = _CIFAR[name]
    return DatasetInfo(name, spec.num_classes, 3, (32, 32), spec.mean, spec.std)


def _cifar_transforms(spec: _CifarLayout, train_augment: bool):
    to_float = [T.ConvertImageDtype(torch.float32), T.Normalize(spec.mean, spec.std)]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train_augment else []
    return T.Compose(augment + to_float), T.Compose(to_float)


def _build_cifar(name: str, root: Path, *, train_augment: bool, download: bool):
    spec = _CIFAR[name]
    folder = root / spec.folder
    needed = [folder / f for f in (*spec.train_files, spec.test_file)]
    if download and not all(p.is_file() for p in needed):
        spec.downloader(str(root), train=True, download=True)
        spec.downloader(str(root), train=False, download=True)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise ChipError(
            f"{spec.title} not found at {root}: expected {folder}/{spec.expected} "
            f"(torchvision's layout; missing {missing[0].name}); pass --download to fetch it"
        )
    parts = [_load_cifar_batch(folder / f, spec) for f in spec.train_files]
    train_x = np.concatenate([x for x, _ in parts])
    train_y = [y for _, ys in parts for y in ys]
    val_x, val_y = _load_cifar_batch(folder / spec.test_file, spec)
    classes = _cifar_names(folder, spec)
    train_tf, val_tf = _cifar_transforms(spec, train_augment)
    train = ArrayDataset(_as_tensor(train_x), train_y, train_tf, classes)
    val = ArrayDataset(_as_tensor(val_x), val_y, val_tf, classes)
    return train, val, replace(_cifar_info(name, root), classes=classes)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip) with ``ndim`` dimensions into a uint8 array.

    The header is two zero bytes, the type code ``0x08`` (unsigned byte), the number of
    dimensions, then one big-endian int32 per dimension. Anything else, or a data section whose
    length differs from the product of the dimensions, raises :class:`ChipError`.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ChipError(f"malformed IDX file {path}: cannot read it ({e})") from None
    magic = 0x800 + ndim
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ChipError(
            f"malformed IDX file {path}: magic number {got}, expected {magic:08x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    header = 4 + 4 * ndim
    if any(d < 0 for d in dims) or len(raw) - header != int(np.prod(dims)):
        raise ChipError(
            f"malformed IDX file {path}: header says {dims} = {int(np.prod(dims))} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


@dataclass(frozen=True)
class _IdxLayout:
    title: str
    subdir: str  # where torchvision's downloader puts the raw files, relative to root
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    classes: tuple[str, ...]
    downloader: Callable[..., Any]


_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "val_images": ("t10k-images-idx3-ubyte", 3),
    "val_labels": ("t10k-labels-idx1-ubyte", 1),
}

_IDX_SETS = {
    "mnist": _IdxLayout(
        "MNIST",
        "MNIST/raw",
        (0.1307,),
        (0.3081,),
        False,
        tuple("0123456789"),
        torchvision.datasets.MNIST,
    ),
    "fashion-mnist": _IdxLayout(
        "Fashion-MNIST",
        "FashionMNIST/raw",
        (0.2860,),
        (0.3530,),
        True,
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        torchvision.datasets.FashionMNIST,
    ),
}


def _find_idx(root: Path, spec: _IdxLayout) -> dict[str, Path] | None:
    """The four IDX paths in ``root`` or ``root/<torchvision subdir>``, or None if incomplete."""
    for folder in (root, root / spec.subdir):
        found = {}
        for key, (stem, _) in _IDX_FILES.items():
            hits = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
            if hits:
                found[key] = hits[0]
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _idx_info(name: str, root: Path) -> DatasetInfo:
    spec = _IDX_SETS[name]
    return DatasetInfo(name, 10, 1, (28, 28), spec.mean, spec.std, spec.classes)


def _load_idx_split(images: Path, labels: Path, title: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if x.shape[1:] != (28, 28) or len(x) != len(y):
        raise ChipError(
            f"malformed {title} files {images.name}/{labels.name}: expected n x 28 x 28 images "
            f"and n labels, got {x.shape} and {y.shape}"
        )
    if len(y) and y.max() > 9:
        raise ChipError(f"malformed {title} labels {labels}: expected values 0..9")
    return x[:, None], y


# where a dataset can be had without a network
_INSTALL_HINTS = {
    "fashion-mnist": " (needs a network), or install it with `apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu; files in /usr/share/datasets/fashion-mnist)",
}


def _build_idx(name: str, root: Path, *, train_augment: bool, download: bool):
    spec = _IDX_SETS[name]
    files = _find_idx(root, spec)
    if files is None and download:
        spec.downloader(str(root), train=True, download=True)
        spec.downloader(str(root), train=False, download=True)
        files = _find_idx(root, spec)
    if files is None:
        names = ",".join(stem for stem, _ in _IDX_FILES.values())
        hint = _INSTALL_HINTS.get(name, "")
        raise ChipError(
            f"{spec.title} not found at {root}: expected {root}/{{{names}}}[.gz] (IDX files, "
            f"also looked in {root / spec.subdir}); pass --download to fetch it{hint}"
        )
    train_x, train_y = _load_idx_split(files["train_images"], files["train_labels"], spec.title)
    val_x, val_y = _load_idx_split(files["val_images"], files["val_labels"], spec.title)
    to_float = [T.ConvertImageDtype(torch.float32), T.Normalize(spec.mean, spec.std)]
    augment = [T.RandomCrop(28, padding=2)] + ([T.RandomHorizontalFlip()] if spec.flip else [])
    train_tf = T.Compose((augment if train_augment else []) + to_float)
    train = ArrayDataset(_as_tensor(train_x), train_y, train_tf, spec.classes)
    val = ArrayDataset(_as_tensor(val_x), val_y, T.Compose(to_float), spec.classes)
    return train, val, _idx_info(name, root)


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# --------------------------------------------------------------------------------------------


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _imagenet_info(name: str, root: Path, image_size: int = 224) -> DatasetInfo:
    """Counts the class folders of ``root/train`` when present, else assumes ImageNet-1k."""
    classes = tuple(_class_dirs(root / "train"))
    return DatasetInfo(
        name, len(classes) or 1000, 3, _pair(image_size), IMAGENET_MEAN, IMAGENET_STD, classes
    )


def _build_imagenet(
    name: str, root: Path, *, train_augment: bool, download: bool, image_size: int = 224
):
    expected = (
        f"expected {root}/train/<class>/<images> and {root}/val/<class>/<images> "
        f"(ImageFolder layout)"
    )
    if download:
        raise ChipError(f"{name} cannot be downloaded automatically: {expected}")
    train_dirs, val_dirs = _class_dirs(root / "train"), _class_dirs(root / "val")
    if not train_dirs or not val_dirs:
        raise ChipError(f"{name} images not found at {root}: {expected}")
    if train_dirs != val_dirs:
        raise ChipError(
            f"{name} at {root}: train/ has {len(train_dirs)} class folders and val/ has "
            f"{len(val_dirs)}; expected the same class folders in both"
        )
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    resize = int(round(image_size * 256 / 224))
    train_aug = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size)] + norm)
    train_tf = T.Compose(train_aug + norm) if train_augment else val_tf
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
        val = torchvision.datasets.ImageFolder(str(root / "val"), val_tf)
    except FileNotFoundError as e:
        raise ChipError(f"{name} at {root}: {e}; {expected}") from None
    return train, val, _imagenet_info(name, root, image_size)


# --------------------------------------------------------------------------------------------
# scikit-learn digits (bundled, no network): the demo's default data
# --------------------------------------------------------------------------------------------

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@lru_cache(maxsize=4)
def _digits_arrays(image_size: int):
    """(train_x, train_y, val_x, val_y) with images in [0, 1], upsampled bilinearly.

    Split: ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels,
    random_state=0)`` on the 1797 images (1437 train / 360 val), identical on every call.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    idx_train, idx_val = train_test_split(
        np.arange(len(bunch.target)),
        test_size=DIGITS_VAL_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    y = bunch.target
    return images[idx_train], y[idx_train], images[idx_val], y[idx_val]


def _digits_info(name: str, root: Path, image_size: int = 16, max_shift: int | None = None):
    """Mean/std are measured on the training split at this ``image_size``."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ChipError(f"digits: image_size must be a positive int, got {image_size!r}")
    train_x = _digits_arrays(image_size)[0]
    mean, std = float(train_x.mean()), float(train_x.std())
    return DatasetInfo(name, 10, 1, (image_size, image_size), (mean,), (std,), tuple("0123456789"))


def _build_digits(
    name: str,
    root: Path,
    *,
    train_augment: bool,
    download: bool,
    image_size: int = 16,
    max_shift: int | None = None,
):
    """Train augmentation: a random shift of up to ``max_shift`` pixels (default
    ``max(1, image_size // 8)``, i.e. one original 8x8 pixel), zero-filled."""
    info = _digits_info(name, root, image_size)
    shift = max(1, image_size // 8) if max_shift is None else int(max_shift)
    train_x, train_y, val_x, val_y = _digits_arrays(image_size)
    norm = T.Normalize(info.mean, info.std)
    augment = [T.RandomCrop(image_size, padding=shift)] if train_augment and shift > 0 else []
    train = ArrayDataset(train_x, train_y, T.Compose(augment + [norm]), info.classes)
    val = ArrayDataset(val_x, val_y, T.Compose([norm]), info.classes)
    return train, val, info


# --------------------------------------------------------------------------------------------
# synthetic: learnable class patterns + noise, generated per index
# --------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Item ``i`` = (pattern[label] + noise, label) with ``label = i % num_classes``.

    Each class pattern is a random ``in_channels x 4 x 4`` grid (seeded by ``seed``) upsampled
    bilinearly to ``image_size``: smooth, distinct, easy for a CNN to learn. The noise (std
    ``noise``) is drawn from a generator seeded by ``(seed, split, i)``, so item ``i`` is the same
    on every access and no images are stored: any ``size`` costs no memory.
    """

    def __init__(
        self,
        size: int,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size=32,
        seed: int = 0,
        split: int = 0,
        noise: float = 1.0,
    ):
        self.size, self.num_classes, self.in_channels = int(size), int(num_classes), in_channels
        self.image_size, self.seed, self.split, self.noise = _pair(image_size), seed, split, noise
        g = torch.Generator().manual_seed(_derive_seed(seed, 2**32))
        self.patterns = torch.randn(num_classes, in_channels, 4, 4, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        label = index % self.num_classes
        pattern = F.interpolate(
            self.patterns[label : label + 1],
            size=self.image_size,
            mode="bilinear",
            align_corners=False,
        )[0]
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.split, index))
        return pattern + self.noise * torch.randn(pattern.shape, generator=g), label


_SYNTHETIC_CHECKS = {
    "num_classes": lambda v: isinstance(v, int) and v >= 2,
    "in_channels": lambda v: isinstance(v, int) and v >= 1,
    "train_size": lambda v: isinstance(v, int) and v >= 0,
    "val_size": lambda v: isinstance(v, int) and v >= 0,
}


def _synthetic_info(
    name: str,
    root: Path,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size=32,
    train_size: int = 2048,
    val_size: int = 512,
    seed: int = 0,
    noise: float = 1.0,
) -> DatasetInfo:
    """Patterns and noise are already zero-mean, so mean 0 / std 1 (no Normalize)."""
    opts = dict(
        num_classes=num_classes, in_channels=in_channels, train_size=train_size, val_size=val_size
    )
    for key, ok in _SYNTHETIC_CHECKS.items():
        if not ok(opts[key]):
            raise ChipError(f"synthetic: bad {key}={opts[key]!r} (expected a positive int)")
    return DatasetInfo(
        name,
        num_classes,
        in_channels,
        _pair(image_size),
        (0.0,) * in_channels,
        (1.0,) * in_channels,
        tuple(str(c) for c in range(num_classes)),
    )


def _build_synthetic(name: str, root: Path, *, train_augment: bool, download: bool, **opts):
    info = _synthetic_info(name, root, **opts)
    common = dict(
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size,
        seed=opts.get("seed", 0),
        noise=opts.get("noise", 1.0),
    )
    train = SyntheticDataset(opts.get("train_size", 2048), split=0, **common)
    val = SyntheticDataset(opts.get("val_size", 512), split=1, **common)
    return train, val, info


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetEntry:
    """One row of :data:`DATASETS`: builder, info function, accepted options, default root."""

    build: Callable[..., tuple[Dataset, Dataset, DatasetInfo]]
    info: Callable[..., DatasetInfo]
    options: tuple[str, ...] = ()
    default_root: str = "data"


DATASETS: dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry(partial(_build_cifar, "cifar10"), partial(_cifar_info, "cifar10")),
    "cifar100": DatasetEntry(partial(_build_cifar, "cifar100"), partial(_cifar_info, "cifar100")),
    "imagenet": DatasetEntry(
        partial(_build_imagenet, "imagenet"),
        partial(_imagenet_info, "imagenet"),
        ("image_size",),
        "data/imagenet",
    ),
    # any ImageFolder tree (ROOT/train/<class>/..., ROOT/val/<class>/...), with ImageNet's
    # transforms and normalisation at image_size
    "imagefolder": DatasetEntry(
        partial(_build_imagenet, "imagefolder"),
        partial(_imagenet_info, "imagefolder"),
        ("image_size",),
        "data/imagefolder",
    ),
    "mnist": DatasetEntry(
        partial(_build_idx, "mnist"), partial(_idx_info, "mnist"), default_root="data/mnist"
    ),
    "fashion-mnist": DatasetEntry(
        partial(_build_idx, "fashion-mnist"),
        partial(_idx_info, "fashion-mnist"),
        default_root="/usr/share/datasets/fashion-mnist",
    ),
    "digits": DatasetEntry(
        partial(_build_digits, "digits"),
        partial(_digits_info, "digits"),
        ("image_size", "max_shift"),
    ),
    "synthetic": DatasetEntry(
        partial(_build_synthetic, "synthetic"),
        partial(_synthetic_info, "synthetic"),
        ("num_classes", "in_channels", "image_size", "train_size", "val_size", "seed", "noise"),
    ),
}

_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}


def dataset_names() -> list[str]:
    """The valid dataset names, sorted."""
    return sorted(DATASETS)


def _lookup(name: str, opts: Mapping[str, Any]) -> tuple[str, DatasetEntry]:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise ChipError(f"unknown dataset {name!r}; expected one of {', '.join(dataset_names())}")
    entry = DATASETS[key]
    unknown = sorted(set(opts) - set(entry.options))
    if unknown:
        valid = ", ".join(entry.options) or "none"
        raise ChipError(f"dataset {key!r} has no option {unknown[0]!r}; valid options: {valid}")
    return key, entry


def _root(entry: DatasetEntry, root) -> Path:
    return Path(entry.default_root if root is None else root).expanduser()


def get_dataset_info(name: str, root=None, **opts) -> DatasetInfo:
    """Static description of dataset ``name`` (cheap; reads no images).

    For ``imagenet`` the class count is the number of folders in ``root/train`` when it
    exists, else 1000. Options are those of :func:`build_datasets` that change the info.
    """
    key, entry = _lookup(name, opts)
    return entry.info(_root(entry, root), **opts)


def build_datasets(
    name: str, root=None, *, train_augment: bool = True, download: bool = False, **opts
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, val, info)`` for dataset ``name`` (see the module docstring for layouts).

    ``train_augment=False`` gives the training set the validation transform. ``download=True``
    lets torchvision fetch CIFAR / MNIST / Fashion-MNIST into ``root`` when missing (never
    needed for ``digits`` and ``synthetic``; impossible for ImageNet). ``opts`` are per-dataset
    options (``image_size`` for imagenet/digits/synthetic; ``num_classes``, ``in_channels``,
    ``train_size``, ``val_size``, ``seed``, ``noise`` for synthetic; ``max_shift`` for digits).
    """
    key, entry = _lookup(name, opts)
    return entry.build(_root(entry, root), train_augment=train_augment, download=download, **opts)


# --------------------------------------------------------------------------------------------
# resizing and subsets (what chip run and the CLI build)
# --------------------------------------------------------------------------------------------


class Resized(Dataset):
    """Bilinear (antialiased) resize of every image tensor to ``size`` x ``size``."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        image = F.interpolate(
            image[None],
            size=(self.size, self.size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        return image, label


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most ``n`` items (indices ascending), or the dataset."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ChipError(f"subset size must be a positive int, got {n}")
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, sorted(torch.randperm(len(dataset), generator=g)[:n].tolist()))


def _dataset_options(
    name: str, image_size: int | None, options: Mapping | None
) -> tuple[dict, bool]:
    """Options for chip.data and whether the images still need resizing here."""
    opts = dict(options or {})
    entry = DATASETS.get(name.lower())
    native = entry is not None and "image_size" in entry.options
    if image_size is not None and native:
        opts["image_size"] = image_size
    return opts, image_size is not None and not native


def data_info(name: str, root=None, image_size: int | None = None, options: Mapping | None = None):
    """The :class:`chip.data.DatasetInfo` of a dataset as :func:`build_data` yields it."""
    opts, resize = _dataset_options(name, image_size, options)
    info = get_dataset_info(name, root, **opts)
    if resize:
        info = replace(info, image_size=(image_size, image_size))
    return info


def build_data(
    name: str,
    root=None,
    *,
    image_size: int | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    options: Mapping | None = None,
    seed: int = 0,
    train_augment: bool = True,
    download: bool = False,
):
    """``(train, val, info)`` of :func:`chip.data.build_datasets` with resizing and subsets."""
    opts, resize = _dataset_options(name, image_size, options)
    train, val, info = build_datasets(
        name, root, train_augment=train_augment, download=download, **opts
    )
    if resize:
        train, val = Resized(train, image_size), Resized(val, image_size)
        info = replace(info, image_size=(image_size, image_size))
    return _subset(train, train_subset, seed), _subset(val, val_subset, seed + 1), info


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------


def _seed_numpy_worker(worker_id: int) -> None:
    """DataLoader seeds torch and ``random`` per worker; give NumPy a distinct seed as well."""
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader for training (``train=True``: shuffled) or evaluation (in order).

    Training uses a ``RandomSampler`` driven by a ``torch.Generator`` seeded with ``seed`` (a new
    permutation every epoch, the same sequence of epochs for the same seed), evaluation a
    ``SequentialSampler``. Under torchrun, :func:`chip.distributed.shard_loader` turns either
    into one shard per process (what ``chip.train.fit`` does).

    ``drop_last=None`` means: drop the last partial batch when training, unless that would
    leave no batch at all. ``pin_memory`` is on when CUDA is available; workers persist between
    epochs when ``workers > 0`` and get their base seed from ``seed``.
    """
    if batch_size < 1:
        raise ChipError(f"batch_size must be a positive int, got {batch_size!r}")
    if train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_numpy_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(_derive_seed(seed, 1)),
    )


def calibration_loader(
    dataset: Dataset, num_batches: int = 5, batch_size: int = 128, seed: int = 0
) -> DataLoader:
    """The images CHIP scores channels on: ``num_batches x batch_size`` training images.

    The paper calibrates on 5 x 128 training images *with training augmentation*; pass the
    augmented training set. The subset is ``randperm(len(dataset))[:n]`` under a generator
    seeded with ``seed`` (all of the dataset if it is smaller), and item ``i`` is drawn with RNGs
    seeded from ``(seed, i)`` (:class:`SeededItems`), so two calls with the same seed yield
    identical tensors, whatever the global RNG state; different seeds give different batches.
    Under ``torch.distributed`` rank ``r`` of ``W`` takes items ``r::W`` of that subset, so the
    ranks together score each image exactly once.
    """
    if num_batches < 1 or batch_size < 1:
        raise ChipError(
            f"calibration needs num_batches >= 1 and batch_size >= 1, got "
            f"{num_batches} and {batch_size}"
        )
    total = len(dataset)
    if total == 0:
        raise ChipError("calibration dataset is empty; expected at least one training image")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(total, generator=generator)[: num_batches * batch_size].tolist()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun each rank scores a disjoint shard; calibrate() all-reduces the sums
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        indices = indices[rank::world]
    subset = Subset(SeededItems(dataset, seed), indices)
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator().manual_seed(seed),  # else iterating draws from global RNG
        num_workers=0,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
