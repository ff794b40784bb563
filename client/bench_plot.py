"""``batchwire bench --plot FILE.png``: throughput over time per client, and the latency histogram.

matplotlib is an optional extra (``pip install batchwire[plot]``), imported
only here, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from typing import Any

from batchwire.client._errors import BatchwireError


class PlotError(BatchwireError):
    """The plot cannot be drawn (matplotlib missing, unwritable file)."""


def check() -> None:
    """Raises ``PlotError`` when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib: pip install 'batchwire[plot]' (or matplotlib)"
        ) from None


def plot(report: dict[str, Any], path: str) -> None:
    """Draws ``report`` (``bench.run``'s) into a PNG at ``path``."""
    check()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    config = report["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    try:
        timeline = report["timeline"]
        bin_s = timeline["bin_s"]
        for client, rates in enumerate(timeline["batches_per_s"]):
            times = [(i + 0.5) * bin_s for i in range(len(rates))]
            left.plot(times, rates, label=f"client {client}")
        left.set_xlabel("seconds into the measured window")
        left.set_ylabel("batches/s")
        left.set_title(
            f"throughput: {report['batches_per_s']:.1f} batches/s, {report['mb_per_s']:.1f} MB/s"
        )
        left.set_ylim(bottom=0)
        left.grid(alpha=0.3)
        left.legend(loc="lower right", fontsize="small")

        buckets = report["latency_histogram"]
        if buckets:
            bounds = [b["le"] * 1000 for b in buckets]
            lows = [bounds[0] / (bounds[1] / bounds[0]) if len(bounds) > 1 else bounds[0] / 2]
            lows += bounds[:-1]
            right.bar(
                lows,
                [b["count"] for b in buckets],
                width=[hi - lo for lo, hi in zip(lows, bounds, strict=True)],
                align="edge",
                edgecolor="black",
            )
            if len(bounds) > 1:
                right.set_xscale("log")
        latency = report["latency_s"]
        p50 = latency.get("p50")
        right.set_title(
            "latency between batches"
            + (
                ""
                if p50 is None
                else f": p50 {p50 * 1000:.2f} ms, p99 {latency['p99'] * 1000:.2f} ms"
            )
        )
        right.set_xlabel("ms")
        right.set_ylabel("batches")
        fig.suptitle(
            f"batchwire bench: {config['dataset']}, batch {config['batch_size']}, "
            f"{config['clients']} client(s) x {config['streams']} stream(s), {config['duration']} s"
        )
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            raise PlotError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
