"""The README's main job: digits training through a real server reaches the local accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_train_digits_through_batchwire_matches_local_training():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_digits.py"),
            "--local-baseline",
            "--epochs",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    remote = float(re.search(r"test accuracy through batchwire: ([\d.]+)", result.stdout).group(1))
    local = float(
        re.search(r"test accuracy with a local DataLoader: ([\d.]+)", result.stdout).group(1)
    )
    assert remote >= 0.95
    assert remote == pytest.approx(local, abs=0.02)


@pytest.mark.timeout(600)
def test_train_digits_with_a_batch_size_ramp_mid_epoch():
    """Issue 12, acceptance 4: 32 -> 64 -> 128 in the middle of epochs 3 and 6, still >= 0.95."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_digits.py"),
            "--batch-ramp",
            "32,64,128",
            "--epochs",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    changes = re.findall(r"batch size (\d+) -> (\d+) after (\d+) samples", result.stdout)
    assert [(int(a), int(b)) for a, b, _ in changes] == [(32, 64), (64, 128)], result.stdout
    assert all(0 < int(after) < 1437 for _, _, after in changes), "not in the middle of an epoch"
    remote = float(re.search(r"test accuracy through batchwire: ([\d.]+)", result.stdout).group(1))
    assert remote >= 0.95
