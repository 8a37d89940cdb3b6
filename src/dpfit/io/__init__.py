"""Checkpoints in and out: DeePMD-kit import."""
