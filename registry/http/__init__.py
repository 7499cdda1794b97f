"""HTTP/1.1 transport, no registry knowledge: a generic ASGI server on h11 (with the zero-copy
`pathsend` / `zerocopysend` extensions and the lifespan protocol), accepting connections, the
pooled peer client and dialling a peer's addresses.

Owns: bytes on sockets (parsing with h11, framing, sendfile, deadlines for reads and writes).
May import: `registry.oci`, `registry.auth` and the shared seams (`registry.interfaces`,
`registry.events`, `registry.metrics`); never `burst`, `mirror` or `serve`.
"""
