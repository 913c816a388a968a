"""Tools for tests and benchmarks; the top layer: they may import anything in p2pcompute, nothing in it imports them."""
