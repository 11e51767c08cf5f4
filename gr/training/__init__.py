"""LightningModules, losses, optimizer groups, checkpoint I/O and training callbacks."""
