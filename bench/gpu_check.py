"""GPU check: CI speed, calibrate overhead, fine-tuning throughput and latency on one CUDA device.

Run through ``bench/gpu.sh`` on a machine with a GPU (it installs Torch-Pruning from ``.whl/`` and
sets ``PYTHONPATH=src``); under 8 minutes on one H100. Prints ONE table:

* eigh routes: ms per matrix of each way chip.ci can diagonalise a batch of 64 Gram matrices
  (CUDA default / cuSOLVER / MAGMA / a round trip to the CPU) at the zoo's and ResNet-50's Gram
  sizes, and the route chip picks (issue: CUDA batched eigh slow above n = 32);
* CI speed: ``chip.ci.channel_independence`` in ms per sample at the ImageNet ResNet-50 shapes
  (16,256,56,56), (16,512,28,28), (16,2048,7,7) (ReLU'd Gaussian maps, float64 inside);
* calibrate overhead: ``chip.calibrate`` on a ResNet-50 over 5 x 64 synthetic 224x224 images,
  divided by a plain inference pass over the same batches (graph tracing shown separately);
* fine-tuning throughput (img/s): ``chip.train.train_one_epoch`` on ResNet-50 unpruned and
  pruned to ``flops=0.5`` (random scores: the shapes, hence the speed, do not depend on which
  channels are kept), bf16 autocast + channels_last, synthetic data, after warm-up iterations;
* latency: ``chip.measure_latency`` at batch 1 and 64 of both models (bf16, channels_last).

``--smoke`` runs every part at tiny sizes on the CPU (a test of the script, not a benchmark)::

    PYTHONPATH=src python bench/gpu_check.py --smoke
    bash bench/gpu.sh                     # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import chip
from chip.ci import CUDA_EIGH_ROUTES, channel_independence, choose_eigh_route, time_eigh_route
from chip.counting import count
from chip.groups import find_groups
from chip.latency import measure_latency
from chip.planning import plan
from chip.prune import apply
from chip.train import TrainConfig, build_criterion, build_lr_fn, build_optimizer, train_one_epoch


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (full GPU check or CPU smoke test)."""

    ci_shapes: tuple[tuple[int, int, int, int], ...]
    image: int
    cal_batches: int
    cal_batch: int
    train_batch: int
    warmup_iters: int
    timed_iters: int
    latency_batches: tuple[int, ...]
    latency_repeats: int
    eigh_sizes: tuple[int, ...] = (16, 32, 49, 64, 128, 196, 256, 512)  # zoo + ResNet-50 Grams
    eigh_batch: int = 64


FULL = Sizes(
    ci_shapes=((16, 256, 56, 56), (16, 512, 28, 28), (16, 2048, 7, 7)),
    image=224,
    cal_batches=5,
    cal_batch=64,
    train_batch=128,
    warmup_iters=10,
    timed_iters=40,
    latency_batches=(1, 64),
    latency_repeats=30,
)
SMOKE = Sizes(
    ci_shapes=((2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)),
    image=32,
    cal_batches=2,
    cal_batch=4,
    train_batch=4,
    warmup_iters=1,
    timed_iters=2,
    latency_batches=(1, 4),
    latency_repeats=3,
    eigh_sizes=(8, 40),
    eigh_batch=4,
)

Row = tuple[str, str, float, str]  # (section, item, value, unit)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``fn()`` call, synchronised."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- parts


