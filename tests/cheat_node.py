"""`python -m cheat_node <p2pc args>` (tests/ on PYTHONPATH): the real `p2pc`, whose trainer fabricates its gradients
(p2pcompute.devtools.cheat). For the audit tests only."""

from p2pcompute.cli.main import main
from p2pcompute.devtools.cheat import fabricate_gradients

if __name__ == "__main__":
    fabricate_gradients()
    main()
