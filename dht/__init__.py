"""A Kademlia DHT over msgpack/UDP: sans-IO core, a Trio driver and an in-memory simulated network."""
