"""The README's main job: digits training through a real server reaches the local accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def train_digits(*args: str) -> str:
    """Runs examples/train_digits.py with ``args``; its stdout (the run must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def accuracy(stdout: str, through: str) -> float:
    return float(re.search(rf"test accuracy {through}: ([\d.]+)", stdout).group(1))


@pytest.mark.timeout(600)
def test_train_digits_through_batchwire_matches_local_training():
    stdout = train_digits("--local-baseline", "--epochs", "10")
    remote = accuracy(stdout, "through batchwire")
    local = accuracy(stdout, "with a local DataLoader")
    assert remote >= 0.95
    assert remote == pytest.approx(local, abs=0.02)


@pytest.mark.timeout(600)
def test_train_digits_with_a_batch_size_ramp_mid_epoch():
    """Issue 12, acceptance 4: 32 -> 64 -> 128 in the middle of epochs 3 and 6, still >= 0.95."""
    stdout = train_digits("--batch-ramp", "32,64,128", "--epochs", "8")
    changes = re.findall(r"batch size (\d+) -> (\d+) after (\d+) samples", stdout)
    assert [(int(a), int(b)) for a, b, _ in changes] == [(32, 64), (64, 128)], stdout
    assert all(0 < int(after) < 1437 for _, _, after in changes), "not in the middle of an epoch"
    assert accuracy(stdout, "through batchwire") >= 0.95
