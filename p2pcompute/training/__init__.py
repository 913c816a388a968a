"""Training: the trainer around hivemind.Optimizer, compression, idle policy, checkpoints, the peer worker."""
