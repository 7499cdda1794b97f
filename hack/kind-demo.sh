#!/usr/bin/env bash
# spegla on kind: a 3-node cluster with containerd prepared for it, the agent image built and loaded,
# the manifests applied, one image pulled on two nodes, and proof that the second pull was served by a
# peer: the second node cannot reach the upstream registry at all, and its agent counts a mirror hit.
#
# Needs docker, kind v0.31.0 or newer, kubectl, and what `make image` needs (docs/image.md).
# Usage: hack/kind-demo.sh [up|down]
#
# containerd config: kind's node images run containerd 2.x. Each patch below names its config version,
# and kind (from v0.31.0) applies a versioned patch only to a config file of that version: version 3
# keys (`io.containerd.cri.v1.images`) for a node whose config.toml says version = 3, version 2 keys
# (`io.containerd.grpc.v1.cri`) for one still written as version 2, which containerd 2.x migrates at
# start (containerd 2.x ignores version 2 keys in a version 3 file, and its migration of a version 2
# file replaces a version 3 `config_path` with the file's own). `spegla doctor` then checks on a node
# that the settings took.
set -euo pipefail

CLUSTER=${CLUSTER:-spegla-demo}
ARCHIVE=${ARCHIVE:-build/spegla-image.tar}  # what `make image` writes: localhost/spegla:0.1.0
TEST_IMAGE=${TEST_IMAGE:-docker.io/library/busybox:1.36.1}
FIRST="$CLUSTER-worker"
SECOND="$CLUSTER-worker2"

cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
k() { kubectl --context "kind-$CLUSTER" "$@"; }

agent_pod() {
  k -n spegla get pods -l app.kubernetes.io/component=agent \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}'
}

agent_metrics() {
  k get --raw "/api/v1/namespaces/spegla/pods/$(agent_pod "$1"):9090/proxy/metrics"
}

if [[ ${1:-up} == down ]]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi

for tool in docker kind kubectl make; do
  command -v "$tool" >/dev/null || { echo "kind-demo: needs $tool" >&2; exit 1; }
done
kind_minor=$(kind version | sed -n 's/^kind v0\.\([0-9]*\)\..*/\1/p')
if [[ -n $kind_minor ]] && (( kind_minor < 31 )); then
  echo "kind-demo: needs kind v0.31.0 or newer (version-aware containerd config patches);" \
    "found: $(kind version)" >&2
  exit 1
fi

log "building the agent image ($ARCHIVE)"
make image

log "cluster $CLUSTER: 1 control plane + 2 workers; containerd reads certs.d and keeps layers"
kind create cluster --name "$CLUSTER" --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
containerdConfigPatches:
  # containerd 2.x with a version 3 config
  - |-
    version = 3
    [plugins."io.containerd.cri.v1.images"]
      discard_unpacked_layers = false
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "/etc/containerd/certs.d"
    [plugins."io.containerd.metadata.v1.bolt"]
      content_sharing_policy = "isolated"
  # the same settings for a node image whose config file is still version 2
  - |-
    version = 2
    [plugins."io.containerd.grpc.v1.cri".containerd]
      discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "/etc/containerd/certs.d"
    [plugins."io.containerd.metadata.v1.bolt"]
      content_sharing_policy = "isolated"
nodes:
  - role: control-plane
  - role: worker
  - role: worker
EOF

log "loading $ARCHIVE into every node (the manifests use it as is: imagePullPolicy IfNotPresent)"
kind load image-archive "$ARCHIVE" --name "$CLUSTER"

log "installing spegla"
k apply -k manifests/
k -n spegla rollout status daemonset/spegla --timeout=5m
k -n spegla get pods -o wide

log "spegla doctor on $SECOND: containerd settings, hosts.toml, agent ports, peers"
k -n spegla exec "$(agent_pod "$SECOND")" -c registry -- spegla doctor \
  || { echo "kind-demo: doctor found a problem on $SECOND (see above)" >&2; exit 1; }

log "pulling $TEST_IMAGE on $FIRST (from the upstream registry)"
docker exec "$FIRST" crictl pull "$TEST_IMAGE"

log "cutting $SECOND off from Docker Hub, then pulling the same image there"
docker exec "$SECOND" sh -c 'for host in registry-1.docker.io auth.docker.io index.docker.io \
  production.cloudflare.docker.com; do echo "0.0.0.0 $host" >> /etc/hosts; done'
pulled=no
for _ in 1 2 3 4 5 6 7 8 9 10; do  # the first node may need a moment to advertise what it pulled
  if docker exec "$SECOND" crictl pull "$TEST_IMAGE"; then pulled=yes; break; fi
  sleep 3
done
[[ $pulled == yes ]] || { echo "kind-demo: the pull on $SECOND failed" >&2; exit 1; }

log "mirror requests counted by the agent on $SECOND"
agent_metrics "$SECOND" | grep '^spegel_mirror_requests_total' || true
hits=$(agent_metrics "$SECOND" \
  | awk '/^spegel_mirror_requests_total\{.*cache="hit"/ { sum += $NF } END { print sum + 0 }')
if awk -v hits="$hits" 'BEGIN { exit !(hits > 0) }'; then
  log "proof: $SECOND pulled $TEST_IMAGE with Docker Hub unreachable;" \
    "its agent had $hits requests served by a peer"
else
  echo "kind-demo: no mirror hit counted on $SECOND" >&2
  exit 1
fi
echo "Debug page: kubectl --context kind-$CLUSTER -n spegla port-forward <agent pod> 9090, then"
echo "http://localhost:9090/debug/web/   Remove the cluster: hack/kind-demo.sh down"
