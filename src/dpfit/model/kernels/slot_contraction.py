"""The descriptor's slot contractions on embedding rows, through the compiled kernels
(``slot_contraction.cpp``): same values as gathering the rows into the padded (atom, slot) layout and
contracting there (:meth:`~dpfit.model.descriptor.SeE2A.descriptor_from_env`), without writing the
padded tensors or their gradients.

A block's slots point at rows with ``index`` (N, k); the extension's ``slots_of_rows`` (a counting
sort) lists each row's slots for the backward passes, which sum over them row by row (no two threads
write one row).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable


class GTFromRows(torch.autograd.Function):
    """``out[n] = sum_j R[n, j]^T G[index[n, j]]`` (N, 4, M); R (N, k, 4) carries no gradient.

    Also returns G itself (a view): the later SlotProductsFromRows reads the rows through it, so its row gradient
    arrives here and is summed into this backward's rows in the same pass (no separate (R, M) array
    added by autograd)."""

    @staticmethod
    def forward(ctx, ext: ModuleType, g: torch.Tensor, index: torch.Tensor, r: torch.Tensor, order: torch.Tensor,
                ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.ext, ctx.n_rows, ctx.k = ext, g.shape[0], index.shape[1]
        ctx.save_for_backward(r, order, ptr)
        return ext.slot_gt(g, index, r), g.view_as(g)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor | None, grad_rows: torch.Tensor | None):
        r, order, ptr = ctx.saved_tensors
        if grad is None:
            return None, grad_rows, None, None, None, None
        grad_g = ctx.ext.slot_rows(r, grad.contiguous(), order, ptr, ctx.n_rows, ctx.k, grad_rows)
        return None, grad_g, None, None, None, None


class SlotProductsFromRows(torch.autograd.Function):
    """``part[n, j, c] = G[index[n, j]] . gbar[n, c]`` and ``tds`` likewise with T (N, k, 4 each);
    gbar (N, 4, M). Zeros on the slots where ``valid`` (N, k) is false (padded slots, whose products
    the forces' pass never uses); their gradients are not read."""

    @staticmethod
    def forward(ctx, ext: ModuleType, g: torch.Tensor, t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                gbar: torch.Tensor, order: torch.Tensor, ptr: torch.Tensor):
        ctx.ext, ctx.n_rows, ctx.k = ext, g.shape[0], index.shape[1]
        ctx.save_for_backward(g, t, index, valid, gbar, order, ptr)
        part, tds = ext.slot_env(g, t, index, valid, gbar)
        return part, tds

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_part: torch.Tensor | None, grad_tds: torch.Tensor | None):
        g, t, index, valid, gbar, order, ptr = ctx.saved_tensors
        grad_part = torch.zeros(index.shape + (4,), dtype=g.dtype) if grad_part is None else grad_part.contiguous()
        grad_tds = torch.zeros(index.shape + (4,), dtype=g.dtype) if grad_tds is None else grad_tds.contiguous()
        ext, n_rows, k = ctx.ext, ctx.n_rows, ctx.k
        grad_g, grad_t = ext.slot_rows_value_and_tangent(grad_part, grad_tds, gbar, order, ptr, valid, n_rows, k)
        grad_g = grad_g if ctx.needs_input_grad[1] else None
        grad_t = grad_t if ctx.needs_input_grad[2] else None
        grad_gbar = ext.slot_env_gbar(g, t, index, valid, grad_part, grad_tds) if ctx.needs_input_grad[5] else None
        return None, grad_g, grad_t, None, None, grad_gbar, None, None
