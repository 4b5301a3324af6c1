"""Training throughput: chip.train.train_one_epoch vs a bare PyTorch loop.

Same model (a CIFAR ResNet-20-like net defined here), same synthetic data and batch size, same
process; one warm-up epoch each, then ``--repeats`` interleaved epochs (order alternating).
Prints images/s of both (median) and the ratio chip / bare (target >= 0.9)::

    .venv/bin/python bench/train_throughput.py --threads 1 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from chip.train import TrainConfig, build_lr_fn, build_optimizer, train_one_epoch


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """3 stages x 3 blocks, widths w, 2w, 4w (ResNet-20 for CIFAR)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(cin, cout, stride))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epoch(model, optimizer, loader, device) -> None:
    """The reference: forward, loss, zero_grad, backward, step. Nothing else."""
    model.train()
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        loss = F.cross_entropy(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def chip_epoch(model, optimizer, loader, device, cfg, lr_fn, progress: bool) -> None:
    train_one_epoch(
        model, nn.CrossEntropyLoss(), optimizer, loader, device, 0, cfg, lr_fn, progress=progress
    )


def timed(fn, n_images: int, device: torch.device) -> float:
    """Images per second of one call of ``fn``."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return n_images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=8, help="iterations per epoch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-progress", action="store_true", help="disable chip's tqdm bar")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch * args.iters
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch)
    model = resnet20(width=args.width).to(device)
    cfg = TrainConfig(epochs=10, lr=0.01, momentum=0.9, weight_decay=5e-3, log_every=10)
    optimizer = build_optimizer(model, cfg)  # one optimizer for both: identical work per step
    lr_fn = build_lr_fn(cfg, len(loader))
    runs = {
        "bare": lambda: bare_epoch(model, optimizer, loader, device),
        "chip": lambda: chip_epoch(
            model, optimizer, loader, device, cfg, lr_fn, not args.no_progress
        ),
    }
    for fn in runs.values():  # warm-up
        fn()
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            results[name].append(timed(runs[name], n, device))
    bare, chip = (statistics.median(results[k]) for k in ("bare", "chip"))
    pairs = statistics.median(c / b for c, b in zip(results["chip"], results["bare"], strict=True))
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"iters={args.iters} repeats={args.repeats} progress={not args.no_progress}"
    )
    print("bare images/s: " + " ".join(f"{v:.1f}" for v in results["bare"]))
    print("chip images/s: " + " ".join(f"{v:.1f}" for v in results["chip"]))
    print(
        f"median bare {bare:.1f} img/s, chip {chip:.1f} img/s, ratio chip/bare {chip / bare:.3f} "
        f"(median of per-repeat ratios {pairs:.3f})"
    )


if __name__ == "__main__":
    main()
