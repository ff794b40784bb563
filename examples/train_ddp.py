"""Train the digits MLP with DistributedDataParallel: each rank streams its own share from one server.

Spawns --world-size CPU processes that join a gloo process group; each rank
iterates `RemoteDataset(...)`, which takes its rank and world size from that
group, so the ranks split every epoch as `DistributedSampler` would, and DDP
averages their gradients. With no --target, starts `batchwire serve --config
examples/digits.toml` first (as train_digits.py does) and stops it at the end.

    python examples/train_ddp.py                      # 2 ranks, server started for you
    python examples/train_ddp.py --world-size 4 --target host:50051

--record DIR writes DIR/rank<r>.json per rank (the sample indices it trained on
per epoch, and a checksum of its final weights); it needs a dataset whose items
carry their index as a third field, e.g. `digits_data:load` with
`kwargs = { split = "train", with_index = true }`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from train_digits import HERE, accuracy, local_server, make_model

from batchwire.client import DevicePrefetcher, RemoteDataset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, args: argparse.Namespace, target: str, rendezvous: str) -> None:
    """One rank: join the group, train on this rank's share, report."""
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=args.world_size)
    try:
        train_rank(rank, args, target)
    finally:
        dist.destroy_process_group()


def train_rank(rank: int, args: argparse.Namespace, target: str) -> None:
    device = torch.device("cpu")  # gloo; with NCCL this is f"cuda:{rank}"
    data = RemoteDataset(
        target,
        args.dataset,
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,  # rank and world size: from the process group, as DistributedSampler
    )
    model = DistributedDataParallel(make_model().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    seen: dict[int, list[int]] = {}
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        seen[epoch] = []
        totals = torch.zeros(2)  # loss sum, samples
        for batch in DevicePrefetcher(data, device):
            x, y = batch[0], batch[1]
            if args.record:
                if len(batch) < 3:
                    raise SystemExit(
                        f"--record needs items that carry their index; dataset {args.dataset!r} "
                        "sends (pixels, label) only (see this script's docstring)"
                    )
                seen[epoch].extend(batch[2].tolist())
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            totals += torch.tensor([loss.item() * len(y), len(y)])
        dist.all_reduce(totals)
        if rank == 0:
            print(
                f"epoch {epoch + 1:2d}/{args.epochs}  loss {totals[0] / totals[1]:.4f}  "
                f"({int(totals[1])} samples over {args.world_size} ranks)",
                flush=True,
            )
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    if args.record:
        record = {"rank": rank, "world_size": args.world_size, "epochs": seen, "checksum": checksum}
        (args.record / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        test_set = RemoteDataset(target, args.test_dataset, batch_size=256)
        result = accuracy(model.module, ([b[0], b[1]] for b in test_set), device)
        print(
            f"test accuracy through batchwire with {args.world_size} ranks: {result:.4f}",
            flush=True,
        )
        if result < args.min_accuracy:
            raise SystemExit(f"accuracy {result:.4f} is below --min-accuracy {args.min_accuracy}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("BATCHWIRE_TARGET"),
        help="an existing server (default: start one from --config)",
    )
    parser.add_argument("--config", type=Path, default=HERE / "digits.toml")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--test-dataset", default="digits-test")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("--record", type=Path, help="write rank<r>.json files here")
    args = parser.parse_args()
    if args.world_size < 1:
        parser.error(f"--world-size should be at least 1, but got {args.world_size}")
    if args.record:
        args.record.mkdir(parents=True, exist_ok=True)

    def spawn(target: str) -> None:
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        mp.spawn(run_rank, args=(args, target, rendezvous), nprocs=args.world_size, join=True)

    if args.target:
        spawn(args.target)
    else:
        with local_server(args.config, args.workers) as target:
            spawn(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
