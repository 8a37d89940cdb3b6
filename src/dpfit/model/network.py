"""Dense networks with DeePMD's layer rule: tanh, optional timestep ``idt``, residual on equal or doubled width."""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """A stack of ``y = tanh(x W + b)`` layers (DeePMD ``EmbeddingNet`` / ``FittingNet`` layout).

    Residual rule per layer: ``y = y * idt`` (only with ``resnet_dt``) then ``y += x`` when the width is
    unchanged, ``y += [x, x]`` when it doubles, nothing otherwise. With ``out_dim`` set, a final linear
    layer (no activation, no residual) maps to ``out_dim``. ``matrix`` is stored (in, out) as in DeePMD.
    """

    def __init__(
        self,
        in_dim: int,
        neuron: list[int],
        resnet_dt: bool = False,
        out_dim: int | None = None,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.neuron = list(neuron)
        self.resnet_dt = resnet_dt
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.idts = nn.ParameterList()
        self.residual: list[int] = []  # 0: none, 1: same width, 2: doubled width
        self.idt_index: list[int] = []  # index into idts or -1
        widths = [in_dim, *self.neuron]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            self._add_linear(n_in, n_out, dtype, generator)
            kind = 1 if n_out == n_in else 2 if n_out == 2 * n_in else 0
            self.residual.append(kind)
            if resnet_dt and kind:
                idt = 0.1 + 0.001 * torch.randn(n_out, dtype=dtype, generator=generator)
                self.idts.append(nn.Parameter(idt))
                self.idt_index.append(len(self.idts) - 1)
            else:
                self.idt_index.append(-1)
        self.out_dim = out_dim
        if out_dim is not None:
            self._add_linear(widths[-1], out_dim, dtype, generator)
            with torch.no_grad():  # start from the energy bias alone
                self.biases[-1].zero_()

    def _add_linear(self, n_in: int, n_out: int, dtype: torch.dtype, generator) -> None:
        std = 1.0 / math.sqrt(n_in + n_out)
        self.matrices.append(nn.Parameter(torch.randn(n_in, n_out, dtype=dtype, generator=generator) * std))
        self.biases.append(nn.Parameter(torch.randn(n_out, dtype=dtype, generator=generator)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, kind in enumerate(self.residual):
            y = torch.tanh(torch.addmm(self.biases[k], x.reshape(-1, x.shape[-1]), self.matrices[k]))
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            if self.idt_index[k] >= 0:
                y = y * self.idts[self.idt_index[k]]
            x = _residual(y, x, kind)
        if self.out_dim is not None:
            k = len(self.residual)
            x = x @ self.matrices[k] + self.biases[k]
        return x

    def value_and_tangent(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and its derivative with respect to a scalar input, ``s``: (rows, 1) -> (rows, n_L) twice.

        Forward-mode through the tanh layers (``dy = (1 - tanh^2) * (dx W)``), so forces need no
        backward pass through the embedding net and training needs no double backward.
        """
        if self.matrices[0].shape[0] != 1 or self.out_dim is not None:
            raise ValueError("value_and_tangent needs a 1-input net without an output layer")
        x, tx = s, None
        for k, kind in enumerate(self.residual):
            y = torch.tanh(torch.addmm(self.biases[k], x, self.matrices[k]))
            dy = torch.addcmul(torch.ones_like(y), y, y, value=-1.0)  # 1 - tanh^2
            ty = dy * self.matrices[k][0] if tx is None else dy * (tx @ self.matrices[k])
            if self.idt_index[k] >= 0:
                idt = self.idts[self.idt_index[k]]
                y = y * idt
                ty = ty * idt
            if kind:
                ty = _residual(ty, tx, kind) if tx is not None else ty + 1.0
            x, tx = _residual(y, x, kind), ty
        return x, tx


def _residual(y: torch.Tensor, x: torch.Tensor, kind: int) -> torch.Tensor:
    """``y + x`` (kind 1), ``y + [x, x]`` (kind 2, without materialising the concatenation), or ``y``."""
    if kind == 1:
        return y + x
    if kind == 2:
        w = x.shape[-1]
        return (y.reshape(*y.shape[:-1], 2, w) + x.unsqueeze(-2)).reshape(y.shape)
    return y
