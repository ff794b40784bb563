"""examples/train_ddp.py with 2 ranks: each rank trains on its own share, together the epoch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

ROOT = Path(__file__).resolve().parents[2]
TRAIN_LENGTH = 1437  # digits_data.load("train")

# The example's own datasets, but the training items carry their index.
CONFIG = f"""
[server]
python_path = ["{ROOT / "examples"}"]

[datasets.digits]
source = "python"
factory = "digits_data:load"
kwargs = {{ split = "train", with_index = true }}

[datasets.digits-test]
source = "python"
factory = "digits_data:load"
kwargs = {{ split = "test" }}
"""


@pytest.mark.timeout(300)
def test_train_ddp_ranks_split_every_epoch(tmp_path: Path):
    config = tmp_path / "ddp.toml"
    config.write_text(CONFIG)
    record = tmp_path / "record"
    epochs = 4
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_ddp.py"),
            "--world-size=2",
            f"--epochs={epochs}",
            f"--config={config}",
            f"--record={record}",
            "--min-accuracy=0.85",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"test accuracy through batchwire with 2 ranks: 0\.\d+", result.stdout)
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    # DDP kept the replicas identical: same weights on both ranks at the end.
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    padding = 2 * -(-TRAIN_LENGTH // 2) - TRAIN_LENGTH  # DistributedSampler repeats 1 sample
    for epoch in range(epochs):
        shares = [rank["epochs"][str(epoch)] for rank in ranks]
        # Exactly DistributedSampler's share for each rank...
        for r, share in enumerate(shares):
            sampler = DistributedSampler(range(TRAIN_LENGTH), num_replicas=2, rank=r, seed=0)
            sampler.set_epoch(epoch)
            assert share == list(sampler), f"epoch {epoch} rank {r}"
        # ...so the ranks' samples are disjoint but for the padding, and cover the epoch.
        assert set(shares[0]) | set(shares[1]) == set(range(TRAIN_LENGTH))
        assert len(shares[0]) + len(shares[1]) == TRAIN_LENGTH + padding
        assert len(set(shares[0]) & set(shares[1])) == padding
        assert all(len(set(share)) == len(share) for share in shares)
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]  # a new order each epoch
