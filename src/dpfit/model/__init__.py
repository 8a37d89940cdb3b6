"""Plain-PyTorch Deep Potential model (no Hydra, no Lightning)."""

from dpfit.model.descriptor import SeE2A, environment_matrix, switching_function
from dpfit.model.energy_model import DTYPES, EnergyModel, pair_vectors
from dpfit.model.fitting import EnergyFitting
from dpfit.model.network import ResidualMLP

__all__ = [
    "DTYPES",
    "EnergyFitting",
    "EnergyModel",
    "ResidualMLP",
    "SeE2A",
    "environment_matrix",
    "pair_vectors",
    "switching_function",
]
