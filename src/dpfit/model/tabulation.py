"""Tabulated embedding nets (model compression): each embedding net g(s): R -> R^M replaced by piecewise
quintic polynomials of its scalar input s, so that g and dg/ds cost a table lookup and a few multiply-adds
per channel instead of the nets' matrix products. Inference only.

The idea is DeePMD-kit's ``dp compress``; the code is dpfit's own. The table of one net holds, on each
interval [x_i, x_i + h] of a uniform grid, the quintic Hermite polynomial p_i(u), u = (s - x_i) / h in
[0, 1], that matches g, g' and g'' at both ends (computed exactly from the net in float64,
:func:`node_derivatives`): the pieces join with continuous g, g' and g'' (C2, so forces stay the exact
derivative of the tabulated energy), and the interpolation error is ``|g^(6)| h^6 / 46080`` at most
(dg/ds: ``h^5``, one order less). Each table is measured against its net after it is built (:func:`table_error`).

The range: s is the first column of the normalised environment matrix, ``s = (w(r)/r - davg) / dstd``,
which falls from ``(w(r_min)/r_min - davg) / dstd`` at the smallest neighbour distance of the training data
(``min_nbor_dist``) to ``-davg / dstd`` at rcut and beyond (the input of a padded slot); 0 is added where a
type pair is excluded (its R~ is zeroed). The table covers, per net, the union over the (centre type,
slot) normalisations it serves, in two uniform parts (DeePMD-kit's layout):

- ``[s_lo, s_hi]`` (distances >= min_nbor_dist) with step ``step`` (default 0.01, in units of s, as
  ``dp compress -s``);
- ``(s_hi, s_ext]`` with step ``10 step``, up to ``extrapolate`` times the largest ``w/r`` (distances down
  to about ``min_nbor_dist / extrapolate``; default 5, as ``dp compress -e``).

Outside the table the end intervals' polynomials are evaluated as they are (extrapolated): continuous
and C2, but no longer accurate; below ``s_lo`` no input occurs (w/r >= 0), above ``s_ext`` only atoms
closer than about ``min_nbor_dist / extrapolate``.
"""

# (no `from __future__ import annotations`: TorchScript reads this module's annotations)
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from dpfit.model.descriptor import SeE2A, switching_function
from dpfit.model.network import ResidualMLP, _residual

#: the step of the second part of a table (beyond min_nbor_dist), in steps of the first
COARSE_RATIO = 10
#: where an interval is checked against the net (fractions of it): the quarter points, the midpoint (where
#: the error of g peaks, u^3 (1-u)^3) and the peaks of the error of g' ((1 -+ 1/sqrt 5) / 2)
CHECK_POINTS = (0.25, 0.5 - 0.5 / math.sqrt(5.0), 0.5, 0.5 + 0.5 / math.sqrt(5.0), 0.75)
TRAINING_REFUSED = ("a compressed model (tabulated embedding nets) is inference only: train the model from its "
                    "checkpoint and compress the trained one (freeze.py compress=true)")


