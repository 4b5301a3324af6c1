"""Minimal ``torch.distributed`` helpers in the style of torchvision's references.

Launch with torchrun (``python -m torch.distributed.run --nproc_per_node=N script.py``); the
launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Without them everything here degrades to
single-process no-ops, so the same code runs with and without ``torchrun``.

Only rank 0 prints and writes files (see :func:`is_main_process`).

Evaluation sharding: :class:`torch.utils.data.DistributedSampler` pads the dataset by repeating
samples so that every rank gets the same number; summing counts over ranks would then count some
images twice. :class:`ShardedEvalSampler` gives rank ``r`` the indices ``r, r + W, r + 2W, ...``
without padding (ranks may get one sample more or less), so all-reduced sums of correct predictions
and sample counts equal the single-process figures exactly.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from chip.utils import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def is_dist_ready() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device=None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (idempotent).

    Backend: NCCL when CUDA is available, else gloo. With ``WORLD_SIZE`` unset or 1 nothing is
    initialised and a single-process :class:`DistInfo` (``enabled=False``) is returned.
    Under CUDA each process uses ``cuda:LOCAL_RANK``; otherwise ``device`` (default: auto).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    enabled = world_size > 1 and dist.is_available()
    if enabled and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = resolve_device(device)
    if enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if not enabled:
        rank, world_size, local_rank = 0, 1, 0
    return DistInfo(rank, world_size, local_rank, dev, enabled)


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_ready() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_dist_ready() else 1


def is_main_process() -> bool:
    """True on rank 0 (and always when not distributed): only it prints and writes."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (no-op when not distributed)."""
    if is_dist_ready() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_dist_ready():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_dist_ready():
        dist.destroy_process_group()


class ShardedEvalSampler(Sampler[int]):
    """Non-padding shard ``indices[rank::world_size]`` for evaluation (no sample is repeated)."""

    def __init__(self, dataset_len: int, rank: int | None = None, world_size: int | None = None):
        self.dataset_len = int(dataset_len)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))


def _rebuild_loader(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """A copy of ``loader`` drawing from ``sampler`` (same batch size, workers, collate ...)."""
    kwargs = dict(
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=sampler, **kwargs)


def shard_loader(loader: DataLoader, train: bool, seed: int = 0) -> DataLoader:
    """Give ``loader`` a per-rank sampler when distributed; returned unchanged otherwise.

    Training: :class:`DistributedSampler` (shuffled iff the original sampler was random, seeded
    with ``seed``; call ``set_epoch``). Evaluation: :class:`ShardedEvalSampler` (no padding).
    Loaders that already carry one of these samplers, or a custom batch sampler, are kept as is.
    The batch size stays per process, as in torchvision's references.
    """
    if get_world_size() == 1 or isinstance(
        loader.sampler, (DistributedSampler, ShardedEvalSampler)
    ):
        return loader
    if loader.batch_size is None:
        warnings.warn("loader has a custom batch_sampler; not sharding it", stacklevel=2)
        return loader
    n = len(loader.dataset)
    if train:
        shuffle = isinstance(loader.sampler, RandomSampler)
        sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed)
    else:
        sampler = ShardedEvalSampler(n)
    return _rebuild_loader(loader, sampler)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step the
    ranks' running statistics differ slightly; call this before evaluating or saving.
    """
    if not (is_dist_ready() and get_world_size() > 1):
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)
