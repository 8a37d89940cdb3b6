"""The compiled embedding-net kernel (``csrc/embedding_net.cpp``, the op ``dpfit::value_and_tangent``).

Same values and gradients as :class:`~dpfit.model.tangent_function.ValueAndTangent` (to rounding),
computed in blocks of rows that stay in the core's cache: each layer's ``tanh`` and ``tx W`` are kept
from the forward; nothing else is written between the passes.
"""

from __future__ import annotations

import torch

from dpfit.model.kernels.ops import BLOCK_ROWS

__all__ = ["BLOCK_ROWS", "compiled_value_and_tangent", "kernel_applies"]


def kernel_applies(s: torch.Tensor, first_width: int) -> bool:
    """Whether the compiled kernel can run these rows (CPU, float32/64, a scalar input; not while
    ``torch.compile`` traces, which takes the PyTorch path)."""
    return not torch.compiler.is_compiling() and s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64) and first_width == 1


def compiled_value_and_tangent(kinds: tuple[int, ...], has_idt: tuple[bool, ...], s: torch.Tensor,
                               params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, dg/ds)`` of a tanh embedding net on s (rows, 1) through ``dpfit::value_and_tangent``
    (arguments as ValueAndTangent's); the activations for the backward are kept while autograd records."""
    keep = torch.is_grad_enabled() and (s.requires_grad or any(p.requires_grad for p in params))
    g, t, _ = torch.ops.dpfit.value_and_tangent(s, params, list(kinds), list(has_idt), keep)
    return g, t
