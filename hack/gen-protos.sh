#!/usr/bin/env bash
# Regenerate the committed protobuf + grpclib stubs in agent/proto/ from the project's own minimal
# containerd .proto files. Needs the dev extras (grpcio-tools ships protoc and the well-known types;
# grpclib ships the protoc-gen-grpclib_python plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN=${VENV_BIN:-.venv/bin}
export PATH="$PWD/$VENV_BIN:$PATH"   # protoc looks plugins up on PATH

rm -f agent/proto/*_pb2.py agent/proto/*_pb2.pyi agent/proto/*_grpc.py
# -I . makes imports resolve as agent/proto/x.proto, so the generated modules import each other as
# `from agent.proto import x_pb2` and stay flat in agent/proto/.
"$VENV_BIN/python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpclib_python_out=. \
  agent/proto/*.proto
# Files without a service get an empty grpclib module: drop those.
for f in agent/proto/*_grpc.py; do grep -q 'Stub' "$f" || rm -f "$f"; done
echo "gen-protos: $(ls agent/proto/*_pb2.py agent/proto/*_grpc.py | wc -l) modules in agent/proto/" >&2
