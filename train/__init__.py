"""Training: SAE architectures, the shuffled cache loader, the sweep trainer, SAELens-format checkpoints."""
