"""Fine-tune a tiny CNN with chip.train.fit; optionally SIGKILL mid-run (crash/resume test)."""

from __future__ import annotations

import argparse
import json

import torch
from tiny import AugmentedDataset, make_dataset, make_tensors, tiny_cnn
from torch.utils.data import DataLoader

from chip.train import TrainConfig, fit
from chip.utils import atomic_save

N_TRAIN, BATCH = 48, 8  # 6 iterations per epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--final", help="write the final state_dict here")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--kill-at", type=int, help="SIGKILL at this training-item fetch (1-based)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = make_tensors(N_TRAIN)
    train = AugmentedDataset(x, y, kill_at=args.kill_at)
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator())
    val = DataLoader(make_dataset(20, seed=7), batch_size=BATCH)
    cfg = TrainConfig(
        epochs=args.epochs, lr=0.05, warmup_epochs=1, weight_decay=5e-3, label_smoothing=0.1
    )
    result = fit(model, loader, val, cfg, args.out, resume=args.resume, progress=False)
    if args.final:
        atomic_save(model.state_dict(), args.final)
    print(json.dumps({"best_top1": result["best_top1"], "epochs": len(result["history"])}))


if __name__ == "__main__":
    main()
