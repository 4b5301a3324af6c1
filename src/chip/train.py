"""Fine-tuning engine: the paper's SGD recipe (docs/method.md section 5) in the style of torchvision's references.

Pieces, usable separately::

    cfg = TrainConfig.from_dict({"epochs": 400, "lr": 0.01, "weight_decay": 5e-3})
    result = fit(model, train_loader, val_loader, cfg, "runs/x", resume=True)
    result["best_top1"]          # reported accuracy = best val top-1 (percent) over epochs

* :func:`paper_lr` and the :data:`SCHEDULES` registry: the learning rate is set every iteration.
* :func:`train_one_epoch` / :func:`evaluate`: one pass; metrics are accumulated on the device and
  all-reduced over ranks once per pass (no per-iteration host syncs except every ``log_every`` steps
  for the progress bar). Accuracies are in percent.
* :class:`CheckpointSaver`: atomic ``last.pt`` every epoch and ``best.pt`` on improvement;
  :func:`load_training_state` reads one back (model, optimizer, scaler, RNG). Plain weights files
  in other layouts are loaded with :func:`chip.checkpoint.load_weights`.
* :func:`fit`: the loop, DDP when launched with torchrun, full resume, ``metrics.jsonl``.

Determinism: at the start of every epoch :func:`seed_epoch` reseeds Python, NumPy and torch with
``seed + epoch`` (plus a per-rank offset) and reseeds the loader's / sampler's generator, so an
epoch's data order and augmentation depend only on (seed, epoch, rank). A run resumed from
``last.pt`` after a crash therefore replays exactly what the uninterrupted run would have done
(bitwise on CPU; on CUDA only as deterministic as the kernels are). Persistent DataLoader workers
are not reseeded between epochs; use ``persistent_workers=False`` when exact replay matters.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from chip.checkpoint import load_torch_file
from chip.distributed import (
    all_reduce_sum,
    broadcast_buffers,
    get_rank,
    init_distributed,
    is_main_process,
    shard_loader,
)
from chip.errors import ChipError
from chip.recipe import TrainConfig
from chip.utils import AMP_DTYPES, atomic_save, atomic_write, seed_everything

logger = logging.getLogger(__name__)

LrFn = Callable[[int, int], float]

# ----------------------------------------------------------------------------------- schedules


def warmup_factor(epoch: int, step: int, iters_per_epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up factor of docs/method.md section 5: ``(1 + step + epoch * iters) / (warmup * iters)``."""
    if epoch >= warmup_epochs:
        return 1.0
    return (1 + step + epoch * iters_per_epoch) / (warmup_epochs * iters_per_epoch)


def paper_lr(
    base_lr: float,
    epoch: int,
    step: int,
    iters_per_epoch: int,
    epochs: int,
    warmup_epochs: int = 5,
) -> float:
    """The paper's schedule (docs/method.md section 5): cosine over integer epochs, shifted by the warm-up.

    ``lr = 0.5 * base * (1 + cos(pi * (epoch - w) / (epochs - w)))``, times the linear warm-up
    factor while ``epoch < w``. Check: base 0.01, 400 epochs, 196 iters: epoch 0 step 0 ->
    1.0200e-05, epoch 5 -> 0.01, epoch 200 -> 5.0994e-03.
    """
    span = max(epochs - warmup_epochs, 1)
    lr = 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))
    return lr * warmup_factor(epoch, step, iters_per_epoch, warmup_epochs)


def step_lr(
    base_lr: float,
    epoch: int,
    step: int,
    iters_per_epoch: int,
    epochs: int,
    warmup_epochs: int = 0,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """``base * gamma ** (number of milestones <= epoch)``, with the same linear warm-up."""
    decays = bisect.bisect_right(sorted(milestones), epoch)
    return base_lr * gamma**decays * warmup_factor(epoch, step, iters_per_epoch, warmup_epochs)


def constant_lr(
    base_lr: float,
    epoch: int,
    step: int,
    iters_per_epoch: int,
    epochs: int,
    warmup_epochs: int = 0,
) -> float:
    """``base`` after the linear warm-up."""
    return base_lr * warmup_factor(epoch, step, iters_per_epoch, warmup_epochs)


# name -> (function, TrainConfig fields passed as extra keyword arguments)
SCHEDULES: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "cosine": (paper_lr, ()),
    "step": (step_lr, ("milestones", "gamma")),
    "constant": (constant_lr, ()),
}


# -------------------------------------------------------------------------------------- config


def build_lr_fn(cfg: TrainConfig, iters_per_epoch: int) -> LrFn:
    """``lr_fn(epoch, step) -> lr`` for ``cfg.schedule``."""
    fn, extra = SCHEDULES[cfg.schedule]
    kwargs = {name: getattr(cfg, name) for name in extra}
    return partial(
        _call_schedule, fn, cfg.lr, iters_per_epoch, cfg.epochs, cfg.warmup_epochs, kwargs
    )


