"""One request's peer fetch: open a peer's answer (hedged), stream and verify the bytes, fail over,
resume, fetch big blobs from several peers, and share one fetch between concurrent requests.

Owns: the `Forwarder` (agent-wide mirror state), the `RunContext` it hands each run, and
everything a single mirror run does.
May import: `registry.oci`, `registry.auth`, `registry.http`, `registry.burst` and the shared
seams; never `serve`.
"""
