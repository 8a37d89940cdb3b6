"""``bmm(a, b)`` for a tall ``a`` (N, k, M) and a thin ``b`` (N, M, c), with a faster backward.

Autograd's backward of ``bmm`` forms ``a^T @ grad`` for ``b``'s gradient, a transposed-left product
that MKL runs several times slower than the equal ``(grad^T @ a)^T`` on CPU (1.0 vs 0.3 ms at the
water descriptor's shapes, float32). The backward here uses the fast form; it is built from
differentiable ops, so it can itself be differentiated.
"""

from __future__ import annotations

import torch


class TallThinProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.bmm(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(grad.transpose(1, 2), a).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def tall_thin_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``; while autograd records, through :class:`TallThinProduct` (eager only)."""
    if not torch.jit.is_scripting():
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _tall_thin_autograd(a, b)
    return torch.bmm(a, b)


@torch.jit.unused
def _tall_thin_autograd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return TallThinProduct.apply(a, b)
