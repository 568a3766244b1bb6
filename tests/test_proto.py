"""The generated protobuf modules match their .proto files, and carry the published names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triode.proto import bytestream_pb2, operations_pb2, remote_execution_pb2, status_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / "triode" / "proto").mkdir(parents=True)
    for proto in (ROOT / "triode" / "proto").glob("*.proto"):
        shutil.copy(proto, tmp_path / "triode" / "proto" / proto.name)
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "triode" / "proto").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", *protos],
        cwd=tmp_path, check=True,
    )
    for generated in sorted((tmp_path / "triode" / "proto").glob("*_pb2.py*")):
        committed = ROOT / "triode" / "proto" / generated.name
        assert committed.read_bytes() == generated.read_bytes(), f"run scripts/gen-proto: {generated.name}"


def test_published_names_and_field_numbers() -> None:
    re = remote_execution_pb2
    assert re.DESCRIPTOR.package == "build.bazel.remote.execution.v2"
    assert re.ActionResult.DESCRIPTOR.full_name == "build.bazel.remote.execution.v2.ActionResult"
    fields = {f.name: f.number for f in re.ActionResult.DESCRIPTOR.fields}
    assert fields["output_files"] == 2 and fields["exit_code"] == 4 and fields["stdout_digest"] == 6
    assert {f.name: f.number for f in re.Digest.DESCRIPTOR.fields} == {"hash": 1, "size_bytes": 2}
    service = bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"]
    assert service.full_name == "google.bytestream.ByteStream"
    assert operations_pb2.Operation.DESCRIPTOR.full_name == "google.longrunning.Operation"
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"
    digest = re.Digest(hash="ab" * 32, size_bytes=3)
    assert re.Digest.FromString(digest.SerializeToString()) == digest
