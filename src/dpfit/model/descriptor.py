"""The se_e2_a descriptor: smooth switching, environment matrix, per-type embedding nets, D = G G<^T."""

from __future__ import annotations

import torch
from torch import nn

from dpfit.model.network import ResidualMLP


def switching_function(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """DeePMD's C2 switch: 1 below ``rcut_smth``, 0 at and beyond ``rcut``, ``u^3(-6u^2+15u-10)+1`` between."""
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


def environment_matrix(
    diff: torch.Tensor, mask: torch.Tensor, rcut_smth: float, rcut: float, protection: float = 0.0
) -> torch.Tensor:
    """Rows ``w(r) [1/r, x/r^2, y/r^2, z/r^2]`` per neighbor slot; zero on padded slots.

    diff: (..., nnei, 3) Å, neighbor minus center; mask: (..., nnei) bool, False on padding.
    Returns (..., nnei, 4). Padded slots must carry a nonzero ``diff`` (any) to keep gradients finite.
    """
    r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    w = switching_function(r, rcut_smth, rcut) * mask.unsqueeze(-1)
    inv_r = 1.0 / (r + protection)
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

    def env_matrix(self, diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw environment matrix (nf, nloc, nnei, 4) before normalisation (used for statistics)."""
        return environment_matrix(diff, mask, self.rcut_smth, self.rcut, 0.0)

    def normalized_env(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """``R~ = (R - davg[t_i]) / dstd[t_i]`` (nf, nloc, nnei, 4), zeroed on excluded type pairs."""
        rr = (self.env_matrix(diff, mask) - self.davg[atype]) / self.dstd[atype]
        if self.has_exclude:
            keep = self.pair_keep[atype.unsqueeze(-1), self.slot_type]
            rr = rr * torch.where(mask, keep, torch.ones_like(keep)).unsqueeze(-1)
        return rr

    def descriptor_from_env(
        self, rr: torch.Tensor, atype: torch.Tensor, mask: torch.Tensor, tangent: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Descriptor (nf, nloc, M * axis_neuron) from R~, and the embedding pieces.

        Each embedding net runs only on occupied slots; a padded slot's input is the constant
        ``-davg/dstd`` of its (center type, slot), so its output comes from a small per-type table.
        Pieces (one per net applied): g (rows, M) over all slots of the net's atoms (the tensor G is
        built from), tangents dg/ds (occupied rows, M) when ``tangent``, those occupied row indices,
        the atom indices (empty: all atoms, flattened) and the net index. With ``tangent`` the input
        s = R~[..., 0] is detached (it holds no parameter): :class:`EnergyModel` then gets forces
        without a backward pass through the embedding nets.
        """
        nf, nloc, nnei, _ = rr.shape
        m = self.neuron[-1]
        s_all = rr[..., 0].detach() if tangent else rr[..., 0]
        flat_rr = rr.reshape(nf * nloc, nnei, 4)
        flat_s = s_all.reshape(nf * nloc, nnei)
        flat_mask = mask.reshape(nf * nloc, nnei)
        flat_type = atype.reshape(-1)
        # embedding input of a padded slot: R = 0 normalised, per (center type, slot)
        s_pad = -self.davg[:, :, 0] / self.dstd[:, :, 0]
        # G^T (4, M) per atom: rr^T @ g keeps g's gradient in g's own (rows, M) layout
        g_mat = rr.new_zeros(nf * nloc, 4, m)
        gs: list[torch.Tensor] = []
        ts: list[torch.Tensor] = []
        occupied: list[torch.Tensor] = []
        atoms: list[torch.Tensor] = []
        nets: list[int] = []
        for k, net in enumerate(self.embeddings):
            tj = self.net_tj[k]
            ti = self.net_ti[k]
            lo = self.sections[tj]
            hi = self.sections[tj + 1]
            if ti < 0:
                idx = torch.empty(0, dtype=torch.long, device=rr.device)
            else:
                idx = torch.nonzero(flat_type == ti).squeeze(-1)
            # (TorchScript unrolls loops over modules: no `continue` here)
            if hi > lo and (ti < 0 or idx.numel() > 0):
                width = hi - lo
                if ti < 0:
                    rr_k = flat_rr[:, lo:hi]
                    s_k = flat_s[:, lo:hi]
                    m_k = flat_mask[:, lo:hi]
                    t_k = flat_type
                else:
                    rr_k = flat_rr.index_select(0, idx)[:, lo:hi]
                    s_k = flat_s.index_select(0, idx)[:, lo:hi]
                    m_k = flat_mask.index_select(0, idx)[:, lo:hi]
                    t_k = flat_type.index_select(0, idx)
                rows = torch.nonzero(m_k.reshape(-1)).squeeze(-1)
                s_rows = s_k.reshape(-1).index_select(0, rows).unsqueeze(-1)
                table = net(s_pad[:, lo:hi].reshape(-1, 1))  # (ntypes * width, M)
                pad_index = (t_k.unsqueeze(-1) * width + torch.arange(width, device=rr.device)).reshape(-1)
                g = table.index_select(0, pad_index)
                if tangent:
                    g_rows, t = net.value_and_tangent(s_rows)
                    ts.append(t)
                else:
                    g_rows = net(s_rows)
                g = g.index_put((rows,), g_rows)
                if tangent and not g.requires_grad:  # frozen weights: dE/dg is still needed for forces
                    g = g.detach().requires_grad_(True)
                gs.append(g)
                occupied.append(rows)
                atoms.append(idx)
                nets.append(k)
                contrib = torch.matmul(rr_k.transpose(-1, -2), g.reshape(-1, width, m))
                if ti < 0:
                    g_mat = g_mat + contrib
                else:
                    g_mat = g_mat.index_add(0, idx, contrib)
        g_t = g_mat.reshape(nf, nloc, 4, m) / self.nnei
        d = torch.matmul(g_t.transpose(-1, -2), g_t[..., : self.axis_neuron])
        return d.reshape(nf, nloc, m * self.axis_neuron), gs, ts, occupied, atoms, nets

    def forward(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Descriptor (nf, nloc, M * axis_neuron) from pair vectors diff (nf, nloc, nnei, 3) Å."""
        return self.descriptor_from_env(self.normalized_env(diff, mask, atype), atype, mask, False)[0]
