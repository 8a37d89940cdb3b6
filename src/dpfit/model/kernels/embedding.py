"""The compiled embedding-net kernel as an autograd Function (see ``embedding_net.cpp``).

Same values and gradients as :class:`~dpfit.model.tangent_function.ValueAndTangent` (to rounding),
computed in blocks of rows that stay in the core's cache: each layer's ``tanh`` and ``tx W`` are kept
from the forward; nothing else is written between the passes.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

#: rows per block: two layers of 100 channels at 128 rows fit in a core's L2 cache
BLOCK_ROWS = 128


def _layers(has_idt: tuple[bool, ...], params: tuple[torch.Tensor, ...], empty: torch.Tensor):
    matrices, biases, idts = [], [], []
    p = 0
    for with_idt in has_idt:
        matrices.append(params[p])
        biases.append(params[p + 1])
        idts.append(params[p + 2] if with_idt else empty)
        p += 3 if with_idt else 2
    return matrices, biases, idts


def layer_grads(has_idt: tuple[bool, ...], per_layer: list[torch.Tensor]) -> list[torch.Tensor]:
    """A kernel backward's (dW, db, didt) per layer, flattened like the parameters (no didt where a
    layer has no idt)."""
    grads: list[torch.Tensor] = []
    for k, with_idt in enumerate(has_idt):
        grads += per_layer[3 * k: 3 * k + (3 if with_idt else 2)]
    return grads


def kernel_applies(s: torch.Tensor, first_width: int) -> bool:
    """Whether the compiled kernel can run these rows (CPU, float32/64, a scalar input; not while
    ``torch.compile`` traces, which takes the PyTorch path)."""
    return not torch.compiler.is_compiling() and s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64) and first_width == 1


class CompiledValueAndTangent(torch.autograd.Function):
    """``(g, dg/ds)`` of a tanh embedding net on s (rows, 1); arguments as ValueAndTangent's, after
    the extension module."""

    @staticmethod
    def forward(ctx, ext: ModuleType, kinds: tuple[int, ...], has_idt: tuple[bool, ...], s: torch.Tensor,
                *params: torch.Tensor):
        s = s.contiguous()
        matrices, biases, idts = _layers(has_idt, params, s.new_empty(0))
        g, t, *kept = ext.value_and_tangent(s, matrices, biases, idts, list(kinds), BLOCK_ROWS, True)
        ctx.ext, ctx.kinds, ctx.has_idt = ext, kinds, has_idt
        ctx.save_for_backward(s, *kept, *params)
        return g, t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g: torch.Tensor | None, grad_t: torch.Tensor | None):
        s, *rest = ctx.saved_tensors
        n = len(ctx.kinds)
        kept_h, kept_u, params = rest[:n], rest[n:2 * n], tuple(rest[2 * n:])
        matrices, biases, idts = _layers(ctx.has_idt, params, s.new_empty(0))
        like = kept_h[-1]
        grad_g = torch.zeros_like(like) if grad_g is None else grad_g.contiguous()
        grad_t = torch.zeros_like(like) if grad_t is None else grad_t.contiguous()
        need_s = ctx.needs_input_grad[3]
        grad_s, *per_layer = ctx.ext.value_and_tangent_backward(
            s, grad_g, grad_t, kept_h, kept_u, matrices, biases, idts, list(ctx.kinds), BLOCK_ROWS, need_s)
        return (None, None, None, grad_s if need_s else None, *layer_grads(ctx.has_idt, per_layer))


def compiled_value_and_tangent(ext: ModuleType, kinds: tuple[int, ...], has_idt: tuple[bool, ...], s: torch.Tensor,
                               params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Through :class:`CompiledValueAndTangent` while autograd records, else the kernel's forward alone."""
    if torch.is_grad_enabled() and (s.requires_grad or any(p.requires_grad for p in params)):
        return CompiledValueAndTangent.apply(ext, kinds, has_idt, s, *params)
    matrices, biases, idts = _layers(has_idt, tuple(p.detach() for p in params), s.new_empty(0))
    g, t = ext.value_and_tangent(s.detach().contiguous(), matrices, biases, idts, list(kinds), BLOCK_ROWS, False)
    return g, t
