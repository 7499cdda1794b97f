"""This node's containerd: the gRPC client (behind the one asyncio bridge), the content store the
registry serves from, in-flight downloads, media types, image walks, and containerd's config files.

Owns: every conversation with containerd and every reading of its files.
May import: the agent's shared modules (`agent.config`, `agent.flag`, `agent.logs`), `registry`,
`dht`.
"""
