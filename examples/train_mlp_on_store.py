"""Train a small MLP on a store's encodings with PyTorch, reading the store chunk by chunk.

    python examples/train_mlp_on_store.py fashion-out/train.zarr fashion-out/test.zarr --epochs 10

The training store is read through ``EncodingsDataset`` (features dequantised and checked
chunk by chunk, so it works for int8 stores and stores larger than memory) in the order of
``ChunkShuffleSampler`` by ``--workers`` DataLoader worker processes. Features are
standardised with the training rows' mean and std. Prints the test accuracy per epoch and,
with ``--json``, a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdvae_latents.downstream import ChunkShuffleSampler, EncodingsDataset  # noqa: E402


def evaluate(model: nn.Module, loader: DataLoader, mean: torch.Tensor, std: torch.Tensor) -> float:
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model((x - mean) / std).argmax(1) == y).sum())
            total += len(y)
    return hits / total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path, help="training store (.zarr/.h5) with labels")
    parser.add_argument("test", type=Path, help="test store, same columns")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train = EncodingsDataset(args.train)
    test = EncodingsDataset(args.test)
    if test.n_features != train.n_features:
        parser.error(f"{args.test} has {test.n_features} features, {args.train} has {train.n_features}")
    mean, std = (torch.from_numpy(v.astype(np.float32)) for v in train.moments())
    n_classes = max(train.n_classes, test.n_classes)

    sampler = ChunkShuffleSampler(train, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    test_loader = DataLoader(test, batch_size=1024, num_workers=0)
    model = nn.Sequential(nn.Linear(train.n_features, args.hidden), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(args.hidden, n_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()

    start = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = 0.0
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model((x - mean) / std), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
        acc = evaluate(model, test_loader, mean, std)
        history.append({"epoch": epoch + 1, "train_loss": total / len(train), "test_accuracy": acc})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(train):.4f}, test accuracy {acc:.4f}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    summary = {"train_store": str(args.train), "test_store": str(args.test), "train_rows": len(train),
               "test_rows": len(test), "features": train.n_features, "hidden": args.hidden, "epochs": args.epochs,
               "workers": args.workers, "test_accuracy": history[-1]["test_accuracy"],
               "seconds": time.perf_counter() - start, "history": history}
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
