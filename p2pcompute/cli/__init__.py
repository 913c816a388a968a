"""The `p2pc` command line: groups node, run, ledger, peers, bootstrap, demo."""
