"""Datasets for the resume tests, served through the `python` source."""

from __future__ import annotations

from sample_datasets import SlowIndexed


def slow_indexed(length: int = 200, delay: float = 0.002) -> SlowIndexed:
    return SlowIndexed(length, delay)
