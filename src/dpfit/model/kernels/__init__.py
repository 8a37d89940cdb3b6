"""Compiled CPU kernels (optional): the dpfit op library, ``torch.ops.dpfit.<name>``.

The ops are declared and implemented in C++ (``csrc/ops.cpp``: ``TORCH_LIBRARY(dpfit, ...)``; kernels in
``embedding_net.cpp``, ``slot_contraction.cpp``, ``environment.cpp``, ``fitting_net.cpp``,
``descriptor_product.cpp``, ``tabulation.cpp``), built into one shared library with no Python in it: by
ninja on first use (:func:`load_library`), by CMake (``csrc/CMakeLists.txt``) for C++ hosts, or taken prebuilt from
``DPFIT_OPS_LIBRARY``. Python adds the fake implementations and backward formulas
(:mod:`dpfit.model.kernels.registration`). See docs/kernels.md.
"""

from dpfit.model.kernels.library import library_path, load_library

__all__ = ["library_path", "load_library"]
