"""benchmarks/plots.py draws RESULTS.md's figures from the recorded JSON: PNGs that decode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_plots_redraws_every_figure_results_md_shows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "plots.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    shown = (BENCHMARKS / "RESULTS.md").read_text()
    drawn = sorted(tmp_path.glob("*.png"))
    assert len(drawn) == 5
    for png in drawn:
        assert f"(figures/{png.name})" in shown, png.name
        assert (BENCHMARKS / "figures" / png.name).exists(), f"{png.name} is not committed"
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG" and image.size == (700, 400)
