"""Training: the loop, its sessions and checkpoints, Ray Train launch, evaluation, metrics, sweeps."""
