"""Draws the benchmark figures of RESULTS.md from the JSON in benchmarks/results/.

    python benchmarks/plots.py [--results benchmarks/results] [--out benchmarks/figures]

Needs matplotlib (``pip install 'batchwire[plot]'``). Reads only the recorded
JSON, so redrawing costs no benchmark run; a figure whose JSON is missing is
skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt

HERE = Path(__file__).resolve().parent


def _load(results: Path, *names: str) -> dict[str, Any] | None:
    """The first of ``names`` (e.g. a rerun before the original) that exists."""
    for name in names:
        path = results / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def wire_throughput(data: dict[str, Any], ax: Any) -> None:
    names = list(data["results"])
    values = [data["results"][n]["gb_per_s"] for n in names]
    ax.bar(names, values, color="#1f77b4", label="batchwire")
    base = data["baselines_bytes_per_s"]
    for key, style in (("iperf3", ":"), ("bare_tuned", "--")):
        if key in base:
            ax.axhline(base[key] / 1e9, linestyle=style, color="gray", label=f"{key} (loopback)")
    ax.set_ylabel("GB/s")
    ax.set_title("1. wire throughput by dataset")
    ax.legend(fontsize="small")


def mnist_rate(data: dict[str, Any], ax: Any) -> None:
    names = list(data["results"])
    ax.bar(names, [data["results"][n]["batches_per_s"] for n in names], color="#1f77b4")
    ax.axhline(data["target_batches_per_s"], linestyle="--", color="red", label="target")
    ax.axhline(
        data["bare_grpc_messages_per_s"], linestyle=":", color="gray", label="bare gRPC msgs/s"
    )
    ax.set_ylabel("batches/s")
    ax.set_title("2. mnist batches/s")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right", fontsize="small")
    ax.legend(fontsize="small")


def chunking(data: dict[str, Any], ax: Any) -> None:
    names = list(data["results"])
    x = range(len(names))
    rows = data["results"]
    for offset, key, label in (
        (-0.27, "imagenet_mb_per_s", "imagenet"),
        (0.0, "big_mb_per_s", "big"),
        (0.27, "bare_grpc_mb_per_s", "bare gRPC"),
    ):
        ax.bar([i + offset for i in x], [rows[n][key] for n in names], width=0.27, label=label)
    ax.set_xticks(list(x), names)
    ax.set_xlabel("chunk_bytes")
    ax.set_ylabel("MB/s")
    ax.set_title("3. throughput by chunk size")
    ax.legend(fontsize="small")


def fairness(data: dict[str, Any], ax: Any) -> None:
    clients = data["per_client"]
    ax.bar([str(c["client"]) for c in clients], [c["mb_per_s"] for c in clients], color="#2ca02c")
    ax.set_xlabel("client")
    ax.set_ylabel("MB/s")
    ax.set_title(
        f"5. {len(clients)} concurrent clients: fairness {data['fairness']:.2f}, "
        f"aggregate x{data['aggregate_ratio']:.2f} of one"
    )


def memory(data: dict[str, Any], ax: Any) -> None:
    samples = data["samples"]
    t0 = samples[0]["t"]
    times = [s["t"] - t0 for s in samples]
    ax.plot(times, [s["server"] / 1e6 for s in samples], label="server process")
    ax.plot(times, [s["tree"] / 1e6 for s in samples], label="server + workers")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MB")
    ax.set_ylim(bottom=0)
    ax.set_title("6. server memory with a slow consumer")
    ax.legend(fontsize="small")


FIGURES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], Any], None]]] = {
    "wire_throughput": (("wire_throughput-rerun", "wire_throughput"), wire_throughput),
    "mnist_rate": (("mnist_rate",), mnist_rate),
    "chunking": (("chunking",), chunking),
    "fairness": (("fairness",), fairness),
    "memory": (("memory",), memory),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (sources, draw) in FIGURES.items():
        data = _load(args.results, *sources)
        if data is None:
            print(f"{name}: no {sources[-1]}.json in {args.results}; skipped", file=sys.stderr)
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        try:
            draw(data, ax)
            ax.grid(alpha=0.3, axis="y")
            fig.tight_layout()
            fig.savefig(args.out / f"{name}.png", format="png")
        finally:
            plt.close(fig)
        print(args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
