"""Helpers of the client tests: a config with slow and indexed datasets, short retries.

(No conftest.py in this folder: a second module named ``conftest`` would
shadow ``tests/conftest.py`` for ``from conftest import ...``.)
"""

from __future__ import annotations

from pathlib import Path

from batchwire.client import RetryPolicy

CLIENT_TESTS_DIR = Path(__file__).resolve().parent

RESUME_CONFIG = f"""
[server]
python_path = ["{CLIENT_TESTS_DIR.parent}", "{CLIENT_TESTS_DIR}"]
prefetch_batches = 2
grace_seconds = 0.5

[datasets.slow]
source = "python"
factory = "slow_datasets:slow_indexed"
kwargs = {{ length = 240, delay = 0.002 }}

[datasets.indexed]
source = "python"
factory = "sample_datasets:indexed_dict"
kwargs = {{ length = 103 }}
"""

# Short waits: a test never sits out a production-sized backoff.
FAST_RETRY = RetryPolicy(attempts=200, deadline=60.0, initial_backoff=0.02, max_backoff=0.2)
