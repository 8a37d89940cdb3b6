"""The se_e2_a descriptor: smooth switching, environment matrix, per-type embedding nets, D = G G<^T.

:class:`SeE2A` holds the parameters and statistics, the PyTorch form of each rule (switching function,
environment matrix and its derivative, the G/D contraction and its gradient) and the *static layout*
of the embedding: every neighbour slot embedded, padding included, so that shapes depend only on (frames,
atoms, sel) and nothing is read back to the host. That is the path for GPUs, ``torch.compile`` and
TorchScript. On a CPU two other backends take its place (:mod:`dpfit.model.backends`): the compact
layout (:mod:`dpfit.model.compact_layout`) and the compiled kernels (:mod:`dpfit.model.kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

from dpfit.model.batched_product import tall_thin_bmm
from dpfit.model.geometry import pair_vectors
from dpfit.model.network import ResidualMLP
from dpfit.model.stages import Embedding, Environment, IndexFacts, type_groups


def switching_function(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """DeePMD's C2 switch: 1 below ``rcut_smth``, 0 at and beyond ``rcut``, ``u^3(-6u^2+15u-10)+1`` between."""
    return switching_with_derivative(r, rcut_smth, rcut)[0]


def switching_with_derivative(r: torch.Tensor, rcut_smth: float, rcut: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The switch of :func:`switching_function` and its derivative dw/dr (zero outside (rcut_smth, rcut))."""
    width = rcut - rcut_smth
    u = ((r - rcut_smth) / width).clamp(0.0, 1.0)
    u2 = u * u
    w = u2 * u * (-6.0 * u2 + 15.0 * u - 10.0) + 1.0
    dw = -30.0 / width * u2 * (u - 1.0) * (u - 1.0)
    return w, dw


def environment_matrix(diff: torch.Tensor, mask: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """Rows ``w(r) [1/r, x/r^2, y/r^2, z/r^2]`` per neighbor slot; zero on padded slots.

    diff: (..., nnei, 3) Å, neighbor minus center; mask: (..., nnei) bool, False on padding.
    Returns (..., nnei, 4). Padded slots must carry a nonzero ``diff`` (any) to keep gradients finite.
    """
    r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    w = switching_function(r, rcut_smth, rcut) * mask.unsqueeze(-1)
    inv_r = 1.0 / r
    return torch.cat([inv_r, diff * inv_r * inv_r], dim=-1) * w


class SeE2A(nn.Module):
    """DeePMD's ``se_e2_a`` (smooth edition, two-body embedding, all-angle) descriptor.

    ``sel[t]`` neighbor slots of type t per atom (nearest first, -1 padded); one embedding net per
    neighbor type (``type_one_side``) or per (center, neighbor) type pair, net index
    ``t_i + ntypes * t_j``. ``davg``/``dstd`` are buffers (ntypes, nnei, 4) set from data.
    """

    __jit_unused_properties__ = ["dim_out"]

    def __init__(
        self,
        ntypes: int,
        sel: list[int],
        rcut: float = 6.0,
        rcut_smth: float = 0.5,
        neuron: list[int] = (25, 50, 100),
        axis_neuron: int = 16,
        resnet_dt: bool = False,
        type_one_side: bool = True,
        exclude_types: list[list[int]] = (),
        set_davg_zero: bool = False,
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if len(sel) != ntypes:
            raise ValueError(f"sel has {len(sel)} entries but the type map has {ntypes} types")
        if rcut_smth >= rcut:
            raise ValueError(f"rcut_smth ({rcut_smth}) must be smaller than rcut ({rcut})")
        self.ntypes = ntypes
        self.sel = [int(s) for s in sel]
        self.nnei = sum(self.sel)
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.neuron = [int(n) for n in neuron]
        self.axis_neuron = int(axis_neuron)
        if self.axis_neuron > self.neuron[-1]:
            raise ValueError(f"axis_neuron ({axis_neuron}) exceeds the embedding width ({self.neuron[-1]})")
        self.type_one_side = bool(type_one_side)
        self.set_davg_zero = bool(set_davg_zero)
        self.exclude_types = [tuple(int(t) for t in p) for p in exclude_types]
        self.has_exclude = len(self.exclude_types) > 0
        self.sections = [sum(self.sel[:t]) for t in range(ntypes + 1)]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        nnets = ntypes if type_one_side else ntypes * ntypes
        # net k embeds neighbor type net_tj[k] (for center type net_ti[k], or -1 for every center type)
        self.net_tj = [k if type_one_side else k // ntypes for k in range(nnets)]
        self.net_ti = [-1 if type_one_side else k % ntypes for k in range(nnets)]
        self.embeddings = nn.ModuleList(
            ResidualMLP(1, self.neuron, resnet_dt, dtype=dtype, generator=gen) for _ in range(nnets)
        )
        keep = torch.ones(ntypes, ntypes, dtype=dtype)
        for ti, tj in self.exclude_types:
            keep[ti, tj] = 0.0
            keep[tj, ti] = 0.0
        self.register_buffer("pair_keep", keep)
        self.register_buffer("davg", torch.zeros(ntypes, self.nnei, 4, dtype=dtype))
        self.register_buffer("dstd", torch.ones(ntypes, self.nnei, 4, dtype=dtype))
        slot_type = torch.repeat_interleave(torch.arange(ntypes), torch.tensor(self.sel))
        self.register_buffer("slot_type", slot_type, persistent=False)

    @property
    def dim_out(self) -> int:
        return self.neuron[-1] * self.axis_neuron

    # ------------------------------------------------------------------ the rules, in PyTorch
    def env_matrix(self, diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw environment matrix (nf, nloc, nnei, 4) before normalisation (used for statistics)."""
        return environment_matrix(diff, mask, self.rcut_smth, self.rcut)

    def normalized_env(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """``R~ = (R - davg[t_i]) / dstd[t_i]`` (nf, nloc, nnei, 4), zeroed on excluded type pairs."""
        rr = (self.env_matrix(diff, mask) - self.davg[atype]) / self.dstd[atype]
        if self.has_exclude:
            keep = self.pair_keep[atype.unsqueeze(-1), self.slot_type]
            rr = rr * torch.where(mask, keep, torch.ones_like(keep)).unsqueeze(-1)
        return rr

    def env_matrix_vjp(
        self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor, grad_rr: torch.Tensor
    ) -> torch.Tensor:
        """dE/d(diff) (nf, nloc, nnei, 3) from dE/dR~ through :meth:`normalized_env`, written out; zero on
        padded slots.

        With w(r) the switch, R = w [1/r, d/r^2]: dR_0/dd = (w' - w/r) d / r^2 and
        dR_c/dd_k = w delta_ck / r^2 + (w' - 2 w/r) d_c d_k / r^3.
        """
        scale = 1.0 / self.dstd[atype]
        if self.has_exclude:
            keep = self.pair_keep[atype.unsqueeze(-1), self.slot_type]
            scale = scale * torch.where(mask, keep, torch.ones_like(keep)).unsqueeze(-1)
        u = grad_rr * scale
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        w, dw = switching_with_derivative(r, self.rcut_smth, self.rcut)
        maskf = mask.unsqueeze(-1).to(diff.dtype)
        w = w * maskf
        dw = dw * maskf
        inv_r = 1.0 / r
        dot = (u[..., 1:] * diff).sum(-1, keepdim=True)
        coef = (u[..., :1] * (dw - w * inv_r) + dot * (dw - 2.0 * w * inv_r) * inv_r) * inv_r * inv_r
        return (coef * diff + u[..., 1:] * (w * inv_r * inv_r)) * maskf

    def gram(self, rr: torch.Tensor, gt: torch.Tensor, values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """D (nf, nloc, M * axis_neuron) and G^T / nnei (N, 4, M): ``gt`` (N, 4, M) plus each type's R~^T g
        over its first k[t] slots (``values`` in the slot layout, (N, k[t], M))."""
        nf, nloc, nnei, _ = rr.shape
        flat_rr = rr.reshape(nf * nloc, nnei, 4)
        # (bmm, not matmul: matmul's broadcasting adds no-op expand nodes that cost time in backward)
        for tj in range(self.ntypes):
            lo = self.sections[tj]
            gt = torch.baddbmm(gt, flat_rr[:, lo:lo + values[tj].shape[1]].transpose(1, 2), values[tj])
        gt = gt / self.nnei
        d = torch.bmm(gt.transpose(1, 2), gt[..., : self.axis_neuron])
        return d.reshape(nf, nloc, -1), gt

    def descriptor_cotangent(self, grad_d: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """g_bar = dE/dG^T (N, M, 4) from dE/dD (nf, nloc, M * axis_neuron), through D = G^T G< and the
        1/nnei of G^T."""
        m = self.neuron[-1]
        a = self.axis_neuron
        d_bar = grad_d.reshape(-1, m, a)
        g_bar = torch.bmm(gt[..., :a], d_bar.transpose(1, 2))
        g_bar = g_bar + torch.nn.functional.pad(torch.bmm(gt, d_bar), [0, m - a])
        return (g_bar / self.nnei).transpose(1, 2)

    def slot_gradient(
        self, blocks: list[tuple[torch.Tensor, torch.Tensor]], rr: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """dE/dR~ (nf, nloc, nnei, 4) from each type's ``g . g_bar`` and ``t . g_bar`` (N, k[t], 4): the
        first directly, the second through s = R~[..., 0] on occupied slots; zero beyond k[t] (slots padded
        in every atom do not depend on the coordinates)."""
        nf, nloc, nnei, _ = rr.shape
        flat_rr = rr.reshape(nf * nloc, nnei, 4)
        flat_mask = mask.reshape(nf * nloc, nnei)
        parts: list[torch.Tensor] = []
        for tj, (part, tds) in enumerate(blocks):
            lo = self.sections[tj]
            k = part.shape[1]
            ds = (flat_rr[:, lo:lo + k] * tds).sum(-1, keepdim=True)
            ds = torch.where(flat_mask[:, lo:lo + k, None], ds, torch.zeros_like(ds))
            parts.append(torch.nn.functional.pad(part + torch.nn.functional.pad(ds, [0, 3]),
                                                 [0, 0, 0, self.sections[tj + 1] - lo - k]))
        return torch.cat(parts, 1).reshape(nf, nloc, nnei, 4)

    # ------------------------------------------------------------------ the stages (static layout)
    def environment(
        self, coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor, shift: torch.Tensor | None,
        atype: torch.Tensor,
    ) -> Environment:
        """Pair vectors, slot mask and R~ (coord (nf, nall, 3), nall >= nloc; see
        :func:`~dpfit.model.geometry.pair_vectors`)."""
        diff, mask = pair_vectors(coord, box, nlist, shift, self.rcut + 1.0)
        return Environment(diff, mask, self.normalized_env(diff, mask, atype), coord.new_empty(0))

    def embed(self, env: Environment, atype: torch.Tensor, tangent: bool, facts: IndexFacts) -> Embedding:
        """The descriptor with every slot embedded, padding included (its input is the constant
        ``-davg/dstd``): one (N, sel[t], M) block per neighbour type, and with ``tangent`` the blocks of
        dg/ds (padded slots are masked where they are used). With one net per (centre, neighbour) type
        pair, the atoms are taken in type order (``facts.type_counts``/``type_order``, derived here when
        not given)."""
        rr = env.rr
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        m = self.neuron[-1]
        flat_s = rr[..., 0].reshape(n, nnei)
        inverse: torch.Tensor | None = None
        counts: list[int] = []
        if not self.type_one_side:
            order = facts.type_order
            given = facts.type_counts
            if given is not None:
                counts = given
            else:
                counts, order = type_groups(atype, self.ntypes)
            if order is not None:
                flat_s = flat_s.index_select(0, order)
                inverse = torch.argsort(order)
        values: list[torch.Tensor] = []
        tangents: list[torch.Tensor] = []
        for tj in range(self.ntypes):
            s = flat_s[:, self.sections[tj]:self.sections[tj + 1]]
            width = s.shape[1]
            pieces = [s] if self.type_one_side else list(s.split(counts))
            g_parts: list[torch.Tensor] = []
            t_parts: list[torch.Tensor] = []
            p = 0
            for k, net in enumerate(self.embeddings):
                if self.net_tj[k] == tj:
                    g_x, t_x = net.embed(pieces[p].reshape(-1, 1), tangent)
                    p += 1
                    g_parts.append(g_x)
                    if t_x is not None:
                        t_parts.append(t_x)
            g = (g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts)).reshape(n, width, m)
            values.append(g if inverse is None else g.index_select(0, inverse))
            if tangent:
                t = (t_parts[0] if len(t_parts) == 1 else torch.cat(t_parts)).reshape(n, width, m)
                tangents.append(t if inverse is None else t.index_select(0, inverse))
        d, gt = self.gram(rr, rr.new_zeros(n, 4, m), values)
        return Embedding(d, gt, values, tangents, [], [], [])

    def env_gradient(self, grad_d: torch.Tensor, emb: Embedding, env: Environment, atype: torch.Tensor) -> torch.Tensor:
        """dE/dd (nf, nloc, nnei, 3) from dE/dD (nf, nloc, M * axis_neuron), written out: through D = G^T G<,
        G^T = R~^T g / nnei, the tangents dg/ds of the first column s of R~, and the environment matrix's
        derivative; zero on padded slots. ``emb`` in the slot layout."""
        g_bar = self.descriptor_cotangent(grad_d, emb.gt)
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tj in range(self.ntypes):
            blocks.append((tall_thin_bmm(emb.values[tj], g_bar), tall_thin_bmm(emb.tangents[tj], g_bar)))
        grad_rr = self.slot_gradient(blocks, env.rr, env.mask)
        return self.env_matrix_vjp(env.diff, env.mask, atype, grad_rr)

    def reverse_pairs(self, nlist: torch.Tensor, shift: torch.Tensor | None, atype: torch.Tensor) -> torch.Tensor | None:
        """Inside a frozen file (no data pipeline): the reverse pairs of ``nlist`` where this backend
        computes them itself (:class:`~dpfit.model.stages.IndexFacts`' ``partner``), else None."""
        return None

    def forward(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Descriptor (nf, nloc, M * axis_neuron) from pair vectors diff (nf, nloc, nnei, 3) Å."""
        env = Environment(diff, mask, self.normalized_env(diff, mask, atype), diff.new_empty(0))
        return self.embed(env, atype, False, IndexFacts(None, None, None, None)).descriptor
