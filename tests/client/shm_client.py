"""A trainer process for the shared-memory tests: streams a dataset, says what it got.

python shm_client.py TARGET DATASET TRANSPORT [hold]
prints "transport T", then "got I CHECKSUM" per batch, then "done"; with "hold" it
keeps every batch (its mappings) and waits a little after each, to be killed mid-stream.
"""

from __future__ import annotations

import logging
import sys
import time

from batchwire.client import RemoteDataset


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    target, dataset, transport = sys.argv[1:4]
    hold = sys.argv[4:] == ["hold"]
    ds = RemoteDataset(target, dataset, batch_size=4, transport=transport)
    print("transport", ds.transport, flush=True)
    kept = []
    for i, batch in enumerate(ds):
        tensors = batch.values() if isinstance(batch, dict) else batch
        total = sum(float(t.double().sum()) for t in tensors)
        print("got", i, total, flush=True)
        if hold:
            kept.append(batch)
            time.sleep(0.2)
    print("done", ds.stats().transport, flush=True)


if __name__ == "__main__":
    main()
