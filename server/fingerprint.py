"""A dataset's fingerprint: a hash of everything in the config that determines its bytes.

Replicas of a server are interchangeable only when they serve the same bytes
for the same request (DESIGN.md, Scale). The fingerprint hashes the dataset's
config table as written (source and its settings, transforms, collate, the
sampler's defaults), its length and the wire version, in a canonical form: the
same on every machine and after every restart, so that a client can tell a
replica with another config (or a checkpoint of a changed dataset) from a twin.

What it cannot see: the contents of files the config names (a file replaced by
another of the same length) and the code behind import paths. Paths are hashed
as written, so replicas may mount the data at different absolute places.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from batchwire.server.config import DatasetConfig
from batchwire.v1 import batchwire_pb2 as pb

WIRE_VERSION = pb.DESCRIPTOR.package
"""The wire contract's version ("batchwire.v1"): a new one may encode the same batch differently."""


def dataset_fingerprint(config: DatasetConfig, length: int) -> str:
    """``"sha256:<hex>"`` of the dataset's config, length and wire version (see the module)."""
    content = {
        "wire": WIRE_VERSION,
        "source": config.source,
        "options": config.options,
        "pipeline": config.pipeline,
        "length": length,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=_plain)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _plain(value: Any) -> Any:
    # TOML's dates and times (json has no type for them); tuples are lists already.
    return value.isoformat() if hasattr(value, "isoformat") else repr(value)
