"""The compiled fitting-net kernel as an autograd Function (see ``fitting_net.cpp``).

Same values and gradients as :meth:`~dpfit.model.network.ResidualMLP.value_and_input_grad` with an
output gradient of 1 (to rounding): the atomic energies and dE/dx in one forward, and one hand-written
backward for both, whose products are the same matrix multiplies autograd would run and whose
elementwise work is one pass per layer instead of a dozen small ops.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from dpfit.model.kernels.embedding import _layers, layer_grads


def fitting_kernel_applies(x: torch.Tensor, layers) -> bool:
    """Whether the kernel can run this net on ``x``: CPU float32/64 rows, tanh layers then one linear
    output of width 1; not while ``torch.compile`` traces."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and len(layers) >= 2
            and all(layer.activate for layer in layers[:-1]) and not layers[-1].activate
            and layers[-1].matrix.shape[1] == 1)


def _unpack(layers_idt: tuple[bool, ...], params: tuple[torch.Tensor, ...], empty: torch.Tensor):
    """(matrices, biases, idts) from the flat parameters: per tanh layer matrix, bias (, idt), then the
    output layer's matrix and bias."""
    matrices, biases, idts = _layers(layers_idt, params[:-2], empty)
    return matrices + [params[-2]], biases + [params[-1]], idts


class CompiledFitting(torch.autograd.Function):
    """``(e, de/dx)`` of a fitting net on x (rows, in): e (rows, 1), de/dx (rows, in)."""

    @staticmethod
    def forward(ctx, ext: ModuleType, kinds: tuple[int, ...], has_idt: tuple[bool, ...], x: torch.Tensor,
                *params: torch.Tensor):
        x = x.contiguous()
        matrices, biases, idts = _unpack(has_idt, params, x.new_empty(0))
        energy, grad, *kept = ext.fitting_forward(x, matrices, biases, idts, list(kinds), True)
        ctx.ext, ctx.kinds, ctx.has_idt = ext, kinds, has_idt
        ctx.save_for_backward(x, *kept, *params)
        return energy, grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_e: torch.Tensor | None, grad_g: torch.Tensor | None):
        x, *rest = ctx.saved_tensors
        n = 4 * len(ctx.kinds)
        kept, params = rest[:n], tuple(rest[n:])
        matrices, biases, idts = _unpack(ctx.has_idt, params, x.new_empty(0))
        need_x = ctx.needs_input_grad[3]
        grad_x, *per_layer = ctx.ext.fitting_backward(x, grad_e, grad_g, matrices, biases, idts, list(ctx.kinds),
                                                     kept, need_x)
        grads = layer_grads(ctx.has_idt, per_layer[:-2]) + per_layer[-2:]
        return (None, None, None, grad_x if need_x else None, *grads)


def compiled_fitting(ext: ModuleType, layers, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (rows, 1) and their input gradient (rows, in) of ``layers`` (a ResidualMLP's DenseLayers)
    through the kernel: as an autograd Function while autograd records, else the forward alone."""
    params: list[torch.Tensor] = []
    for layer in layers[:-1]:
        params += [layer.matrix, layer.bias] + ([layer.idt] if layer.idt is not None else [])
    params += [layers[-1].matrix, layers[-1].bias]
    kinds = tuple(layer.kind for layer in layers[:-1])
    has_idt = tuple(layer.idt is not None for layer in layers[:-1])
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return CompiledFitting.apply(ext, kinds, has_idt, x, *params)
    matrices, biases, idts = _unpack(has_idt, tuple(p.detach() for p in params), x.new_empty(0))
    energy, grad = ext.fitting_forward(x.detach().contiguous(), matrices, biases, idts, list(kinds), False)
    return energy, grad
