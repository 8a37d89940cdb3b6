"""The compiled fitting-net kernel (``csrc/fitting_net.cpp``, the op ``dpfit::fitting``).

Same values and gradients as :meth:`~dpfit.model.network.ResidualMLP.value_and_input_grad` with an
output gradient of 1 (to rounding): the atomic energies and dE/dx in one forward, and one hand-written
backward for both, whose products are the same matrix multiplies autograd would run and whose
elementwise work is one pass per layer instead of a dozen small ops.
"""

from __future__ import annotations

import torch


def fitting_kernel_applies(x: torch.Tensor, layers) -> bool:
    """Whether the kernel can run this net on ``x``: CPU float32/64 rows, tanh layers then one linear
    output of width 1; not while ``torch.compile`` traces."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and len(layers) >= 2
            and all(layer.activate for layer in layers[:-1]) and not layers[-1].activate
            and layers[-1].matrix.shape[1] == 1)


def compiled_fitting(layers, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (rows, 1) and their input gradient (rows, in) of ``layers`` (a ResidualMLP's DenseLayers)
    through ``dpfit::fitting``; the activations for the backward are kept while autograd records."""
    params: list[torch.Tensor] = []
    for layer in layers[:-1]:
        params += [layer.matrix, layer.bias] + ([layer.idt] if layer.idt is not None else [])
    params += [layers[-1].matrix, layers[-1].bias]
    kinds = [layer.kind for layer in layers[:-1]]
    has_idt = [layer.idt is not None for layer in layers[:-1]]
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    energy, grad, _ = torch.ops.dpfit.fitting(x, params, kinds, has_idt, keep)
    return energy, grad
