"""``ops.<name>``: the op ``torch.ops.dpfit.<name>``, the library loaded on first access (a shim for the
model code of today; new code calls ``torch.ops.dpfit.<name>`` after
:func:`dpfit.model.kernels.load_library`)."""

from __future__ import annotations

import torch

from dpfit.model.kernels.library import load_library
from dpfit.model.kernels.registration import OPS, backward_node

#: rows per block of the embedding kernel (csrc/ops.cpp)
BLOCK_ROWS = 128

__all__ = ["BLOCK_ROWS", "OPS", "backward_node"]


def __getattr__(name: str):
    if name not in OPS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_library(required=True)
    op = getattr(torch.ops.dpfit, name)
    globals()[name] = op  # (looked up here once)
    return op