def ci_speed(sizes: Sizes, device: torch.device) -> list[Row]:
    """ms per sample of channel_independence at each shape (best of 2 after a warm-up)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in sizes.ci_shapes:
        x = torch.randn(shape, generator=gen).relu_().to(device)
        channel_independence(x[:1])  # warm-up (kernels, solver handles)
        best = min(timed(lambda x=x: channel_independence(x), device) for _ in range(2))
        rows.append(("CI speed", "x".join(map(str, shape)), 1e3 * best / shape[0], "ms/sample"))
    return rows


def eigh_routes(sizes: Sizes, device: torch.device) -> list[Row]:
    """ms per matrix of every eigh route chip.ci can take (CUDA: default, cusolver, magma, a
    round trip to the CPU) at the Gram sizes of the zoo and ResNet-50, and the route chosen."""
    routes = CUDA_EIGH_ROUTES if device.type == "cuda" else ("default",)
    rows = []
    for n in sizes.eigh_sizes:
        seconds = {r: time_eigh_route(r, device, n, sizes.eigh_batch) for r in routes}
        per = {r: 1e3 * t / sizes.eigh_batch for r, t in seconds.items()}
        rows += [(f"eigh n={n}", route, ms, "ms/matrix") for route, ms in per.items()]
        chosen = choose_eigh_route(seconds)
        rows.append((f"eigh n={n}", f"chosen: {chosen}", per[chosen], "ms/matrix"))
    return rows


def resnet50(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return chip.models.create("resnet50").to(device).eval()


def synthetic_batches(n: int, batch: int, image: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, image, image, generator=gen).to(device),
            torch.randint(0, 1000, (batch,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


def calibrate_overhead(sizes: Sizes, device: torch.device) -> list[Row]:
    """chip.calibrate vs plain inference on the same batches (ResNet-50)."""
    model = resnet50(device)
    batches = synthetic_batches(sizes.cal_batches, sizes.cal_batch, sizes.image, device)

    def plain():
        with torch.inference_mode():
            for x, _ in batches:
                model(x)

    plain()  # warm-up
    t_plain = min(timed(plain, device) for _ in range(2))
    t0 = time.perf_counter()
    graph = find_groups(model, batches[0][0][:2], check=False)
    t_trace = time.perf_counter() - t0

    def scoring():
        chip.calibrate(
            model, batches, num_batches=len(batches), device=device, graph=graph, progress=False
        )

    t_score = timed(scoring, device)
    n = sizes.cal_batches * sizes.cal_batch
    label = f"resnet50 {sizes.cal_batches}x{sizes.cal_batch} @{sizes.image}"
    return [
        ("calibrate", f"{label} plain inference", t_plain, "s"),
        ("calibrate", f"{label} graph trace (once)", t_trace, "s"),
        ("calibrate", f"{label} scoring pass", t_score, "s"),
        ("calibrate", "scoring pass per image", 1e3 * t_score / n, "ms/image"),
        ("calibrate", "ratio (trace + scoring) / plain", (t_trace + t_score) / t_plain, "x"),
        ("calibrate", "ratio scoring / plain", t_score / t_plain, "x"),
    ]


def pruned_resnet50(device: torch.device, image: int) -> tuple[torch.nn.Module, str]:
    """ResNet-50 pruned to flops=0.5 with random scores, and its MACs ratio."""
    model = resnet50(torch.device("cpu"))
    size = (1, 3, image, image)
    graph = find_groups(model, torch.zeros(size))
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in graph}
    p = plan(model, scores, "flops=0.5", input_size=size, graph=graph)
    base = count(model, size).macs
    pruned = apply(model, p, inplace=True, graph=graph)
    return pruned.to(device), f"{count(pruned, size).macs / base:.3f}"


def throughput(model: torch.nn.Module, sizes: Sizes, device: torch.device) -> float:
    """Training images/s of train_one_epoch (bf16 autocast, channels_last, synthetic data)."""
    amp = "bf16"
    cfg = TrainConfig(
        epochs=2,
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=0,
        batch_size=sizes.train_batch,
        amp=amp,
        channels_last=True,
        seed=0,
    )
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer, criterion = build_optimizer(model, cfg), build_criterion(cfg)
    pool = synthetic_batches(4, sizes.train_batch, sizes.image, device, 1)  # reused batches
    warm = [pool[i % len(pool)] for i in range(sizes.warmup_iters)]
    data = [pool[i % len(pool)] for i in range(sizes.timed_iters)]
    lr_fn = build_lr_fn(cfg, len(data))
    train_one_epoch(model, criterion, optimizer, warm, device, 0, cfg, lr_fn, None, False)
    seconds = timed(
        lambda: train_one_epoch(
            model, criterion, optimizer, data, device, 1, cfg, lr_fn, None, False
        ),
        device,
    )
    return sizes.timed_iters * sizes.train_batch / seconds


def train_and_latency(sizes: Sizes, device: torch.device) -> list[Row]:
    pruned, ratio = pruned_resnet50(device, sizes.image)
    models = {"unpruned": resnet50(device), f"flops=0.5 (MACs x{ratio})": pruned}
    rows: list[Row] = []
    for label, model in models.items():
        rows.append(
            (
                "fine-tune bf16+CL",
                f"resnet50 {label} b{sizes.train_batch}",
                throughput(model, sizes, device),
                "img/s",
            )
        )
    for label, model in models.items():
        model.eval()
        for batch in sizes.latency_batches:
            r = measure_latency(
                model,
                (batch, 3, sizes.image, sizes.image),
                device=device,
                warmup=5,
                repeats=sizes.latency_repeats,
                channels_last=True,
                amp="bf16",
            )
            rows.append(("latency bf16+CL", f"resnet50 {label} b{batch}", r.median_ms, "ms"))
    return rows


PARTS: dict[str, Callable[[Sizes, torch.device], list[Row]]] = {
    "eigh": eigh_routes,
    "ci": ci_speed,
    "calibrate": calibrate_overhead,
    "train": train_and_latency,
}


def table(rows: list[Row], header: str) -> str:
    width = max(len(item) for _, item, _, _ in rows)
    lines = [header, f"{'section':18s} {'item':{width}s} {'value':>12s}  unit", "-" * (width + 40)]
    lines += [f"{sec:18s} {item:{width}s} {value:12.3f}  {unit}" for sec, item, value, unit in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests the script)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available (use --smoke for a CPU test of the script)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    rows: list[Row] = []
    t0 = time.perf_counter()
    for part in args.parts:
        t = time.perf_counter()
        rows += PARTS[part](sizes, device)
        print(f"[{part}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    header = (
        f"chip GPU check on {name}, torch {torch.__version__}"
        f"{' (SMOKE: tiny sizes, not a benchmark)' if args.smoke else ''}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    print(table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
