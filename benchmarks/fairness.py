"""Target 5: eight concurrent clients share the server fairly and lose little in aggregate.

    python benchmarks/fairness.py [--duration 8] [--clients 8] [--quick]

cifar (256 x 3 x 32 x 32 float32, 3 MB) from a no-work dataset; one client,
then N clients at once (separate processes, started together). Targets:
aggregate(N) >= 0.9 x aggregate(1), slowest >= 0.8 x fastest.
"""

from __future__ import annotations

import _harness as h


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=8.0, repeats=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dataset", default="cifar", choices=sorted(h.SHAPES))
    args = parser.parse_args()
    duration, warmup, repeats = h.timing(args)
    clients = 2 if args.quick else args.clients
    batch_size, shape, dtype = h.SHAPES[args.dataset]
    datasets = [h.dataset_toml(args.dataset, shape, dtype, source="python", length=1 << 20)]
    runs: dict[int, list] = {1: [], clients: []}
    with h.Server(h.server_toml(datasets), workers=2) as server:
        for _ in range(repeats):  # interleaved: 1, N, 1, N, ...
            for n in (1, clients):
                runs[n].append(
                    h.bench(
                        server,
                        args.dataset,
                        batch_size,
                        duration=duration,
                        warmup=warmup,
                        batches=h.stop_after(args),
                        clients=n,
                    )
                )
    one, many = h.best(runs[1]), h.best(runs[clients])
    ratio = many["mb_per_s"] / one["mb_per_s"]
    print(
        h.table(
            f"{args.dataset}: 1 client vs {clients} concurrent ({duration:g} s, median of {repeats})",
            ["clients", "MB/s", "batches/s", "slowest/fastest", "x one client"],
            [
                [1, one["mb_per_s"], one["batches_per_s"], one["fairness"], 1.0],
                [clients, many["mb_per_s"], many["batches_per_s"], many["fairness"], ratio],
            ],
        )
    )
    print(
        h.table(
            "per client",
            ["client", "batches/s", "MB/s", "first batch ms"],
            [
                [
                    c["client"],
                    c["batches_per_s"],
                    c["mb_per_s"],
                    (c["time_to_first_batch_s"] or 0) * 1e3,
                ]
                for c in many["clients"]
            ],
        )
    )
    h.write_json(
        "fairness",
        args,
        {
            "dataset": args.dataset,
            "duration_s": duration,
            "clients": clients,
            "one_client_mb_per_s": one["mb_per_s"],
            "many_clients_mb_per_s": many["mb_per_s"],
            "aggregate_ratio": ratio,
            "fairness": many["fairness"],
            "per_client": many["clients"],
            "targets": {"aggregate_ratio": 0.9, "fairness": 0.8},
        },
    )


if __name__ == "__main__":
    main()
