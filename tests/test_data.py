"""chip.data on tiny files written in the real on-disk formats (no network, no real datasets)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import idx_bytes, write_idx, write_mnist
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from chip.data import (
    DATASETS,
    build_datasets,
    build_loader,
    calibration_loader,
    dataset_names,
    get_dataset_info,
    read_idx,
)
from chip.errors import ChipError

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------------
# writers of the real formats
# ------------------------------------------------------------------------------------------------


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(rng, n):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[0] = 0  # an all-zero image: normalises to -mean/std
    return data


def write_cifar10(root, rng, per_batch=2, test=3):
    """cifar-10-batches-py/ as torchvision expects: 5 train batches, test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _cifar_images(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
        train_x.append(x)
        train_y += y
    test_x, test_y = _cifar_images(rng, test), rng.integers(0, 10, test).tolist()
    _pickle(folder / "test_batch", {b"data": test_x, b"labels": test_y})
    names = [f"class{i}".encode() for i in range(10)]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(train_x), train_y, test_x, test_y


def write_cifar100(root, rng, train=4, test=3):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", train), ("test", test)):
        x, y = _cifar_images(rng, n), rng.integers(0, 100, n).tolist()
        coarse = [v // 5 for v in y]
        _pickle(folder / split, {b"data": x, b"fine_labels": y, b"coarse_labels": coarse})
        out += [x, y]
    names = [f"fine{i}".encode() for i in range(100)]
    _pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    return tuple(out)


def write_image_folder(root, rng, per_class=2):
    """root/{train,val}/{cat,dog}/*.png; constant-colour images (colour recorded per file)."""
    colours = {}
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
                path = root / split / cls / f"{k}.png"
                Image.new("RGB", (40, 30), rgb).save(path)
                colours[(split, cls, k)] = rgb
    return colours


# ------------------------------------------------------------------------------------------------
# one case per dataset name: (name, root or None, options)
# ------------------------------------------------------------------------------------------------


def _case(name, tmp_path):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        write_cifar10(tmp_path, rng)
        return tmp_path, {}
    if name == "cifar100":
        write_cifar100(tmp_path, rng)
        return tmp_path, {}
    if name in ("mnist", "fashion-mnist"):
        write_mnist(tmp_path, rng, gz=True)
        return tmp_path, {}
    if name in ("imagenet", "imagefolder"):
        write_image_folder(tmp_path, rng)
        return tmp_path, {"image_size": 16}
    if name == "digits":
        return None, {"image_size": 12}
    return None, {"image_size": 8, "train_size": 20, "val_size": 10, "in_channels": 2}


EXPECTED = {  # name -> (num_classes, in_channels, (H, W), train size, val size)
    "cifar10": (10, 3, (32, 32), 10, 3),
    "cifar100": (100, 3, (32, 32), 4, 3),
    "mnist": (10, 1, (28, 28), 5, 4),
    "fashion-mnist": (10, 1, (28, 28), 5, 4),
    "imagenet": (2, 3, (16, 16), 4, 4),
    "imagefolder": (2, 3, (16, 16), 4, 4),
    "digits": (10, 1, (12, 12), 1437, 360),
    "synthetic": (10, 2, (8, 8), 20, 10),
}


def test_registry_lists_every_dataset():
    assert dataset_names() == sorted(EXPECTED) == sorted(DATASETS)


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_shapes_dtypes_labels(name, augment, tmp_path):
    root, opts = _case(name, tmp_path)
    train, val, info = build_datasets(name, root, train_augment=augment, **opts)
    classes, channels, size, n_train, n_val = EXPECTED[name]
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == (
        name,
        classes,
        channels,
        size,
    )
    assert len(info.mean) == len(info.std) == channels
    assert (len(train), len(val)) == (n_train, n_val)
    assert get_dataset_info(name, root, **opts) == info
    for ds in (train, val):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (channels, *size) and x.dtype == torch.float32
            assert isinstance(y, int) and 0 <= y < classes


# ------------------------------------------------------------------------------------------------
# pixel values against a plain numpy oracle: the right statistics, the right layout
# ------------------------------------------------------------------------------------------------


def _normalised(image_u8_chw, mean, std):
    m, s = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    return (image_u8_chw.astype(np.float64) / 255.0 - m) / s


@pytest.mark.parametrize(
    "name,writer,stats",
    [("cifar10", write_cifar10, CIFAR10_STATS), ("cifar100", write_cifar100, CIFAR100_STATS)],
)
def test_cifar_values_labels_and_stats(name, writer, stats, tmp_path):
    train_x, train_y, test_x, test_y = writer(tmp_path, np.random.default_rng(1))
    train, val, info = build_datasets(name, tmp_path, train_augment=False)
    assert (info.mean, info.std) == stats
    assert train.targets == list(train_y) and val.targets == list(test_y)
    expected_names = [f"class{i}" for i in range(10)] if name == "cifar10" else None
    if expected_names:
        assert list(info.classes) == expected_names
    else:
        assert info.classes[:2] == ("fine0", "fine1") and len(info.classes) == 100
    zero = val[0][0]
    torch.testing.assert_close(
        zero, (-torch.tensor(stats[0]) / torch.tensor(stats[1]))[:, None, None].expand(3, 32, 32)
    )
    for ds, raw in ((train, train_x), (val, test_x)):
        for i in range(len(ds)):
            want = _normalised(raw[i].reshape(3, 32, 32), *stats)
            np.testing.assert_allclose(ds[i][0].numpy(), want, rtol=1e-5, atol=1e-5)


def _crop_candidates(img, pad, flip):
    """{(dy, dx, flipped): crop} for every outcome of RandomCrop(size, padding=pad) [+ flip]."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy - pad, dx - pad, False)] = crop
            if flip:
                out[(dy - pad, dx - pad, True)] = crop[:, :, ::-1]
    return out


def _outcomes(x, candidates):
    keys, stack = list(candidates), np.stack(list(candidates.values()))
    close = np.abs(stack - x[None]).reshape(len(keys), -1).max(axis=1) <= 1e-5
    return [key for key, hit in zip(keys, close, strict=True) if hit]


@pytest.mark.parametrize(
    "name,pad,flip,stats",
    [
        ("cifar10", 4, True, CIFAR10_STATS),
        ("mnist", 2, False, MNIST_STATS),
        ("fashion-mnist", 2, True, FASHION_STATS),
    ],
)
def test_train_augmentation_is_crop_and_flip(name, pad, flip, stats, tmp_path):
    rng = np.random.default_rng(2)
    if name == "cifar10":
        raw = write_cifar10(tmp_path, rng)[0].reshape(-1, 3, 32, 32)
    else:
        raw = write_mnist(tmp_path, rng, gz=False)[0][:, None]
    train, _, _ = build_datasets(name, tmp_path)
    img = raw[1].astype(np.float64) / 255.0  # padding happens before normalisation (fill 0)
    m, s = np.asarray(stats[0])[:, None, None], np.asarray(stats[1])[:, None, None]
    # oracle: every crop/flip outcome, including mirrored ones even where none is expected
    candidates = {k: (v - m) / s for k, v in _crop_candidates(img, pad + 1, True).items()}
    seen = []
    for _ in range(40):
        hits = _outcomes(train[1][0].numpy(), candidates)
        assert len(hits) == 1  # a random image: exactly one outcome explains each draw
        seen.append(hits[0])
    assert max(max(abs(dy), abs(dx)) for dy, dx, _ in seen) == pad  # shifts up to pad, no more
    assert any(flipped for *_, flipped in seen) == flip


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name,stats", [("mnist", MNIST_STATS), ("fashion-mnist", FASHION_STATS)])
def test_idx_datasets_values(name, stats, gz, tmp_path):
    train_x, train_y, test_x, test_y = write_mnist(tmp_path, np.random.default_rng(3), gz=gz)
    train, val, info = build_datasets(name, tmp_path, train_augment=False)
    assert (info.mean, info.std) == stats
    assert train.targets == train_y.tolist() and val.targets == test_y.tolist()
    np.testing.assert_allclose(
        val[0][0].numpy(), np.full((1, 28, 28), -stats[0][0] / stats[1][0]), rtol=1e-5
    )
    for ds, raw in ((train, train_x), (val, test_x)):
        for i in range(len(ds)):
            want = _normalised(raw[i][None], *stats)
            np.testing.assert_allclose(ds[i][0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_idx_torchvision_raw_subfolder(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(4), gz=False)
    train, _, _ = build_datasets("mnist", tmp_path)
    assert len(train) == 5


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 28, 28)])
def test_read_idx_roundtrip(shape, gz, tmp_path):
    arr = np.random.default_rng(5).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx", arr, gz)
    np.testing.assert_array_equal(read_idx(path, len(shape)), arr)


def _malformed_cases():
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    return {
        "bad-magic": b"\x08\x03" + good[2:],
        "float-type": good[:2] + b"\x0d" + good[3:],
        "wrong-ndim": idx_bytes(np.zeros((2, 784), np.uint8)),
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "too-short": b"\0\0",
    }


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
def test_read_idx_rejects_malformed(case, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_malformed_cases()[case])
    with pytest.raises(ChipError, match="malformed IDX file") as err:
        read_idx(path, 3)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_malformed_idx_dataset_and_bad_gzip(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(6), gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ChipError, match="malformed IDX file .*train-labels"):
        build_datasets("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=True)  # 3 != 5
    with pytest.raises(ChipError, match="expected n x 28 x 28 images and n labels"):
        build_datasets("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------
# ImageFolder, digits, synthetic
# ------------------------------------------------------------------------------------------------


def test_image_folder_values(tmp_path):
    colours = write_image_folder(tmp_path, np.random.default_rng(7))
    train, val, info = build_datasets("imagenet", tmp_path, image_size=16)
    assert info.classes == ("cat", "dog") and info.num_classes == 2
    assert (info.mean, info.std) == IMAGENET_STATS
    assert sorted(val.targets) == [0, 0, 1, 1]
    for i, (path, label) in enumerate(val.samples):
        cls = ("cat", "dog")[label]
        assert f"/{cls}/" in path
        rgb = np.asarray(colours[("val", cls, int(path[-5]))], np.uint8)
        want = _normalised(np.broadcast_to(rgb[:, None, None], (3, 16, 16)), *IMAGENET_STATS)
        np.testing.assert_allclose(val[i][0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_image_folder_default_info_is_imagenet_1k(tmp_path):
    assert get_dataset_info("imagenet", tmp_path / "none").num_classes == 1000


def _digits_oracle(image_size):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0)[:, None].float()
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear")
    return images.clamp(0, 1).numpy(), digits.target


@pytest.mark.parametrize("image_size", [8, 16])
def test_digits_split_values_and_stats(image_size):
    train, val, info = build_datasets("digits", image_size=image_size, train_augment=False)
    images, labels = _digits_oracle(image_size)
    assert len(train) + len(val) == len(labels) == 1797
    assert len(val) == 360
    # stratified: every class gets ~20 % of its images in val
    counts = np.bincount(val.targets, minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(counts - 0.2) < 0.02)
    # each item is one original image, normalised with the training split's statistics
    train_raw = np.stack(
        [train[i][0].numpy() * info.std[0] + info.mean[0] for i in range(len(train))]
    )
    assert abs(train_raw.mean() - info.mean[0]) < 1e-5 and abs(train_raw.std() - info.std[0]) < 1e-4
    flat = images.reshape(len(images), -1)
    for i in range(0, len(val), 37):
        x = val[i][0].numpy() * info.std[0] + info.mean[0]
        j = int(np.argmin(np.abs(flat - x.reshape(1, -1)).max(axis=1)))
        np.testing.assert_allclose(x, images[j], atol=1e-5)
        assert labels[j] == val.targets[i]
    again = build_datasets("digits", image_size=image_size)[1]
    assert again.targets == val.targets


def test_digits_augmentation_is_a_small_shift():
    train, _, info = build_datasets("digits", image_size=16)
    image = train.images[3].numpy()  # in [0, 1]; shift by <= 2 px (one 8x8 pixel), zero-filled
    plain = (image - info.mean[0]) / info.std[0]
    candidates = {
        k: (c - info.mean[0]) / info.std[0] for k, c in _crop_candidates(image, 3, True).items()
    }
    seen = [_outcomes(train[3][0].numpy(), candidates) for _ in range(40)]
    # each draw is explained by an unflipped shift of at most 2 px
    assert all(any(max(abs(dy), abs(dx)) <= 2 and not f for dy, dx, f in hits) for hits in seen)
    assert any(not np.allclose(train[3][0].numpy(), plain) for _ in range(5))


def test_synthetic_deterministic_and_learnable():
    opts = dict(image_size=8, train_size=300, val_size=100, in_channels=3)
    train, val, info = build_datasets("synthetic", **opts)
    train2, _, _ = build_datasets("synthetic", **opts)
    other, _, _ = build_datasets("synthetic", seed=1, **opts)
    torch.testing.assert_close(train[5][0], train2[5][0])
    assert train[5][1] == train2[5][1]
    assert not torch.allclose(train[5][0], other[5][0])
    assert not torch.allclose(train[5][0], val[5][0])
    big = build_datasets("synthetic", train_size=10**9, image_size=4)[0]  # costs no memory
    assert len(big) == 10**9 and big[10**9 - 1][0].shape == (3, 4, 4)
    with pytest.raises(IndexError):
        big[10**9]

    def stack(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return torch.stack(xs).flatten(1), torch.tensor(ys)

    (x, y), (vx, vy) = stack(train), stack(val)
    # learnable: even a nearest-class-mean classifier fitted on train beats chance on val
    centroids = torch.stack([x[y == c].mean(0) for c in range(info.num_classes)])
    accuracy = (torch.cdist(vx, centroids).argmin(1) == vy).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# ------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------


def _indexed(n):
    return TensorDataset(torch.arange(n))


def _order(loader):
    return torch.cat([b[0] for b in loader]).tolist()


def test_build_loader_train_and_val():
    ds = _indexed(10)
    a = build_loader(ds, 3, train=True, seed=1)
    assert isinstance(a.sampler, RandomSampler) and a.drop_last
    assert a.pin_memory == torch.cuda.is_available()
    first = _order(a)
    assert len(first) == 9 and len(set(first)) == 9  # drop_last default when training
    assert first == _order(build_loader(ds, 3, train=True, seed=1))
    assert first != _order(build_loader(ds, 3, train=True, seed=2))
    assert _order(a) != first  # next epoch, new permutation
    v = build_loader(ds, 3, train=False)
    assert isinstance(v.sampler, SequentialSampler) and not v.drop_last
    assert _order(v) == list(range(10))
    assert len(_order(build_loader(ds, 32, train=True))) == 10  # no empty epoch
    w = build_loader(ds, 3, train=True, workers=1)
    assert w.persistent_workers and w.num_workers == 1


def test_build_loader_ignores_an_initialised_process_group(tmp_path):
    """Sharding is chip.distributed.shard_loader's job: build_loader gives the same plain loader
    inside a process group."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        loader = build_loader(_indexed(5), 2, train=True, seed=3)
        assert isinstance(loader.sampler, RandomSampler)
        assert _order(loader) == _order(build_loader(_indexed(5), 2, train=True, seed=3))
    finally:
        dist.destroy_process_group()


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_calibration_loader_deterministic_per_seed(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(8), per_batch=8)  # 40 augmented images
    train, _, _ = build_datasets("cifar10", tmp_path)
    a = _batches(calibration_loader(train, num_batches=3, batch_size=4, seed=0))
    torch.manual_seed(123)  # global RNG must not matter
    b = _batches(calibration_loader(train, num_batches=3, batch_size=4, seed=0))
    c = _batches(calibration_loader(train, num_batches=3, batch_size=4, seed=1))
    assert [x.shape for x, _ in a] == [(4, 3, 32, 32)] * 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=True))


