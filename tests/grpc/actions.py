"""Building REAPI actions for tests: the input tree, the Command and the Action, uploaded."""

from __future__ import annotations

import hashlib
from typing import Any

from google.protobuf import duration_pb2

from triode.proto import operations_pb2
from triode.proto import remote_execution_pb2 as pb

from .conftest import REAPI, Rpc

EXECUTE = REAPI + "Execution/Execute"
WAIT = REAPI + "Execution/WaitExecution"


def digest_of(data: bytes) -> pb.Digest:
    return pb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class ActionBuilder:
    """An input tree, a command and an action; :meth:`upload` stores every blob they need."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def blob(self, data: bytes) -> pb.Digest:
        d = digest_of(data)
        self.blobs[d.hash] = data
        return d

    def tree(
        self,
        files: dict[str, tuple[bytes, bool]],
        dirs: tuple[str, ...] = (),
        symlinks: dict[str, str] | None = None,
    ) -> pb.Digest:
        """The root Directory of a tree given as flat paths."""
        root: dict[str, Any] = {}

        def at(path: str) -> dict[str, Any]:
            node = root
            for part in [p for p in path.split("/") if p]:
                node = node.setdefault(part + "/", {})
            return node

        for d in dirs:
            at(d)
        for path, (data, executable) in files.items():
            parent, _, name = path.rpartition("/")
            at(parent)[name] = (data, executable)
        for path, target in (symlinks or {}).items():
            parent, _, name = path.rpartition("/")
            at(parent)[name] = target

        def build(node: dict[str, Any]) -> pb.Digest:
            directory = pb.Directory()
            for name in sorted(node):
                value = node[name]
                if name.endswith("/"):
                    directory.directories.append(pb.DirectoryNode(name=name[:-1], digest=build(value)))
                elif isinstance(value, str):
                    directory.symlinks.append(pb.SymlinkNode(name=name, target=value))
                else:
                    data, executable = value
                    directory.files.append(
                        pb.FileNode(name=name, digest=self.blob(data), is_executable=executable)
                    )
            return self.blob(directory.SerializeToString())

        return build(root)

    def action(
        self,
        argv: list[str],
        *,
        files: dict[str, tuple[bytes, bool]] | None = None,
        dirs: tuple[str, ...] = (),
        symlinks: dict[str, str] | None = None,
        output_files: tuple[str, ...] = (),
        output_directories: tuple[str, ...] = (),
        cwd: str = "",
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        do_not_cache: bool = False,
        salt: bytes = b"",
    ) -> pb.Digest:
        command = pb.Command(
            arguments=argv,
            environment_variables=[
                pb.Command.EnvironmentVariable(name=k, value=v)
                for k, v in sorted((env or {"PATH": "/usr/bin:/bin"}).items())
            ],
            output_files=output_files,
            output_directories=output_directories,
            working_directory=cwd,
        )
        action = pb.Action(
            command_digest=self.blob(command.SerializeToString()),
            input_root_digest=self.tree(files or {}, dirs, symlinks),
            do_not_cache=do_not_cache,
            salt=salt,
        )
        if timeout is not None:
            action.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout), nanos=int(timeout % 1 * 1e9)))
        return self.blob(action.SerializeToString())

    async def upload(self, rpc: Rpc, *, skip: set[str] | None = None) -> None:
        request = pb.BatchUpdateBlobsRequest(
            requests=[
                pb.BatchUpdateBlobsRequest.Request(digest=digest_of(data), data=data)
                for h, data in self.blobs.items()
                if h not in (skip or set())
            ]
        )
        response = await rpc.unary(
            REAPI + "ContentAddressableStorage/BatchUpdateBlobs", request, pb.BatchUpdateBlobsResponse
        )
        assert all(r.status.code == 0 for r in response.responses)


def response_of(op: operations_pb2.Operation) -> pb.ExecuteResponse:
    assert op.done, op
    response = pb.ExecuteResponse()
    assert op.response.Unpack(response)
    return response


def stage_of(op: operations_pb2.Operation) -> int:
    metadata = pb.ExecuteOperationMetadata()
    assert op.metadata.Unpack(metadata)
    return int(metadata.stage)


async def execute(
    rpc: Rpc, action: pb.Digest, *, skip_cache: bool = False, deadline: float = 60.0
) -> tuple[list[operations_pb2.Operation], pb.ExecuteResponse]:
    ops = await rpc.stream(
        EXECUTE,
        pb.ExecuteRequest(action_digest=action, skip_cache_lookup=skip_cache),
        operations_pb2.Operation,
        deadline=deadline,
    )
    return ops, response_of(ops[-1])
