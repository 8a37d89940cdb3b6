"""An embedding net's value and ds-tangent as one autograd Function with a hand-written backward.

Training differentiates g(s) and dg/ds of every neighbor row; autograd's generic backward of the
forward-mode layers makes a dozen full-size temporaries per layer, and on a CPU these (rows, width)
passes, bound by memory bandwidth, are what costs time. The forward is the plain path's
:func:`~dpfit.model.network.layer_value_and_tangent` (same values), which carries each layer by
``sigma = sigmoid(2 z)``; the backward below is written in the same terms with one fused pass
(``addcmul``, ``addmm``) per step: five full-width passes per layer besides the matmuls.

Per layer, with ``W~ = 4 idt W`` (``idt`` = 1 without a timestep), ``q = sigma (1 - sigma)`` and
``tz = tx W~``: ``y = idt (2 sigma - 1) + res(x)``, ``ty = q tz + res(tx)``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dpfit.model.network import LayerKind, layer_value_and_tangent


def _fold(grad: torch.Tensor, kind: int, width: int) -> torch.Tensor | None:
    """Gradient reaching a residual input: ``grad`` (SAME_WIDTH), both halves summed (DOUBLED_WIDTH), or None."""
    if kind == LayerKind.SAME_WIDTH:
        return grad
    if kind == LayerKind.DOUBLED_WIDTH:
        return grad.reshape(grad.shape[0], 2, width).sum(1)
    return None


class ValueAndTangent(torch.autograd.Function):
    """``(g, dg/ds) = F(s; matrix_1, bias_1, [idt_1], ...)`` for tanh layers (``kinds``: residual kind
    per layer, ``has_idt``: whether the layer has a timestep parameter). s: (rows, 1)."""

    @staticmethod
    def forward(ctx, kinds: tuple[int, ...], has_idt: tuple[bool, ...], s: torch.Tensor, *params: torch.Tensor):
        x, tx = s, None
        saved: list[torch.Tensor] = []
        empty = s.new_empty(0)
        p = 0
        for kind, with_idt in zip(kinds, has_idt):
            matrix, bias = params[p], params[p + 1]
            idt = params[p + 2] if with_idt else None
            p += 3 if with_idt else 2
            y, ty, sigma, tz = layer_value_and_tangent(x, tx, matrix, bias, idt, kind)
            saved += [x, empty if tx is None else tx, sigma, tz]
            x, tx = y, ty
        ctx.kinds, ctx.has_idt = kinds, has_idt
        ctx.n_saved = len(saved)
        ctx.save_for_backward(*saved, *params)
        return x, tx

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g: torch.Tensor | None, grad_t: torch.Tensor | None):
        saved = ctx.saved_tensors
        params = saved[ctx.n_saved:]
        kinds, has_idt = ctx.kinds, ctx.has_idt
        layers = []
        p = 0
        for with_idt in has_idt:
            layers.append((params[p], params[p + 2] if with_idt else None))
            p += 3 if with_idt else 2
        n = len(kinds)
        sigma_last = saved[4 * (n - 1) + 2]
        gy = grad_g if grad_g is not None else torch.zeros_like(sigma_last)
        gty = grad_t if grad_t is not None else torch.zeros_like(sigma_last)
        grads: list[torch.Tensor | None] = []
        grad_s = None
        for k in range(n - 1, -1, -1):
            x, tx, sigma, tz = saved[4 * k: 4 * k + 4]
            matrix, idt = layers[k]
            kind = kinds[k]
            first = k == 0
            scale = 4.0 * idt if idt is not None else 4.0
            scaled = matrix * scale  # W~
            if first:
                tz = scaled[0].expand_as(sigma)
            q = torch.addcmul(sigma, sigma, sigma, value=-1.0)
            g_tz = gty * q  # dL/d(tz)
            # dL/dsigma / 2 = idt gy + gty tz (1 - 2 sigma) / 2;  dL/dz = 4 q (dL/dsigma / 2)
            slope = torch.addcmul(tz, tz, sigma, value=-2.0)
            if idt is None:
                g_z = torch.addcmul(gy, gty, slope, value=0.5)
            else:
                g_z = torch.addcmul(gy * idt, gty, slope, value=0.5)
            g_z.mul_(q)  # dL/dz / 4
            grad_bias = 4.0 * g_z.sum(0)
            # dL/dW~ (through tz = tx W~; the first layer's tz is row 0 of W~)
            if first:
                grad_scaled = torch.zeros_like(matrix)
                grad_scaled[0] = g_tz.sum(0)
            else:
                grad_scaled = torch.mm(tx.t(), g_tz)
            grad_matrix = torch.addmm(grad_scaled * scale, x.t(), g_z, alpha=4.0)
            grad_idt = None
            if idt is not None:  # y = idt (2 sigma - 1) + ...;  W~ = 4 idt W
                grad_idt = (gy * (2.0 * sigma - 1.0)).sum(0) + 4.0 * (grad_scaled * matrix).sum(0)
            grads = [grad_matrix, grad_bias] + ([grad_idt] if idt is not None else []) + grads
            width = x.shape[1]
            fold_y = _fold(gy, kind, width)
            if not first:
                if fold_y is not None:
                    gx = torch.addmm(fold_y, g_z, matrix.t(), alpha=4.0)
                    gtx = torch.addmm(_fold(gty, kind, width), g_tz, scaled.t())
                else:
                    gx = torch.mm(g_z, matrix.t()).mul_(4.0)
                    gtx = torch.mm(g_tz, scaled.t())
                gy, gty = gx, gtx
            elif ctx.needs_input_grad[2]:
                grad_s = torch.mm(g_z, matrix.t()).mul_(4.0)
                if fold_y is not None:
                    grad_s.add_(fold_y)
        return (None, None, grad_s, *grads)
