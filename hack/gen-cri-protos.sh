#!/usr/bin/env bash
# Regenerate the test harness's CRI stubs (protobuf + grpclib) from tests/harness/proto/cri_images.proto.
# The generated files are committed; run this only after changing the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# grpclib's protoc plugin (protoc-gen-grpclib_python) lives in the venv's bin
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpclib_python_out=. \
  tests/harness/proto/cri_images.proto
echo "generated: $(ls tests/harness/proto/cri_images_pb2.py tests/harness/proto/cri_images_pb2.pyi tests/harness/proto/cri_images_grpc.py | tr '\n' ' ')"
