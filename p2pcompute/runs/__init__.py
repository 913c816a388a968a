"""Runs: the signed run manifest, the model/dataset/optimizer zoo, and run discovery in the DHT."""