def _call_schedule(fn, base_lr, iters, epochs, warmup, kwargs, epoch: int, step: int) -> float:
    return fn(base_lr, epoch, step, iters, epochs, warmup_epochs=warmup, **kwargs)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on all trainable parameters (the paper's recipe, BN included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Cross-entropy with ``cfg.label_smoothing`` (used for training and validation loss)."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp``; fp16 needs CUDA (warns and disables elsewhere)."""
    dtype = AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type != "cuda":
        warnings.warn(f"amp='fp16' needs CUDA; training in float32 on {device}", stacklevel=2)
        return None
    return dtype


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA, else ``None``."""
    if amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model_without_ddp``: strip DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ------------------------------------------------------------------------------- train / eval


def _prepare(images, target, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    target = target.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device,
    epoch: int,
    cfg: TrainConfig,
    lr_fn: LrFn,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
) -> dict:
    """One training pass; the lr is set every iteration to ``lr_fn(epoch, step)``.

    Returns ``dict(loss, top1, lr, images_per_s, n)`` over all ranks (loss: mean per sample;
    top1 in percent on the training batches; lr: the last one set).
    """
    device = torch.device(device)
    amp_dtype = resolve_amp(cfg.amp, device)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n_local = 0
    lr = lr_fn(epoch, 0)
    bar = tqdm(
        total=len(loader),
        desc=f"epoch {epoch}",
        disable=not (progress and is_main_process()),
        dynamic_ncols=True,
        leave=False,
    )
    start = time.perf_counter()
    step = -1
    for step, (images, target) in enumerate(loader):
        lr = lr_fn(epoch, step)
        _set_lr(optimizer, lr)
        images, target = _prepare(images, target, device, cfg.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
        batch = target.shape[0]
        with torch.no_grad():
            loss_sum += loss.detach().double() * batch
            correct += (output.argmax(dim=1) == target).sum()
        n_local += batch
        if not bar.disable and (step + 1) % cfg.log_every == 0:
            bar.update(cfg.log_every)
            bar.set_postfix(
                loss=f"{loss_sum.item() / n_local:.4f}",
                top1=f"{100.0 * correct.item() / n_local:.2f}",
                lr=f"{lr:.3e}",
            )
    bar.update(step + 1 - bar.n)
    bar.close()
    stats = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(n_local))])
    total_loss, total_correct, n = all_reduce_sum(stats).tolist()
    elapsed = time.perf_counter() - start
    n = int(n)
    return {
        "loss": total_loss / max(n, 1),
        "top1": 100.0 * total_correct / max(n, 1),
        "lr": lr,
        "images_per_s": n / elapsed if elapsed > 0 else float("nan"),
        "n": n,
    }


def evaluate(
    model: nn.Module,
    loader,
    device,
    criterion: nn.Module | None = None,
    *,
    amp: str = "none",
    channels_last: bool = False,
) -> dict:
    """Loss and top-1/top-5 accuracy (percent) under ``torch.inference_mode``.

    Sums of loss, correct predictions and sample counts are all-reduced over ranks, so with a
    non-padding sharded sampler (:class:`chip.distributed.ShardedEvalSampler`, what :func:`fit`
    uses) a multi-process evaluation equals the single-process one exactly. Top-5 becomes top-k
    with ``k = min(5, num_classes)``. ``criterion`` defaults to plain cross-entropy. The model's
    train/eval mode is restored afterwards. Returns ``dict(loss, top1, top5, n)``.
    """
    device = torch.device(device)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    amp_dtype = resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    with torch.inference_mode():
        for images, target in loader:
            images, target = _prepare(images, target, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            output = output.float()
            loss = criterion(output, target)
            k = min(5, output.shape[1])
            hits = output.topk(k, dim=1).indices.eq(target[:, None])
            batch = target.shape[0]
            sums[0] += loss.double() * batch
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += batch
    model.train(was_training)
    loss_sum, c1, c5, n = all_reduce_sum(sums).tolist()
    n = int(n)
    denom = max(n, 1)
    return {
        "loss": loss_sum / denom,
        "top1": 100.0 * c1 / denom,
        "top5": 100.0 * c5 / denom,
        "n": n,
    }


# ---------------------------------------------------------------------------- RNG / seeding


def get_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as ``weights_only``-loadable objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state` (CUDA states restored when the device count matches)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _loader_generators(loader) -> list[torch.Generator]:
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    found = [getattr(obj, "generator", None) for obj in (loader, sampler, inner)]
    unique: dict[int, torch.Generator] = {}
    for gen in found:
        if isinstance(gen, torch.Generator):
            unique[id(gen)] = gen
    return list(unique.values())


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: ``seed + epoch + 10007 * rank``."""
    return seed + epoch + 10007 * rank


def seed_epoch(loader, seed: int, epoch: int, rank: int | None = None) -> None:
    """Make epoch ``epoch``'s data order and augmentation a function of (seed, epoch, rank).

    Reseeds Python/NumPy/torch, every generator the loader or its sampler holds, and calls
    ``sampler.set_epoch(epoch)`` when the sampler has one (DistributedSampler).
    """
    s = epoch_seed(seed, epoch, get_rank() if rank is None else rank)
    seed_everything(s)
    for gen in _loader_generators(loader):
        gen.manual_seed(s)
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


# ------------------------------------------------------------------------------ checkpoints


class CheckpointSaver:
    """Atomic ``last.pt`` every epoch and ``best.pt`` when the metric improves (after timm).

    Both files hold the same dict: ``model`` (state_dict of the unwrapped model), ``optimizer``,
    ``scaler`` (or None), ``epoch`` (index of the last completed epoch; resume continues at
    ``epoch + 1``), ``metric`` (this epoch's), ``best_metric``, ``best_epoch``, ``metric_name``,
    ``cfg`` (dict), ``rng`` (see :func:`get_rng_state`), ``history`` (per-epoch rows) and ``extra``
    (whatever the caller passes, e.g. the pruning plan). ``best.pt`` is written before
    ``last.pt`` so a crash between the two never leaves ``last.pt`` ahead of ``best.pt``.
    Only rank 0 writes.
    """

    def __init__(
        self,
        out_dir,
        metric_name: str = "top1",
        higher_is_better: bool = True,
        last_name: str = "last.pt",
        best_name: str = "best.pt",
    ):
        self.out_dir = Path(out_dir)
        self.metric_name = metric_name
        self.higher_is_better = higher_is_better
        self.last_path = self.out_dir / last_name
        self.best_path = self.out_dir / best_name
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    def improves(self, metric: float) -> bool:
        """Whether ``metric`` beats the best so far (the first metric always does)."""
        if self.best_metric is None:
            return True
        if self.higher_is_better:
            return metric > self.best_metric
        return metric < self.best_metric

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        epoch: int,
        metric: float,
        cfg: TrainConfig | dict | None = None,
        scaler: torch.amp.GradScaler | None = None,
        extra: dict | None = None,
        history: list | None = None,
    ) -> bool:
        """Record epoch ``epoch`` (completed) with its ``metric``; returns whether it is the best."""
        is_best = self.improves(metric)
        if is_best:
            self.best_metric, self.best_epoch = float(metric), int(epoch)
        if not is_main_process():
            return is_best
        cfg_dict = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
        ckpt = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "epoch": int(epoch),
            "metric": float(metric),
            "metric_name": self.metric_name,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "cfg": cfg_dict,
            "rng": get_rng_state(),
            "history": list(history or []),
            "extra": dict(extra or {}),
        }
        if is_best:
            atomic_save(ckpt, self.best_path)
        atomic_save(ckpt, self.last_path)
        return is_best

    def restore(self, ckpt: dict) -> None:
        """Take the best metric and epoch from a loaded checkpoint."""
        self.best_metric = ckpt.get("best_metric")
        self.best_epoch = ckpt.get("best_epoch")


