"""Training entry points: python -m train.pretrain, data, sharding, checkpoints, metrics."""
