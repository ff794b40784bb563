"""Datasets for the resume tests, served through the `python` source."""

from __future__ import annotations

import time

from sample_datasets import IndexedDict


class SlowIndexed(IndexedDict):
    """``IndexedDict`` that takes ``delay`` seconds per item, so that a test can
    kill the server while an epoch is surely still being streamed."""

    def __init__(self, length: int, delay: float) -> None:
        super().__init__(length)
        self.delay = delay

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return super().__getitem__(index)


def slow_indexed(length: int = 200, delay: float = 0.002) -> SlowIndexed:
    return SlowIndexed(length, delay)
