"""Calculators for simulation packages: an ASE calculator for dpfit and DeePMD-kit models."""

from dpfit.calculators.ase import DPCalculator, SkinNeighborList

__all__ = ["DPCalculator", "SkinNeighborList"]
