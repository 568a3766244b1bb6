"""The protobuf messages of Bazel's Remote Execution API, ByteStream, longrunning and
google.rpc, as the HTTP cache and gRPC front doors speak them.

The ``.proto`` files here are Triode's copies of the published ones (names, packages and
field numbers unchanged); the ``*_pb2`` modules are generated from them by grpcio-tools
(``scripts/gen-proto``) for the protobuf runtime, and committed.
"""
