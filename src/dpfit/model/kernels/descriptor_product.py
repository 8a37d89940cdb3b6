"""The descriptor's per-atom products through the compiled kernels (``descriptor_product.cpp``):
``D = G^T G<`` and ``g_bar``, its gradient for ``G`` under dE/dD, the same values as the
``torch.bmm`` products of :meth:`~dpfit.model.descriptor.SeE2A.descriptor_from_env` and
:meth:`~dpfit.model.descriptor.SeE2A.env_gradient` without a BLAS call per atom.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable


class DescriptorGram(torch.autograd.Function):
    """``D[n] = G[n]^T G[n][:, :a]`` (N, M, a) from G (N, 4, M)."""

    @staticmethod
    def forward(ctx, ext: ModuleType, g: torch.Tensor, a: int) -> torch.Tensor:
        ctx.ext = ext
        ctx.save_for_backward(g)
        return ext.descriptor_gram(g, g, a, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (g,) = ctx.saved_tensors
        return None, ctx.ext.descriptor_vjp(g, grad.contiguous()), None


class DescriptorVJP(torch.autograd.Function):
    """``V[n] = G[n][:, :a] W[n]^T + pad(G[n] W[n])`` (N, 4, M): the gradient of D for G under the
    cotangent W (N, M, a). Bilinear: its gradients are ``V(C, W)`` for G and the symmetric gram of
    (C, G) for W."""

    @staticmethod
    def forward(ctx, ext: ModuleType, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.ext = ext
        ctx.save_for_backward(g, w)
        return ext.descriptor_vjp(g, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_g = ctx.ext.descriptor_vjp(grad, w) if ctx.needs_input_grad[1] else None
        grad_w = ctx.ext.descriptor_gram(grad, g, w.shape[2], True) if ctx.needs_input_grad[2] else None
        return None, grad_g, grad_w
