"""Calibration overhead: wall time of chip.calibrate / a plain inference pass over the same batches.

    python bench/calibrate_overhead.py [--arch resnet56] [--batches 5] [--batch-size 128]
                                       [--device cpu|cuda] [--image-size 32] [--threads N]

Both runs see the same pre-generated batches (ReLU'd Gaussian images; the content does not change
the cost), in the same process, model in eval mode; the plain pass runs under inference_mode.
calibrate's time is split into its one-off graph tracing (Torch-Pruning DependencyGraph + hook
point trace) and the scoring pass itself. The floor is the same calibrate pass with a criterion
that only does what exact CI cannot skip: per sample and hook point, one float64 Gram product and
one eigh (spread over torch's threads like chip's). Target (issue 14): total ratio <= 3.0 for
ResNet-56 over 5 x 128 images, at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import time

import torch

import chip
from chip.calibration import hook_points
from chip.ci import _pool
from chip.groups import find_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of each (best is kept)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.image_size or chip.models.arch_input_size(args.arch)[-1]
    model = chip.models.create(args.arch).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, size, size, generator=g).relu().to(device),
            torch.zeros(args.batch_size),
        )
        for _ in range(args.batches)
    ]

    def plain() -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            for x, _ in batches:
                model(x)
        _sync(device)
        return time.perf_counter() - t

    def trace() -> tuple[float, object]:
        _sync(device)
        t = time.perf_counter()
        graph = find_groups(model, batches[0][0][:2], check=False)
        hook_points(model, graph, batches[0][0][:2])
        _sync(device)
        return time.perf_counter() - t, graph

    def scoring(graph) -> float:
        _sync(device)
        t = time.perf_counter()
        chip.calibrate(
            model, batches, num_batches=args.batches, device=device, graph=graph, progress=False
        )
        _sync(device)
        return time.perf_counter() - t

    def floor_criterion(fmaps: torch.Tensor) -> torch.Tensor:
        a = fmaps.flatten(2).double()
        gram = a.mT @ a if a.shape[2] < a.shape[1] else a @ a.mT
        workers = min(torch.get_num_threads(), gram.shape[0])
        list(_pool(workers).map(torch.linalg.eigh, gram.tensor_split(workers)))
        return torch.zeros(fmaps.shape[:2])

    def floor(graph) -> float:
        _sync(device)
        t = time.perf_counter()
        chip.calibrate(
            model,
            batches,
            num_batches=args.batches,
            device=device,
            graph=graph,
            progress=False,
            criterion=floor_criterion,
        )
        _sync(device)
        return time.perf_counter() - t

    plain()  # warm-up
    t_plain = min(plain() for _ in range(args.repeats))
    t_trace, graph = min((trace() for _ in range(args.repeats)), key=lambda r: r[0])
    t_score = min(scoring(graph) for _ in range(args.repeats))
    t_floor = min(floor(graph) for _ in range(args.repeats))
    n = args.batches * args.batch_size
    print(
        f"{args.arch} on {device} ({torch.get_num_threads()} threads), {args.batches} x "
        f"{args.batch_size} images at {size}x{size}"
    )
    print(f"{'plain inference':<28}{t_plain:9.2f} s")
    print(f"{'calibrate: graph trace':<28}{t_trace:9.2f} s   (once per model)")
    print(f"{'calibrate: scoring pass':<28}{t_score:9.2f} s   ({1e3 * t_score / n:.2f} ms/image)")
    print(f"{'floor: Gram + eigh only':<28}{t_floor:9.2f} s   (the same pass, nothing else)")
    total = t_trace + t_score
    ratio = total / t_plain
    print(
        f"ratio calibrate/plain: {ratio:.2f} total, {t_score / t_plain:.2f} scoring pass only, "
        f"floor {t_floor / t_plain:.2f}; chip / floor {t_score / t_floor:.2f} "
        f"(target <= 3.0 total: {'PASS' if ratio <= 3.0 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