def node_derivatives(net: ResidualMLP, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g, dg/ds and d2g/ds2 of an embedding net at inputs ``s`` (rows,), in float64 whatever the net's
    precision: the layers in second-order forward mode (z = x W + b, h = tanh z: h' = (1 - h^2) z',
    h'' = (1 - h^2) (z'' - 2 h z'^2); then the timestep and the residual). Returns three (rows, M)."""
    x = s.to(torch.float64).reshape(-1, 1)
    x1 = torch.ones_like(x)
    x2 = torch.zeros_like(x)
    for layer in net.layers:
        if not layer.activate:
            raise ValueError("node_derivatives: an embedding net (tanh layers only) is expected")
        w = layer.matrix.detach().to(torch.float64)
        z = x @ w + layer.bias.detach().to(torch.float64)
        z1 = x1 @ w
        z2 = x2 @ w
        h = torch.tanh(z)
        q = 1.0 - h * h
        h1 = q * z1
        h2 = q * (z2 - 2.0 * h * z1 * z1)
        if layer.idt is not None:
            idt = layer.idt.detach().to(torch.float64)
            h, h1, h2 = h * idt, h1 * idt, h2 * idt
        kind = layer.kind
        x, x1, x2 = _residual(h, x, kind), _residual(h1, x1, kind), _residual(h2, x2, kind)
    return x, x1, x2


def hermite_coefficients(g: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, step: float) -> torch.Tensor:
    """The quintic pieces through nodes x_0 < ... < x_n a ``step`` apart, from g, g', g'' at the nodes
    ((n + 1, M) each): (n, 6, M), coefficient k of p_i(u) = sum_k c_k u^k, u = (s - x_i) / step. Each
    piece matches value, first and second derivative at both of its ends."""
    y0, y1 = g[:-1], g[1:]
    d0, d1 = g1[:-1] * step, g1[1:] * step
    e0, e1 = g2[:-1] * step * step, g2[1:] * step * step
    # p(u) = y0 + d0 u + e0/2 u^2 + c3 u^3 + c4 u^4 + c5 u^5 with p(1) = y1, p'(1) = d1, p''(1) = e1
    a = y1 - y0 - d0 - 0.5 * e0
    b = d1 - d0 - e0
    c = e1 - e0
    return torch.stack([y0, d0, 0.5 * e0, 10.0 * a - 4.0 * b + 0.5 * c, -15.0 * a + 7.0 * b - c,
                        6.0 * a - 3.0 * b + 0.5 * c], dim=1)


class TabulatedEmbedding(nn.Module):
    """An embedding net as a table of quintic pieces (module docstring): the interface of
    :class:`~dpfit.model.network.ResidualMLP` that the descriptor backends call (``embed``,
    ``value_and_tangent``, ``forward`` in PyTorch, elementwise; ``kernel_value_and_tangent`` on the op
    library's ``tabulated_value_and_tangent``). Inference only: ``train()`` refuses.

    ``table`` (n_fine + n_coarse, 6, M): the pieces of [lo, hi] (step ``step``), then of [hi, ext]
    (step ``step_coarse``). ``value_error`` / ``tangent_error``: the largest difference from the net of g
    and dg/ds on the check points of [lo, hi] (:func:`table_error`), ``*_error_ext`` on [hi, ext];
    ``value_scale`` / ``tangent_scale``: the largest |g| and |dg/ds| on [lo, hi] (for relative errors).
    """

    def __init__(self, table: torch.Tensor, lo: float, step: float, n_fine: int, step_coarse: float) -> None:
        super().__init__()
        if table.dim() != 3 or table.shape[1] != 6 or not 0 < n_fine < table.shape[0]:
            raise ValueError("a table (n_fine + n_coarse, 6, M) with at least one piece of each part is expected")
        self.register_buffer("table", table)
        self.lo = float(lo)
        self.step = float(step)
        self.n_fine = int(n_fine)
        self.hi = self.lo + self.n_fine * self.step
        self.step_coarse = float(step_coarse)
        self.n_coarse = int(table.shape[0]) - self.n_fine
        self.ext = self.hi + self.n_coarse * self.step_coarse
        self.width = int(table.shape[2])
        self.value_error = math.nan
        self.tangent_error = math.nan
        self.value_error_ext = math.nan
        self.tangent_error_ext = math.nan
        self.value_scale = math.nan
        self.tangent_scale = math.nan
        self.training = False

    @torch.jit.unused
    def train(self, mode: bool = True) -> "TabulatedEmbedding":
        if mode:
            raise RuntimeError(TRAINING_REFUSED)
        return super().train(False)

    def locate(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each input's piece (rows,) int64, its place in the piece u (rows, 1) (in [0, 1] inside the table)
        and the piece's 1 / step (rows, 1); s (rows, 1)."""
        x = (s - self.lo) / self.step
        i = torch.floor(x).clamp(0.0, float(self.n_fine - 1))
        xc = (s - self.hi) / self.step_coarse
        j = torch.floor(xc).clamp(0.0, float(self.n_coarse - 1))
        fine = s < self.hi
        u = torch.where(fine, x - i, xc - j)
        index = torch.where(fine, i, j + float(self.n_fine)).to(torch.long).reshape(-1)
        inv_h = torch.where(fine, torch.full_like(s, 1.0 / self.step), torch.full_like(s, 1.0 / self.step_coarse))
        return index, u, inv_h

    def value_and_tangent(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """g and dg/ds (rows, M) at s (rows, 1): both polynomials by one Horner pass, each coefficient
        gathered for the rows when it is needed, in place where autograd does not record (two (rows, M)
        arrays and a buffer: several times faster than gathering the rows' whole pieces)."""
        index, u, inv_h = self.locate(s)
        table = self.table
        if torch.is_grad_enabled() and s.requires_grad:
            dp = table[:, 5].index_select(0, index)
            p = torch.addcmul(table[:, 4].index_select(0, index), dp, u)
            for k in (3, 2, 1, 0):
                dp = torch.addcmul(p, dp, u)
                p = torch.addcmul(table[:, k].index_select(0, index), p, u)
            return p, dp * inv_h
        dp = table[:, 5].index_select(0, index)
        p = table[:, 4].index_select(0, index).addcmul_(dp, u)
        buffer = torch.empty_like(p)
        for k in (3, 2, 1, 0):
            dp.mul_(u).add_(p)
            torch.index_select(table[:, k], 0, index, out=buffer)
            p.mul_(u).add_(buffer)
        return p, dp.mul_(inv_h)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """g (rows, M) at s (rows, 1)."""
        index, u, inv_h = self.locate(s)
        table = self.table
        p = table[:, 5].index_select(0, index)
        for k in (4, 3, 2, 1, 0):
            p = torch.addcmul(table[:, k].index_select(0, index), p, u)
        return p

    def embed(self, s: torch.Tensor, tangent: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As :meth:`ResidualMLP.embed`: g on (rows, 1) inputs and, with ``tangent``, dg/ds."""
        if tangent:
            g, t = self.value_and_tangent(s)
            return g, t
        return self.forward(s), None

    def kernel_value_and_tangent(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """g and dg/ds by the op library (the kernels backend's call; no gradient)."""
        # (the name shows in the error of a file loaded without the op library: the lines of the first op call)
        load_libdpfit_ops_so_first_LAMMPS_DP_PLUGIN_PATH = self.table.contiguous()
        return torch.ops.dpfit.tabulated_value_and_tangent(s, load_libdpfit_ops_so_first_LAMMPS_DP_PLUGIN_PATH, self.lo,
                                                           self.step, self.n_fine, self.step_coarse)


# ------------------------------------------------------------------------------------------------
# building the tables


@dataclass
class NetRange:
    """The inputs one embedding net sees: s in [lo, hi] for distances >= min_nbor_dist, up to ``ext``
    for distances down to about min_nbor_dist / extrapolate."""

    lo: float
    hi: float
    ext: float


def input_ranges(descriptor: SeE2A, min_nbor_dist: float, extrapolate: float = 5.0) -> List[NetRange]:
    """Per embedding net of ``descriptor``, the range of its input s = (w(r)/r - davg) / dstd over r in
    [min_nbor_dist, rcut) and every (centre type, slot) normalisation the net serves, padded slots
    (-davg/dstd) and excluded pairs (0) included (module docstring)."""
    if not 0.0 < min_nbor_dist < descriptor.rcut:
        raise ValueError(f"min_nbor_dist={min_nbor_dist}: must be between 0 and rcut ({descriptor.rcut}) Å")
    if not extrapolate > 1.0:
        raise ValueError(f"extrapolate={extrapolate}: must be > 1 (the table then covers distances down to "
                         "min_nbor_dist / extrapolate)")
    r = torch.tensor(float(min_nbor_dist), dtype=torch.float64)
    peak = float(switching_function(r, descriptor.rcut_smth, descriptor.rcut) / r)  # the largest w(r)/r
    davg = descriptor.davg[..., 0].detach().to(torch.float64).cpu()
    dstd = descriptor.dstd[..., 0].detach().to(torch.float64).cpu()
    excluded = {tuple(p) for p in descriptor.exclude_types}
    ranges: List[NetRange] = []
    for k in range(len(descriptor.embeddings)):
        tj, ti = descriptor.net_tj[k], descriptor.net_ti[k]
        lo_slot, hi_slot = descriptor.sections[tj], descriptor.sections[tj + 1]
        centres = list(range(descriptor.ntypes)) if ti < 0 else [ti]
        if hi_slot == lo_slot:  # no slots of this type: the net never runs on a neighbour
            ranges.append(NetRange(0.0, 1.0, 2.0))
            continue
        avg = davg[centres, lo_slot:hi_slot]
        std = dstd[centres, lo_slot:hi_slot]
        lo = float((-avg / std).min())
        hi = float(((peak - avg) / std).max())
        ext = float(((extrapolate * peak - avg) / std).max())
        if any((c, tj) in excluded or (tj, c) in excluded for c in centres):  # R~ of excluded pairs is 0
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        ranges.append(NetRange(lo, hi, max(ext, hi)))
    return ranges


def tabulate(net: ResidualMLP, span: NetRange, step: float, dtype: Optional[torch.dtype] = None) -> TabulatedEmbedding:
    """The table of ``net`` over ``span`` (steps ``step`` and ``COARSE_RATIO * step``), stored in ``dtype``
    (default the net's), with its measured error (:func:`table_error`)."""
    if not step > 0.0:
        raise ValueError(f"step={step}: must be > 0")
    dtype = dtype or net.layers[0].matrix.dtype
    n_fine = max(1, math.ceil((span.hi - span.lo) / step - 1e-9))
    hi = span.lo + n_fine * step
    coarse = COARSE_RATIO * step
    n_coarse = max(1, math.ceil((span.ext - hi) / coarse - 1e-9))
    fine_nodes = span.lo + step * torch.arange(n_fine + 1, dtype=torch.float64)
    coarse_nodes = hi + coarse * torch.arange(n_coarse + 1, dtype=torch.float64)
    parts = [hermite_coefficients(*node_derivatives(net, nodes), step=h)
             for nodes, h in ((fine_nodes, step), (coarse_nodes, coarse))]
    device = net.layers[0].matrix.device
    table = TabulatedEmbedding(torch.cat(parts).to(dtype=dtype, device=device), span.lo, step, n_fine, coarse)
    measure(table, net)
    return table


def check_inputs(table: TabulatedEmbedding, coarse: bool = False) -> torch.Tensor:
    """The check points (:data:`CHECK_POINTS`) of every piece of the table's first part (``coarse``: its
    second), (rows,) float64."""
    if coarse:
        start, h, n = table.hi, table.step_coarse, table.n_coarse
    else:
        start, h, n = table.lo, table.step, table.n_fine
    offsets = torch.tensor(CHECK_POINTS, dtype=torch.float64)
    return (start + h * (torch.arange(n, dtype=torch.float64).unsqueeze(1) + offsets)).reshape(-1)


def table_error(table: TabulatedEmbedding, net: ResidualMLP, s: torch.Tensor) -> Tuple[float, float]:
    """max |g - table| and max |dg/ds - table'| at inputs ``s`` (rows,): the table evaluated in its own
    dtype (as a model evaluates it), the net exactly (float64) at the same, rounded, inputs."""
    x = s.to(table.table.dtype).to(table.table.device).reshape(-1, 1)
    with torch.no_grad():
        g, t = table.value_and_tangent(x)
        g0, t0, _ = node_derivatives(net, x.to(torch.float64))
    return float((g.to(torch.float64) - g0).abs().max()), float((t.to(torch.float64) - t0).abs().max())


def measure(table: TabulatedEmbedding, net: ResidualMLP) -> None:
    """Sets the table's error and scale attributes from the check points of both parts."""
    fine = check_inputs(table)
    table.value_error, table.tangent_error = table_error(table, net, fine)
    table.value_error_ext, table.tangent_error_ext = table_error(table, net, check_inputs(table, coarse=True))
    g, t, _ = node_derivatives(net, fine)
    table.value_scale, table.tangent_scale = float(g.abs().max()), float(t.abs().max())


@dataclass
class Compression:
    """What :func:`compress` did: the tables (one per net, in order) and their options."""

    tables: List[TabulatedEmbedding]
    min_nbor_dist: float
    step: float
    extrapolate: float
    #: lines on how the compressed model was checked against the exact one (e.g. by freeze.py), for summary()
    checks: List[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.table.numel() * t.table.element_size() for t in self.tables)

    @property
    def pieces(self) -> int:
        return sum(t.n_fine + t.n_coarse for t in self.tables)

    def bound(self, ext: bool = False) -> Tuple[float, float]:
        """The largest measured |dg| and |d(dg/ds)| over the nets, on [lo, hi] (``ext``: beyond)."""
        if ext:
            return max(t.value_error_ext for t in self.tables), max(t.tangent_error_ext for t in self.tables)
        return max(t.value_error for t in self.tables), max(t.tangent_error for t in self.tables)

    def relative_bound(self) -> Tuple[float, float]:
        """:meth:`bound` on [lo, hi] over the largest |g| and |dg/ds| there."""
        value, tangent = self.bound()
        return (value / max(t.value_scale for t in self.tables),
                tangent / max(t.tangent_scale for t in self.tables))

    def summary(self) -> List[str]:
        """Lines for a user: range, steps, size, error bound."""
        lo = min(t.lo for t in self.tables)
        hi = max(t.hi for t in self.tables)
        ext = max(t.ext for t in self.tables)
        value, tangent = self.bound()
        rel_value, rel_tangent = self.relative_bound()
        value_ext, tangent_ext = self.bound(ext=True)
        return [
            f"compressed: {len(self.tables)} embedding net(s) tabulated (quintic pieces, C2) on s in "
            f"[{lo:.4g}, {hi:.4g}] (r >= min_nbor_dist = {self.min_nbor_dist:.4g} Å) with step {self.step:g}, and "
            f"up to s = {ext:.4g} (r >= ~{self.min_nbor_dist / self.extrapolate:.3g} Å) with step "
            f"{self.step * COARSE_RATIO:g}: {self.pieces} pieces, {self.nbytes / 2**20:.1f} MiB",
            f"table error (5 points per piece, against the nets): max |dg| {value:.2e} ({rel_value:.1e} relative), "
            f"max |d(dg/ds)| {tangent:.2e} ({rel_tangent:.1e} relative); below min_nbor_dist: {value_ext:.1e}, "
            f"{tangent_ext:.1e}",
            *self.checks,
        ]


def compress(descriptor: SeE2A, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0) -> Compression:
    """Replaces each of the descriptor's embedding nets by its table (in place; the backends' classes keep
    working: they call the net's ``embed`` / ``kernel_value_and_tangent``). Nets already tabulated are
    refused. Returns the tables with their measured errors."""
    if any(isinstance(net, TabulatedEmbedding) for net in descriptor.embeddings):
        raise ValueError("the model is compressed already")
    ranges = input_ranges(descriptor, min_nbor_dist, extrapolate)
    tables = [tabulate(net, span, step) for net, span in zip(descriptor.embeddings, ranges)]
    for k, table in enumerate(tables):
        descriptor.embeddings[k] = table
    return Compression(tables, float(min_nbor_dist), float(step), float(extrapolate))


def is_compressed(descriptor: SeE2A) -> bool:
    return any(isinstance(net, TabulatedEmbedding) for net in descriptor.embeddings)


__all__ = ["Compression", "NetRange", "TabulatedEmbedding", "compress", "hermite_coefficients",
           "input_ranges", "is_compressed", "node_derivatives", "tabulate", "table_error"]
