"""Generated protobuf and grpclib stubs for the parts of containerd's API spegla uses.

Why: the agent talks gRPC to containerd over its unix socket. The `.proto` sources here are the
project's own minimal subset (field numbers follow containerd's API); regenerate the `*_pb2.py`,
`*_pb2.pyi` and `*_grpc.py` modules with `hack/gen-protos.sh` after editing them.
"""
