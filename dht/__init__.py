"""A Kademlia DHT over msgpack/UDP: sans-IO core, a Trio driver, an in-memory simulated network."""
