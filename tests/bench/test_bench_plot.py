"""``batchwire bench --plot FILE.png`` (issue 16 point 5): a PNG that decodes, with content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _serverproc import ServerProcess, batchwire_command
from PIL import Image, ImageStat


def test_bench_plot_writes_a_png(core_server: ServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    png, report = tmp_path / "bench.png", tmp_path / "bench.json"
    result = subprocess.run(
        [
            *batchwire_command(),
            *("bench", "--target", core_server.target, "--dataset", "dict"),
            *("--batch-size", "4", "--clients", "2", "--duration", "1.5", "--warmup", "0.5"),
            *("--json", str(report), "--plot", str(png)),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert f"plot: {png}" in result.stdout
    data = json.loads(report.read_text())
    timeline = data["timeline"]
    assert len(timeline["batches_per_s"]) == 2  # one line per client
    # The timeline adds up to the batches counted in the window.
    total = sum(sum(rates) * timeline["bin_s"] for rates in timeline["batches_per_s"])
    assert round(total) == data["batches"] > 0
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size == (1200, 450)
        # Lines, bars and text: far from one flat colour.
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 20


def test_bench_plot_without_matplotlib_fails_before_the_run(tmp_path: Path) -> None:
    # A stub that hides matplotlib; the target is never contacted.
    code = (
        "import sys; sys.modules['matplotlib'] = None; from batchwire.cli import main; "
        f"sys.exit(main(['bench', '--target', '127.0.0.1:1', '--dataset', 'x', "
        f"'--batch-size', '1', '--plot', {str(tmp_path / 'x.png')!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "--plot needs matplotlib" in result.stderr
    assert not (tmp_path / "x.png").exists()