def test_calibration_loader_small_dataset_uses_all_with_augmentation(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(9), per_batch=2)  # 10 images, 5 all-zero
    train, _, _ = build_datasets("cifar10", tmp_path)
    plain, _, _ = build_datasets("cifar10", tmp_path, train_augment=False)
    loader = calibration_loader(train, num_batches=3, batch_size=4, seed=3)
    batches = _batches(loader)  # 12 asked, 10 there: everything, once
    assert [len(y) for _, y in batches] == [4, 4, 2]
    order = loader.dataset.indices
    assert order == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert y.tolist() == [train.targets[i] for i in order]
    unaugmented = torch.stack([plain[i][0] for i in order])
    assert not torch.allclose(x, unaugmented)  # training augmentation was applied


def test_calibration_leaves_global_rng_untouched():
    ds = build_datasets("digits", image_size=8)[0]
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    _batches(calibration_loader(ds, num_batches=2, batch_size=8, seed=0))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("bad", [dict(num_batches=0), dict(batch_size=0)])
def test_calibration_rejects_bad_sizes(bad):
    with pytest.raises(ChipError):
        calibration_loader(_indexed(4), **bad)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cifar10", "cifar-10-batches-py/{data_batch_1..5,test_batch}"),
        ("cifar100", "cifar-100-python/{train,test}"),
        ("mnist", "train-images-idx3-ubyte"),
        ("fashion-mnist", "t10k-labels-idx1-ubyte"),
        ("imagenet", "/train/<class>/"),
    ],
)
def test_missing_dataset_is_one_line_error(name, expected, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(ChipError) as err:
        build_datasets(name, root)
    message = str(err.value)
    assert "\n" not in message and f"not found at {root}" in message and expected in message


def test_unknown_name_and_option():
    with pytest.raises(ChipError, match="unknown dataset 'svhn'; expected one of cifar10, "):
        build_datasets("svhn")
    with pytest.raises(ChipError, match="synthetic"):
        get_dataset_info("nope")
    with pytest.raises(ChipError, match="no option 'image_size'"):
        build_datasets("cifar10", image_size=8)
    assert get_dataset_info("Fashion_MNIST").name == "fashion-mnist"


def test_malformed_cifar_batch(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(10))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ChipError, match="malformed CIFAR-10 file .*data_batch_3"):
        build_datasets("cifar10", tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ChipError, match="malformed CIFAR-10 file"):
        build_datasets("cifar10", tmp_path)


def test_imagenet_cannot_download(tmp_path):
    with pytest.raises(ChipError, match="cannot be downloaded"):
        build_datasets("imagenet", tmp_path, download=True)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickles_cannot_run_code(tmp_path):
    """CIFAR batches are pickles; anything beyond arrays and containers is refused."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Boom(), b"labels": [0]}, f)
    with pytest.raises(ChipError, match="refusing to load"):
        build_datasets("cifar10", tmp_path)
