"""What this node tells the DHT: the state tracker (containerd's content -> advertised keys), the
advertiser that merges the tracker's, the ingest watcher's and the claims' voices, the Router over
the DHT, and `spegla keys`.

Owns: keeping the advertised keys equal to what containerd holds.
May import: the agent's shared modules, `agent.containerd`, `agent.observability`, `registry`,
`dht`.
"""
