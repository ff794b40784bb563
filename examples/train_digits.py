"""Train a small MLP on handwritten digits streamed from a batchwire server.

With no --target, starts `batchwire serve --config examples/digits.toml` on a
free port, trains through it, and stops it. Prints the test accuracy; exits
non-zero if it is below --min-accuracy.

    python examples/train_digits.py                       # server started for you
    python examples/train_digits.py --target host:50051   # an existing server
    python examples/train_digits.py --batch-ramp 32,64,128   # growing batches (below)

--batch-ramp B1,B2,... grows the batch size as training goes: stage k of K
takes the k-th K-th of all the training samples, so a stage may begin in the
middle of an epoch (RemoteDataset.set_batch_size continues from the same
sample). The learning rate follows the batch size (linear scaling rule, from
--lr at --batch-size) times a cosine schedule over the samples seen, and
gradients are clipped to norm --clip.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from batchwire.client import RemoteDataset
from batchwire.server.launch import ServeProcess

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def local_server(config: Path, workers: int) -> Iterator[str]:
    """Runs `batchwire serve` on a free loopback port; yields its target."""
    with ServeProcess(config, workers=workers, log_level="WARNING") as server:
        print(next(line for line in server.output if "serving" in line).strip(), flush=True)
        yield server.target


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(train_batches, epochs: int, device: torch.device) -> nn.Module:
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / count:.4f}", flush=True)
    return model


def ramp_stage(ramp: list[int], seen: int, total: int) -> int:
    """The ramp's batch size once ``seen`` of ``total`` samples were trained on."""
    return ramp[min(len(ramp) - 1, seen * len(ramp) // total)]


def train_ramped(
    train_set: RemoteDataset, args: argparse.Namespace, device: torch.device
) -> nn.Module:
    """Trains with the batch size growing along ``args.batch_ramp``, mid-epoch too."""
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    total = args.epochs * train_set.describe().length
    seen = 0
    for epoch in range(args.epochs):
        train_set.set_epoch(epoch)
        loss_sum, count = 0.0, 0
        for x, y in train_set:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Linear scaling rule, times a cosine decay over the samples seen.
            cosine = 0.5 * (1 + math.cos(math.pi * seen / total))
            for group in optimizer.param_groups:
                group["lr"] = args.lr * len(y) / args.batch_size * (0.05 + 0.95 * cosine)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            loss_sum += loss.item() * len(y)
            count += len(y)
            seen += len(y)
            size = ramp_stage(args.batch_ramp, seen, total)
            if size != train_set.batch_size:
                print(
                    f"epoch {epoch + 1:2d}: batch size {train_set.batch_size} -> {size} "
                    f"after {count} samples of this epoch",
                    flush=True,
                )
                train_set.set_batch_size(size)  # the next batch: the next sample, new size
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {loss_sum / count:.4f}", flush=True)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, batches, device: torch.device) -> float:
    correct = count = 0
    for x, y in batches:
        predicted = model(x.to(device)).argmax(dim=1).cpu()
        correct += int((predicted == y).sum())
        count += len(y)
    return correct / count


def run(target: str, args: argparse.Namespace, device: torch.device) -> float:
    batch_size = args.batch_ramp[0] if args.batch_ramp else args.batch_size
    train_set = RemoteDataset(target, "digits", batch_size=batch_size, shuffle=True, seed=0)
    test_set = RemoteDataset(target, "digits-test", batch_size=256)
    print(
        f"training on {train_set.describe().length} digits from {target}, "
        f"testing on {test_set.describe().length}",
        flush=True,
    )

    def epochs(epoch: int):
        train_set.set_epoch(epoch)
        return train_set

    started = time.perf_counter()
    if args.batch_ramp:
        model = train_ramped(train_set, args, device)
    else:
        model = train(epochs, args.epochs, device)
    result = accuracy(model, test_set, device)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - started:.1f}s", flush=True)
    return result


def batch_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",")]
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected positive batch sizes like 32,64,128, got {text!r}"
        )
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("BATCHWIRE_TARGET"),
        help="an existing server (default: start one from examples/digits.toml)",
    )
    parser.add_argument("--config", type=Path, default=HERE / "digits.toml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-accuracy", type=float, default=0.95)
    parser.add_argument(
        "--batch-ramp",
        type=batch_sizes,
        help="batch sizes to grow through, e.g. 32,64,128 (stages evenly over the samples)",
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="with --batch-ramp: at --batch-size")
    parser.add_argument("--clip", type=float, default=1.0, help="with --batch-ramp: gradient norm")
    parser.add_argument(
        "--local-baseline",
        action="store_true",
        help="also train from a local DataLoader on the same split, for comparison",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.target:
        result = run(args.target, args, device)
    else:
        with local_server(args.config, args.workers) as target:
            result = run(target, args, device)
    print(f"test accuracy through batchwire: {result:.4f}", flush=True)

    if args.local_baseline:
        sys.path.insert(0, str(HERE))
        from digits_data import load
        from torch.utils.data import DataLoader, DistributedSampler

        train_local = load("train")
        sampler = DistributedSampler(train_local, num_replicas=1, rank=0, shuffle=True, seed=0)

        def local_epochs(epoch: int):
            sampler.set_epoch(epoch)
            return DataLoader(train_local, batch_size=args.batch_size, sampler=sampler)

        model = train(local_epochs, args.epochs, device)
        local = accuracy(model, DataLoader(load("test"), batch_size=256), device)
        print(f"test accuracy with a local DataLoader: {local:.4f}", flush=True)

    if result < args.min_accuracy:
        print(f"accuracy {result:.4f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
