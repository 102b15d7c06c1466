"""The committed gRPC stubs are exactly what the proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "atman_vllm" / "proto_gen"


def test_regenerating_the_stubs_gives_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["atman_pb2.py", "atman_pb2.pyi", "atman_pb2_grpc.py"]
    for name in generated:
        assert (tmp_path / name).read_text() == (STUBS / name).read_text(), (
            f"{name} is stale: run `python proto/generate.py` and commit the result")


def test_stubs_import_without_vllm_or_the_server():
    code = ("import sys; import atman_vllm.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'atman_server')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
