"""Training: LightningModule, losses, learning-rate schedule, statistics, metrics, callbacks."""