def load_training_state(
    path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    restore_rng: bool = False,
    trust_code: bool = False,
) -> dict:
    """Load a :class:`CheckpointSaver` file and restore what is given into it; returns the dict.

    Args:
        path: a ``last.pt`` / ``best.pt`` written by :class:`CheckpointSaver`.
        model: receives ``ckpt["model"]`` (strict ``load_state_dict`` on the unwrapped module).
        optimizer, scaler: receive their saved states when the file holds them.
        restore_rng: also restore the Python/NumPy/torch RNG states (exact resume).
        trust_code: full unpickling (needed when ``extra`` holds arbitrary Python objects; runs
            code from the file). Otherwise the file is read with ``weights_only=True``.

    Returns the checkpoint dict (tensors on the CPU; keys as written by :class:`CheckpointSaver`).

    Raises:
        ChipError: the file is missing or unreadable, or needs ``trust_code=True`` (see
            :func:`chip.checkpoint.load_torch_file`).
    """
    path = Path(path)
    if not path.is_file():
        raise ChipError(f"checkpoint {path} not found: expected a last.pt/best.pt file from fit")
    ckpt = load_torch_file(path, trust_code=trust_code)
    if model is not None:
        unwrap_model(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    return ckpt


# ----------------------------------------------------------------------------------------- fit


def _resume_path(resume, out_dir: Path) -> Path | None:
    """``False`` -> None; ``True`` -> out_dir/last.pt if it exists; a path -> that path."""
    if resume is False or resume is None:
        return None
    if resume is True:
        path = out_dir / "last.pt"
        return path if path.is_file() else None
    return Path(resume)


def _write_metrics(path: Path, rows: list[dict], append: bool) -> None:
    if not is_main_process():
        return
    if append:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return
    with atomic_write(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _tensorboard_writer(cfg: TrainConfig, out_dir: Path):
    if not (cfg.tensorboard and is_main_process()):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; not writing TensorBoard logs", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(out_dir / "tb"))


def _log(msg: str, progress: bool) -> None:
    if not is_main_process():
        return
    if progress:
        tqdm.write(msg)
    else:
        logger.info(msg)


def _prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device, distributed: bool):
    """Move to device / memory format; SyncBatchNorm when asked and supported."""
    model = unwrap_model(model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn("sync_bn needs CUDA; keeping per-process BatchNorm", stacklevel=3)
    return model


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    cfg: TrainConfig | dict,
    out_dir,
    device=None,
    resume: bool | str | Path = False,
    extra: dict | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict:
    """Fine-tune ``model``; returns ``dict(best_top1, best_epoch, history)``.

    Under torchrun the model is wrapped in DDP (``find_unused_parameters=False``; SyncBatchNorm
    if ``cfg.sync_bn`` on CUDA) and both loaders get per-rank samplers via
    :func:`chip.distributed.shard_loader` (per-process batch size, as in torchvision). The caller
    owns the process group (call :func:`chip.distributed.cleanup` when done).

    Each epoch writes ``out_dir/last.pt`` (and ``best.pt`` on a new best val top-1) atomically and
    appends a line to ``out_dir/metrics.jsonl``. ``resume=True`` continues from
    ``out_dir/last.pt`` when it exists (else starts fresh); a path resumes from that file. Resume
    restores model, optimizer, scaler, epoch, best metric, history and RNG states. The model is
    trained in place (its unwrapped module is what the checkpoints hold).
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    info = init_distributed(device)
    device = info.device
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    model_without_ddp = _prepare_model(model, cfg, device, info.enabled)
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model_without_ddp, cfg)
    scaler = make_scaler(cfg.amp, device)
    saver = CheckpointSaver(out_dir)

    start_epoch, history = 0, []
    resume_path = _resume_path(resume, out_dir)
    if resume_path is not None:
        ckpt = load_training_state(
            resume_path, model_without_ddp, optimizer, scaler, restore_rng=True
        )
        start_epoch = ckpt["epoch"] + 1
        saver.restore(ckpt)
        history = list(ckpt.get("history", []))
        _log(f"resumed from {resume_path} at epoch {start_epoch}", progress)
    _write_metrics(out_dir / "metrics.jsonl", history, append=False)

    model = model_without_ddp
    if info.enabled:
        device_ids = [info.local_rank] if device.type == "cuda" else None
        model = DistributedDataParallel(
            model_without_ddp, device_ids=device_ids, find_unused_parameters=False
        )
    train_loader = shard_loader(train_loader, train=True, seed=cfg.seed)
    val_loader = shard_loader(val_loader, train=False)
    lr_fn = build_lr_fn(cfg, len(train_loader))
    writer = _tensorboard_writer(cfg, out_dir)

    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(train_loader, cfg.seed, epoch)
        t0 = time.perf_counter()
        train_stats = train_one_epoch(
            model, criterion, optimizer, train_loader, device, epoch, cfg, lr_fn, scaler, progress
        )
        if info.enabled:
            broadcast_buffers(model_without_ddp)  # every rank evaluates rank 0's BN statistics
        val_stats = evaluate(
            model_without_ddp,
            val_loader,
            device,
            criterion,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
        )
        row = {
            "epoch": epoch,
            "train_loss": train_stats["loss"],
            "train_top1": train_stats["top1"],
            "val_loss": val_stats["loss"],
            "val_top1": val_stats["top1"],
            "val_top5": val_stats["top5"],
            "lr": train_stats["lr"],
            "time": time.perf_counter() - t0,
            "images_per_s": train_stats["images_per_s"],
            "best_top1": max(val_stats["top1"], saver.best_metric or -math.inf),
        }
        history.append(row)
        saver.save(
            model_without_ddp, optimizer, epoch, val_stats["top1"], cfg, scaler, extra, history
        )
        _write_metrics(out_dir / "metrics.jsonl", [row], append=True)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
        _log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
            f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} "
            f"(best {saver.best_metric:.2f} @ {saver.best_epoch}) | lr {row['lr']:.3e} | "
            f"{row['images_per_s']:.0f} img/s",
            progress,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if writer is not None:
        writer.close()
    return {"best_top1": saver.best_metric, "best_epoch": saver.best_epoch, "history": history}
