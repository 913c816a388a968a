"""p2pcompute: peer-to-peer volunteer compute with a signed, replicated credit ledger."""

__version__ = "0.1.0"
