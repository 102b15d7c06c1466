"""Regenerate the Python stubs of proto/atman/v1/atman.proto.

    python proto/generate.py                 # rewrite atman_vllm/proto_gen/
    python proto/generate.py --out DIR       # write into DIR instead (the
                                             # test compares DIR with the repo)

Needs grpcio-tools (the `test` extra), pinned to the grpcio version so the
committed stubs match what this script produces.

protoc names the stubs' import of the messages after the proto's path
(`from atman.v1 import atman_pb2`), which would make `atman` a top-level
package; the stubs live inside atman_vllm, so that one import is rewritten
to a relative one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "atman/v1/atman.proto"
REPO_OUT = PROTO_ROOT.parent / "atman_vllm" / "proto_gen"
STUB_NAMES = ("atman_pb2.py", "atman_pb2.pyi", "atman_pb2_grpc.py")

_ABSOLUTE_IMPORT = "from atman.v1 import atman_pb2 as"
_RELATIVE_IMPORT = "from . import atman_pb2 as"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into ``out_dir`` (created if needed); return their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        written = []
        for name in STUB_NAMES:
            text = (Path(tmp) / "atman" / "v1" / name).read_text()
            text = text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
