"""The node daemon: composes identity, swarm, trainer and ledger; serves the local control API."""
