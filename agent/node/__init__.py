"""Setting a node up: its DHT id, its advertised address, finding the first peers (static, DNS,
HTTP, Lease), and containerd's hosts.toml mirror configuration.

Owns: what the agent derives from its configuration and writes on the node before serving.
May import: the agent's shared modules, `agent.containerd`, `agent.observability`, `registry`,
`dht`.
"""
