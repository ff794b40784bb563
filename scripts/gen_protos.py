"""Regenerate the committed gRPC stubs from protos/ (python scripts/gen_protos.py).

The stubs land in core/v1/, which installs as ``batchwire.v1``. A test
regenerates them into a temporary folder and fails on any difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "batchwire/v1/batchwire.proto"


def generate(out_dir: Path) -> Path:
    """Writes the stubs under ``out_dir/batchwire/v1`` and returns that folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / "protos" / PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}")
    return out_dir / "batchwire" / "v1"


def main() -> None:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        target = ROOT / "core" / "v1"
        for path in generated.iterdir():
            shutil.copy(path, target / path.name)
            print(f"wrote {target / path.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
