"""dpfit: Deep Potential (se_e2_a) energy models trained with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
