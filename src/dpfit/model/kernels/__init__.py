"""Compiled CPU kernels (optional): built on first use with the system's C++ compiler.

``set_compiled_kernels("auto" | "on" | "off")`` chooses them for this process; the models then use
them wherever they apply (embedding nets, the descriptor's slot contractions and per-atom products,
the environment matrix and its Jacobian, the fitting nets' energies and input gradients, on CPU
tensors) and the PyTorch path elsewhere. Sources: ``embedding_net.cpp``, ``slot_contraction.cpp``, ``environment.cpp``,
``fitting_net.cpp``, ``descriptor_product.cpp``.
"""

from dpfit.model.kernels.build import compiled_kernels_mode, embedding_extension, set_compiled_kernels

__all__ = ["compiled_kernels_mode", "embedding_extension", "set_compiled_kernels"]
