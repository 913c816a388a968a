"""The swarm: the node's DHT on its libp2p host, signed peer records, discovery and bootstrap peers."""
