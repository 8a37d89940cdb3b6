"""The se_e2_a descriptor: smooth switching, environment matrix, per-type embedding nets, D = G G<^T."""

from __future__ import annotations

import torch
from torch import nn

from dpfit.model.batched_product import tall_thin_bmm
from dpfit.model.network import ResidualMLP
from dpfit.model.row_gather import gather_rows


def switching_function(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """DeePMD's C2 switch: 1 below ``rcut_smth``, 0 at and beyond ``rcut``, ``u^3(-6u^2+15u-10)+1`` between."""
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


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


def _own_rows_first(outputs: list[torch.Tensor], n_own: list[int]) -> torch.Tensor:
    """Rows of several nets' outputs reordered: each net's first ``n_own`` rows, then the rest of each."""
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat([out[:c] for out, c in zip(outputs, n_own)] + [out[c:] for out, c in zip(outputs, n_own)])


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
        #: compiled CPU kernels: auto / on / off (set for the whole model by EnergyModel.kernels)
        self.kernels = "off"
        #: embed every slot with static shapes (True), only occupied slots (False), or None: by device
        #: (see EnergyModel._all_slots)
        self.all_slots: bool | None = None
        slot_type = torch.repeat_interleave(torch.arange(ntypes), torch.tensor(self.sel))
        self.register_buffer("slot_type", slot_type, persistent=False)

    @property
    def dim_out(self) -> int:
        return self.neuron[-1] * self.axis_neuron

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

    def embed(
        self, rr: torch.Tensor, atype: torch.Tensor, mask: torch.Tensor, tangent: bool = False,
        partner: torch.Tensor | None = None, kept_slots: list[int] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Embedding of the neighbor slots, one (N = nf * nloc, k[t], M) tensor per neighbor type t, and
        the constant G^T (ntypes, 4, M) of the slots beyond: k[t] <= sel[t] ends at the last slot of
        type t occupied in this batch (the slots after it are padding for every atom).

        The nets run only on occupied slots, plus one row per distinct input of a padded slot (the
        constant ``-davg/dstd`` of its center type and slot: with DeePMD's statistics one per center
        type), in the same call. One gather puts the rows into the padded layout. With ``tangent`` the
        second list holds dg/ds (forward mode through the net); on padded slots it is the tangent of the
        padding row, which callers mask (a padded slot's input does not depend on the coordinates).
        ``partner`` (nf, nloc, nnei): flat slot of each slot's reverse pair or -1
        (:func:`~dpfit.model.index_facts.reverse_slots`); of two reverse slots only the first is embedded and
        the second reuses its row (valid when :meth:`reverse_pairs_share_input`). ``kept_slots``: k[t]
        as the data pipeline computed it (:func:`~dpfit.model.index_facts.kept_slots`), else derived here.
        """
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        m = self.neuron[-1]
        flat_s = rr[..., 0].reshape(n, nnei)
        flat_mask = mask.reshape(n, nnei)
        flat_type = atype.reshape(-1)
        s_pad = -self.davg[:, :, 0] / self.dstd[:, :, 0]  # embedding input of a padded slot (R = 0)
        g_blocks: list[torch.Tensor] = []
        t_blocks: list[torch.Tensor] = []
        tail = rr.new_zeros(self.ntypes, 4, m)
        for tj in range(self.ntypes):
            lo = self.sections[tj]
            hi = self.sections[tj + 1]
            width = hi - lo
            # slots [lo, lo + kept) hold every neighbor of type tj in this batch
            kept = 0
            if kept_slots is not None:
                kept = kept_slots[tj]
            elif width > 0:
                kept = int((flat_mask[:, lo:hi].to(torch.long) * torch.arange(1, width + 1, device=rr.device)).max())
            m_b = flat_mask[:, lo:lo + kept]
            s_b = flat_s[:, lo:lo + kept].reshape(-1)
            computed = m_b
            reuse = torch.zeros_like(m_b)
            partner_local = torch.zeros(n, kept, dtype=torch.long, device=rr.device)
            if partner is not None:
                p_b = partner.reshape(n, nnei)[:, lo:lo + kept]
                # the partner's block-local flat position (same block: both atoms have type tj)
                has_partner = p_b >= 0
                partner_local = torch.where(has_partner, (p_b // nnei) * kept + p_b % nnei - lo, torch.zeros_like(p_b))
                local = torch.arange(n * kept, device=rr.device).reshape(n, kept)
                reuse = has_partner & (partner_local < local)
                computed = m_b & ~reuse
            n_own: list[int] = []
            n_table: list[int] = []
            center: list[int] = []
            owned: list[torch.Tensor] = []  # flat slot of each own row, in source order
            table_of: list[torch.Tensor] = []  # per net: (center types, width) table row of each padded slot
            values: list[torch.Tensor] = []
            tangents: list[torch.Tensor] = []
            pad_values: list[torch.Tensor] = []  # the padding rows again, alone: for the constant tail
            index = torch.zeros(n, kept, dtype=torch.long, device=rr.device)
            offset = 0
            for net_index, net in enumerate(self.embeddings):
                ti = self.net_ti[net_index]
                if self.net_tj[net_index] == tj:
                    own = computed if ti < 0 else computed & (flat_type == ti).unsqueeze(-1)
                    flat_own = own.reshape(-1)
                    rows = torch.nonzero(flat_own).squeeze(-1)
                    position = (torch.cumsum(flat_own, 0) - 1 + offset).reshape(n, kept)
                    index = torch.where(own, position, index)
                    offset += rows.shape[0]
                    distinct, which = self._padding_inputs(s_pad, lo, hi, ti)
                    x = torch.cat([s_b.index_select(0, rows), distinct]).unsqueeze(-1)
                    if kept < width:  # (the tangent path: one compiled node where the kernels apply)
                        pad_values.append(net.embed(distinct.unsqueeze(-1), tangent)[0])
                    g_x, t_x = net.embed(x, tangent)
                    if t_x is not None:
                        tangents.append(t_x)
                    values.append(g_x)
                    n_own.append(rows.shape[0])
                    n_table.append(distinct.shape[0])
                    center.append(ti)
                    owned.append(rows)
                    table_of.append(which)
            # source rows: every net's own rows, then every net's padding rows; pad_alone: the same rows
            # in the padding rows evaluated alone
            pad_row = torch.zeros(self.ntypes, width, dtype=torch.long, device=rr.device)
            pad_alone = torch.zeros(self.ntypes, width, dtype=torch.long, device=rr.device)
            alone = 0
            for k in range(len(values)):
                if center[k] < 0:
                    pad_row = table_of[k] + offset
                    pad_alone = table_of[k] + alone
                else:
                    pad_row[center[k]] = table_of[k][0] + offset
                    pad_alone[center[k]] = table_of[k][0] + alone
                offset += n_table[k]
                alone += n_table[k]
            index = torch.where(m_b, index, pad_row.index_select(0, flat_type)[:, :kept])
            if partner is not None:
                index = torch.where(reuse, index.reshape(-1).index_select(0, partner_local.reshape(-1)).reshape(n, kept),
                                    index)
            source = _own_rows_first(values, n_own)
            t_source = _own_rows_first(tangents, n_own) if tangent else source
            if kept < width:
                tail = self._padded_tail(tail, lo, hi, kept, pad_values, pad_alone)
            inverse = torch.cat(owned)
            other_slots = torch.nonzero(~computed.reshape(-1)).squeeze(-1)  # padded and reused slots
            other_rows = index.reshape(-1).index_select(0, other_slots)
            g_blocks.append(gather_rows(source, index, inverse, other_slots, other_rows))
            if tangent:
                t_blocks.append(gather_rows(t_source, index, inverse, other_slots, other_rows))
        return g_blocks, t_blocks, tail

    def _padding_inputs(self, s_pad: torch.Tensor, lo: int, hi: int, ti: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct embedding inputs of padded slots [lo, hi) for the net of center type ``ti`` (-1:
        all types) and each (center type, slot)'s one among them, (ntypes or 1, hi - lo)."""
        pad_in = s_pad[:, lo:hi] if ti < 0 else s_pad[ti:ti + 1, lo:hi]
        distinct, which = torch.unique(pad_in.reshape(-1), return_inverse=True)
        return distinct, which.reshape(pad_in.shape)

    def _padded_tail(self, tail: torch.Tensor, lo: int, hi: int, kept: int, pad_values: list[torch.Tensor],
                     pad_alone: torch.Tensor) -> torch.Tensor:
        """``tail`` plus the always-padded slots [lo + kept, hi): R~ and g are constants per center type.
        g (ntypes, hi - lo - kept, M) from the padding rows evaluated alone (``pad_values``, rows
        ``pad_alone``): the gradient of indexing all of a net's rows would be a zero-filled array."""
        rr_pad = -self.davg[:, lo + kept:hi] / self.dstd[:, lo + kept:hi]
        g_pad = torch.cat(pad_values)[pad_alone[:, kept:]]
        return torch.baddbmm(tail, rr_pad.transpose(1, 2), g_pad)

    @torch.jit.unused
    def _embed_rows(
        self, rr: torch.Tensor, atype: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor | None,
        kept_slots: list[int] | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """:meth:`embed` with ``tangent`` for the compiled kernels: each block's nets' rows (own rows,
        then padding rows), followed by each block's row index (N, k[t]) in the first list; the tangent
        rows in the second; the constant tail. Which slots get rows and each slot's row come from one
        compiled pass per block (``block_rows``)."""
        from dpfit.model.kernels import ops

        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        flat_s = rr[..., 0].reshape(n, nnei).contiguous()
        flat_mask = mask.reshape(n, nnei).contiguous()
        flat_type = atype.reshape(-1).contiguous()
        flat_partner = partner.reshape(n, nnei).contiguous() if partner is not None else flat_type.new_empty(0)
        s_pad = -self.davg[:, :, 0] / self.dstd[:, :, 0]
        g_blocks: list[torch.Tensor] = []
        t_blocks: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        tail = rr.new_zeros(self.ntypes, 4, self.neuron[-1])
        for tj in range(self.ntypes):
            lo, hi = self.sections[tj], self.sections[tj + 1]
            width = hi - lo
            if kept_slots is not None:
                kept = kept_slots[tj]
            else:
                kept = int((flat_mask[:, lo:hi].to(torch.long) * torch.arange(1, width + 1)).max()) if width else 0
            nets = [(k, net) for k, net in enumerate(self.embeddings) if self.net_tj[k] == tj]
            pad_alone = torch.zeros(self.ntypes, width, dtype=torch.long)
            distincts: list[torch.Tensor] = []
            alone = 0
            for k, _ in nets:
                ti = self.net_ti[k]
                distinct, which = self._padding_inputs(s_pad, lo, hi, ti)
                if ti < 0:
                    pad_alone = which + alone
                else:
                    pad_alone[ti] = which[0] + alone
                alone += distinct.shape[0]
                distincts.append(distinct.unsqueeze(-1))
            index, *own = ops.block_rows(flat_s, flat_mask, flat_type, flat_partner, lo, kept,
                                         [self.net_ti[k] for k, _ in nets], pad_alone.contiguous())
            values: list[torch.Tensor] = []
            tangents: list[torch.Tensor] = []
            pad_values: list[torch.Tensor] = []
            for (_, net), x_own, x_pad in zip(nets, own, distincts):
                g_x, t_x = net.value_and_tangent(torch.cat([x_own, x_pad]))
                values.append(g_x)
                tangents.append(t_x)
                if kept < width:
                    pad_values.append(net.value_and_tangent(x_pad)[0])
            n_own = [x.shape[0] for x in own]
            g_blocks.append(_own_rows_first(values, n_own))
            t_blocks.append(_own_rows_first(tangents, n_own))
            indices.append(index)
            if kept < width:
                tail = self._padded_tail(tail, lo, hi, kept, pad_values, pad_alone)
        return g_blocks + indices, t_blocks, tail

    def reverse_pairs_share_input(self) -> bool:
        """True when ``davg``/``dstd`` of the radial column are the same over the slots of each neighbor
        type block (as DeePMD's statistics make them): then s(r) of a same-type pair is the same from
        both atoms, and the embedding can run once per pair. Remembered until the statistics change
        (it reads them back from the device)."""
        if not torch.jit.is_scripting():
            return self._share_input_cached()
        return self._share_input()

    def _share_input(self) -> bool:
        for tj in range(self.ntypes):
            lo = self.sections[tj]
            hi = self.sections[tj + 1]
            if hi > lo:
                avg = self.davg[:, lo:hi, 0]
                std = self.dstd[:, lo:hi, 0]
                if not bool(torch.all(avg == avg[:, :1])) or not bool(torch.all(std == std[:, :1])):
                    return False
        return True

    @torch.jit.unused
    def _share_input_cached(self) -> bool:
        # (an in-place change, load_state_dict included, bumps a tensor's version; .to() gives new storage)
        key = (self.davg._version, self.dstd._version, self.davg.data_ptr(), self.dstd.data_ptr())
        cached = self.__dict__.get("_share_input_memo")
        if cached is None or cached[0] != key:
            cached = (key, self._share_input())
            self.__dict__["_share_input_memo"] = cached
        return cached[1]

    @torch.jit.unused
    def embed_all_slots(
        self, rr: torch.Tensor, atype: torch.Tensor, tangent: bool, type_counts: list[int] | None,
        type_order: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The embedding of every slot, padding included (its input is the constant ``-davg/dstd``), one
        (N, sel[t], M) block per neighbor type, and with ``tangent`` the blocks of dg/ds (callers mask
        padded slots). Shapes depend only on the system and nothing is read back to the host: the path
        for GPUs and ``torch.compile``. With one net per (center, neighbor) type pair, the atoms are taken
        in type order (``type_counts``/``type_order`` of :func:`~dpfit.model.index_facts.type_split`,
        from the data pipeline; derived here, with a host synchronisation, when not given)."""
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        m = self.neuron[-1]
        flat_s = rr[..., 0].reshape(n, nnei)
        inverse: torch.Tensor | None = None
        if not self.type_one_side:
            if type_counts is None:
                from dpfit.model.index_facts import type_split

                type_counts, type_order = type_split(atype, self.ntypes)
            if type_order is not None:
                flat_s = flat_s.index_select(0, type_order)
                inverse = torch.argsort(type_order)
        g_blocks: list[torch.Tensor] = []
        t_blocks: list[torch.Tensor] = []
        for tj in range(self.ntypes):
            s = flat_s[:, self.sections[tj]:self.sections[tj + 1]]
            width = s.shape[1]
            nets = [net for k, net in enumerate(self.embeddings) if self.net_tj[k] == tj]
            pieces = [s] if self.type_one_side else list(s.split(type_counts))
            values: list[torch.Tensor] = []
            tangents: list[torch.Tensor] = []
            for net, piece in zip(nets, pieces):
                g_x, t_x = net.embed(piece.reshape(-1, 1), tangent)
                values.append(g_x)
                if t_x is not None:
                    tangents.append(t_x)
            for out, blocks in ((values, g_blocks), (tangents, t_blocks)):
                if out:
                    block = (out[0] if len(out) == 1 else torch.cat(out)).reshape(n, width, m)
                    blocks.append(block if inverse is None else block.index_select(0, inverse))
        return g_blocks, t_blocks

    def descriptor_from_env(
        self, rr: torch.Tensor, atype: torch.Tensor, mask: torch.Tensor, tangent: bool = False,
        partner: torch.Tensor | None = None, kept_slots: list[int] | None = None, all_slots: bool = False,
        type_counts: list[int] | None = None, type_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Descriptor (nf, nloc, M * axis_neuron) from R~, with the pieces :meth:`env_gradient` needs:
        G^T / nnei (N, 4, M) and the embedding (and tangent) blocks. ``all_slots``: every slot embedded
        (:meth:`embed_all_slots`, static shapes); else only occupied slots and one row per reverse pair
        (:meth:`embed`, or the compiled kernels' rows on CPU)."""
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        if not torch.jit.is_scripting():
            if all_slots:
                g_blocks, t_blocks = self.embed_all_slots(rr, atype, tangent, type_counts, type_order)
                g_t = rr.new_zeros(n, 4, self.neuron[-1])
                d, g_t = self._gram(rr, g_t, g_blocks)
                return d, g_t, g_blocks, t_blocks
            if self._rows_mode(rr, tangent):
                return self._descriptor_from_rows(rr, atype, mask, partner, kept_slots)
        g_blocks, t_blocks, tail = self.embed(rr, atype, mask, tangent, partner, kept_slots)
        g_t = tail.index_select(0, atype.reshape(-1))
        d, g_t = self._gram(rr, g_t, g_blocks)
        return d, g_t, g_blocks, t_blocks

    def _gram(self, rr: torch.Tensor, g_t: torch.Tensor, g_blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """D (nf, nloc, M * axis_neuron) and G^T / nnei (N, 4, M): ``g_t`` (N, 4, M) plus each block's
        R~^T g over its first k[t] slots."""
        nf, nloc, nnei, _ = rr.shape
        flat_rr = rr.reshape(nf * nloc, nnei, 4)
        # (bmm, not matmul: matmul's broadcasting adds no-op expand nodes that cost time in backward)
        for tj in range(self.ntypes):
            lo = self.sections[tj]
            g_t = torch.baddbmm(g_t, flat_rr[:, lo:lo + g_blocks[tj].shape[1]].transpose(1, 2), g_blocks[tj])
        g_t = g_t / self.nnei
        d = torch.bmm(g_t.transpose(1, 2), g_t[..., : self.axis_neuron])
        return d.reshape(nf, nloc, -1), g_t

    @torch.jit.unused
    def _rows_mode(self, rr: torch.Tensor, tangent: bool) -> bool:
        """Whether the slot contractions run on the embedding rows through the compiled kernels: when
        they are in use (:mod:`dpfit.model.kernels`), on CPU, for the forces' pass, and with R~ a
        constant (its own gradient is not written there)."""
        from dpfit.model.kernels import compiled_kernels

        return (tangent and rr.device.type == "cpu" and rr.dtype in (torch.float32, torch.float64)
                and not rr.requires_grad and compiled_kernels(self.kernels) is not None)

    @torch.jit.unused
    def _descriptor_from_rows(
        self, rr: torch.Tensor, atype: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor | None,
        kept_slots: list[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`descriptor_from_env` with the contractions on the rows (compiled kernels). The lists
        returned: rows G per type then each block's index; rows T per type then each block's
        (order, ptr) of ``slots_of_rows`` and the handle on its rows' gradient of ``slot_gt``."""
        from dpfit.model.kernels import ops

        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        out, t_blocks, tail = self._embed_rows(rr, atype, mask, partner, kept_slots)
        g_blocks, indices = out[: self.ntypes], out[self.ntypes:]
        flat_rr = rr.reshape(n, nnei, 4)
        g_t = tail.index_select(0, atype.reshape(-1))
        csr: list[torch.Tensor] = []
        for tj in range(self.ntypes):
            lo = self.sections[tj]
            index = indices[tj]
            order, ptr = ops.slots_of_rows(index.contiguous(), g_blocks[tj].shape[0])
            r_block = flat_rr[:, lo:lo + index.shape[1]].contiguous()
            # (with a handle on the rows' gradient: slot_env's row gradient is summed into slot_gt's backward)
            part, rows_grad = ops.slot_gt(g_blocks[tj], index, r_block, order, ptr)
            g_t = g_t + part
            csr += [order, ptr, rows_grad]
        g_t = g_t / self.nnei
        d = ops.descriptor_gram(g_t, self.axis_neuron)
        return d.reshape(nf, nloc, -1), g_t, g_blocks + indices, t_blocks + csr

    def env_gradient(
        self, grad_d: torch.Tensor, g_t: torch.Tensor, rr: torch.Tensor, mask: torch.Tensor,
        g_blocks: list[torch.Tensor], t_blocks: list[torch.Tensor],
    ) -> torch.Tensor:
        """dE/dR~ (nf, nloc, nnei, 4) from dE/dD (nf, nloc, M * axis_neuron), written out: through
        D = G^T G<, G^T = R~^T g / nnei and, for the first column s of R~ on occupied slots, the
        tangents dg/ds (a padded slot's s is a constant). ``g_blocks``/``t_blocks`` as
        :meth:`descriptor_from_env` returned them (padded blocks, or rows with their indices on the
        compiled path)."""
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        m = self.neuron[-1]
        a = self.axis_neuron
        d_bar = grad_d.reshape(n, m, a)
        flat_rr = rr.reshape(n, nnei, 4)
        flat_mask = mask.reshape(n, nnei)
        if not torch.jit.is_scripting():
            if len(g_blocks) > self.ntypes:  # rows of _descriptor_from_rows
                rows = self._env_gradient_rows(d_bar, g_t, flat_rr, flat_mask, g_blocks, t_blocks)
                return rows.reshape(nf, nloc, nnei, 4)
        g_bar = torch.bmm(g_t[..., :a], d_bar.transpose(1, 2))
        g_bar = g_bar + torch.nn.functional.pad(torch.bmm(g_t, d_bar), [0, m - a])
        g_bar = (g_bar / self.nnei).transpose(1, 2)  # (N, M, 4)
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tj in range(self.ntypes):
            # (N, k[tj], 4) each
            blocks.append((tall_thin_bmm(g_blocks[tj], g_bar), tall_thin_bmm(t_blocks[tj], g_bar)))
        return self._slot_gradient(blocks, flat_rr, flat_mask).reshape(nf, nloc, nnei, 4)

    def _slot_gradient(
        self, blocks: list[tuple[torch.Tensor, torch.Tensor]], flat_rr: torch.Tensor, flat_mask: torch.Tensor
    ) -> torch.Tensor:
        """dE/dR~ (N, nnei, 4) from each block's ``g . g_bar`` and ``t . g_bar`` (N, k[t], 4): the first
        directly, the second through s = R~[..., 0] on occupied slots; zero beyond k[t] (always-padded
        slots do not depend on the coordinates)."""
        parts: list[torch.Tensor] = []
        for tj, (part, tds) in enumerate(blocks):
            lo = self.sections[tj]
            k = part.shape[1]
            ds = (flat_rr[:, lo:lo + k] * tds).sum(-1, keepdim=True)
            ds = torch.where(flat_mask[:, lo:lo + k, None], ds, torch.zeros_like(ds))
            parts.append(torch.nn.functional.pad(part + torch.nn.functional.pad(ds, [0, 3]),
                                                 [0, 0, 0, self.sections[tj + 1] - lo - k]))
        return torch.cat(parts, 1)

    @torch.jit.unused
    def _env_gradient_rows(
        self, d_bar: torch.Tensor, g_t: torch.Tensor, flat_rr: torch.Tensor, flat_mask: torch.Tensor,
        g_blocks: list[torch.Tensor], t_blocks: list[torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`env_gradient`'s products on the rows (compiled kernels): g_bar (N, 4, M) from dE/dD
        ``d_bar`` (N, M, a), then the slot products."""
        from dpfit.model.kernels import ops

        g_bar = ops.descriptor_vjp(g_t, d_bar.contiguous()) / self.nnei
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tj in range(self.ntypes):
            index = g_blocks[self.ntypes + tj]
            order, ptr, rows_grad = t_blocks[self.ntypes + 3 * tj:self.ntypes + 3 * tj + 3]
            valid = flat_mask[:, self.sections[tj]:self.sections[tj] + index.shape[1]].contiguous()
            blocks.append(ops.slot_env(g_blocks[tj], t_blocks[tj], index, valid, g_bar, order, ptr, rows_grad))
        return self._slot_gradient(blocks, flat_rr, flat_mask)

    def env_matrix_vjp(
        self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor, grad_rr: torch.Tensor
    ) -> torch.Tensor:
        """dE/d(diff) (nf, nloc, nnei, 3) from dE/dR~ through :meth:`normalized_env`, written out.

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
        return coef * diff + u[..., 1:] * (w * inv_r * inv_r)

    def forward(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Descriptor (nf, nloc, M * axis_neuron) from pair vectors diff (nf, nloc, nnei, 3) Å."""
        return self.descriptor_from_env(self.normalized_env(diff, mask, atype), atype, mask)[0]
