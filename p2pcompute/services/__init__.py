"""The node's network services on its libp2p host, each a `protocol.Servicer`: ledger sync, credits."""
