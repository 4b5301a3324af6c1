"""2-process (gloo) check: fit + evaluate a tiny CNN under torchrun; rank 0 writes results.

python -m torch.distributed.run --nproc_per_node=2 --standalone tests/scripts/ddp_tiny.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tiny import make_dataset, tiny_cnn
from torch.utils.data import DataLoader, DistributedSampler

from chip.distributed import cleanup, init_distributed, is_main_process, shard_loader
from chip.train import TrainConfig, evaluate, fit
from chip.utils import atomic_save

NUM_CLASSES, N_TRAIN, N_VAL, BATCH = 7, 37, 23, 4


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = init_distributed()
    torch.manual_seed(0)
    model = tiny_cnn(NUM_CLASSES)
    train = make_dataset(N_TRAIN, NUM_CLASSES)
    val = make_dataset(N_VAL, NUM_CLASSES, seed=7)
    train_loader = DataLoader(train, batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(val, batch_size=BATCH)
    cfg = TrainConfig(epochs=2, lr=0.05, warmup_epochs=0)
    result = fit(model, train_loader, val_loader, cfg, out, progress=False)

    sharded = evaluate(model, shard_loader(val_loader, train=False), info.device)
    padded_loader = DataLoader(
        val, batch_size=BATCH, sampler=DistributedSampler(val, shuffle=False)
    )
    padded = evaluate(model, padded_loader, info.device)
    if is_main_process():
        atomic_save(model.state_dict(), out / "final.pt")
        summary = {
            "world_size": info.world_size,
            "enabled": info.enabled,
            "best_top1": result["best_top1"],
            "history": result["history"],
            "sharded": sharded,
            "padded_n": padded["n"],
        }
        (out / "summary.json").write_text(json.dumps(summary))
    cleanup()


if __name__ == "__main__":
    main()
