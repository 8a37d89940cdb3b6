"""Compiled CPU kernels (optional): built on first use with the system's C++ compiler.

A model uses them where its ``kernels`` option (auto / on / off) allows and they apply (CPU tensors):
the embedding nets, the descriptor's slot contractions and per-atom products, the environment matrix
and its Jacobian, the fitting nets' energies and input gradients; the PyTorch path elsewhere. The one
dispatch point is :func:`compiled_kernels`. Sources: ``embedding_net.cpp``, ``slot_contraction.cpp``,
``environment.cpp``, ``fitting_net.cpp``, ``descriptor_product.cpp``; each kernel is a registered custom
op, ``torch.ops.dpfit.<name>`` (:mod:`dpfit.model.kernels.ops`: fake implementations for
``torch.compile`` / ``torch.fx``, and the backward formulas), registered when this package is imported.
"""

from dpfit.model.kernels import ops  # noqa: F401  (registers the ops)
from dpfit.model.kernels.build import (
    MODES,
    compiled_kernels,
    compiled_kernels_mode,
    kernels_available,
    loaded_kernels,
    set_compiled_kernels,
)

__all__ = ["MODES", "load_library", "compiled_kernels", "compiled_kernels_mode", "kernels_available", "loaded_kernels",
           "set_compiled_kernels"]


def load_library(required: bool) -> str | None:
    """(transitional) The op library loaded: its name, or None where unavailable (``required``: an error)."""
    return "dpfit" if compiled_kernels("on" if required else "auto") is not None else None
