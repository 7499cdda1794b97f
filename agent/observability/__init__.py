"""What an operator sees: the metrics/debug server, the debug page and its feed, live stats, the
DHT's metrics and `spegla watch`.

Owns: read-only views of the running agent.
May import: the agent's shared modules, `agent.containerd`, `registry`, `dht`.
"""
