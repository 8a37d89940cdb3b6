"""The compact layout of the embedding: the PyTorch backend for CPUs without the compiled kernels.

The static layout (:class:`~dpfit.model.descriptor.SeE2A`) embeds every neighbour slot, padding included.
Here the nets run only on occupied slots, once per same-type pair (a slot and its reverse pair share the
embedding input s(r) when the statistics are the same over a type's slots), plus one row per distinct
input of a padded slot; one gather puts the rows into the slot layout. The shapes depend on the data
(host reads), which a CPU does not mind: on DeePMD's water example this layout's training step is 1.6x
faster than the static one (102 vs 167 ms, float64, 1 thread, docs/performance.md). The compiled kernels
(:class:`~dpfit.model.kernels.backend.KernelSeE2A`) implement the same layout in C++.
"""

from __future__ import annotations

import torch

from dpfit.model.descriptor import SeE2A
from dpfit.model.row_gather import gather_rows
from dpfit.model.stages import Embedding, Environment, IndexFacts


def own_rows_first(outputs: list[torch.Tensor], n_own: list[int]) -> torch.Tensor:
    """Rows of several nets' outputs reordered: each net's first ``n_own`` rows, then the rest of each."""
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat([out[:c] for out, c in zip(outputs, n_own)] + [out[c:] for out, c in zip(outputs, n_own)])


class CompactSeE2A(SeE2A):
    """:class:`SeE2A` whose ``embed`` runs the nets on occupied slots only (same parameters and buffers)."""

    def kept_slots(self, mask: torch.Tensor, facts: IndexFacts) -> list[int]:
        """Per neighbour type, the leading slots of its block occupied in some atom (the slots after them
        are padding for every atom): the data pipeline's ``facts.kept``, else read from the mask."""
        given = facts.kept
        if given is not None:
            return given
        flat_mask = mask.reshape(-1, mask.shape[-1])
        kept: list[int] = []
        for tj in range(self.ntypes):
            lo, hi = self.sections[tj], self.sections[tj + 1]
            width = hi - lo
            k = 0
            if width > 0:
                k = int((flat_mask[:, lo:hi].to(torch.long) * torch.arange(1, width + 1, device=mask.device)).max())
            kept.append(k)
        return kept

    def embed(self, env: Environment, atype: torch.Tensor, tangent: bool, facts: IndexFacts) -> Embedding:
        """The descriptor from the occupied slots' rows, in the slot layout: per neighbour type t one (N,
        k[t], M) block (k[t] <= sel[t], see :meth:`kept_slots`) of g and, with ``tangent``, of dg/ds (on
        padded slots the tangent of the padding row, which callers mask); the slots padded in every atom
        enter G^T as a constant per centre type. ``facts.partner`` (the reverse pairs) is used when
        :meth:`reverse_pairs_share_input`: of two reverse slots only the first is embedded."""
        rr, mask = env.rr, env.mask
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        m = self.neuron[-1]
        partner = facts.partner if self.reverse_pairs_share_input() else None
        kept_slots = self.kept_slots(mask, facts)
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
            kept = kept_slots[tj]  # slots [lo, lo + kept) hold every neighbor of type tj in this batch
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
                    distinct, which = self.padding_inputs(s_pad, lo, hi, ti)
                    x = torch.cat([s_b.index_select(0, rows), distinct]).unsqueeze(-1)
                    if kept < width:
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
            source = own_rows_first(values, n_own)
            t_source = own_rows_first(tangents, n_own) if tangent else source
            if kept < width:
                tail = self.padded_tail(tail, lo, hi, kept, pad_values, pad_alone)
            inverse = torch.cat(owned)
            other_slots = torch.nonzero(~computed.reshape(-1)).squeeze(-1)  # padded and reused slots
            other_rows = index.reshape(-1).index_select(0, other_slots)
            g_blocks.append(gather_rows(source, index, inverse, other_slots, other_rows))
            if tangent:
                t_blocks.append(gather_rows(t_source, index, inverse, other_slots, other_rows))
        d, gt = self.gram(rr, tail.index_select(0, flat_type), g_blocks)
        return Embedding(d, gt, g_blocks, t_blocks, [], [], [])

    def padding_inputs(self, s_pad: torch.Tensor, lo: int, hi: int, ti: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct embedding inputs of padded slots [lo, hi) for the net of center type ``ti`` (-1:
        all types) and each (center type, slot)'s one among them, (ntypes or 1, hi - lo)."""
        pad_in = s_pad[:, lo:hi] if ti < 0 else s_pad[ti:ti + 1, lo:hi]
        distinct, which = torch.unique(pad_in.reshape(-1), return_inverse=True)
        return distinct, which.reshape(pad_in.shape)

    def padded_tail(self, tail: torch.Tensor, lo: int, hi: int, kept: int, pad_values: list[torch.Tensor],
                    pad_alone: torch.Tensor) -> torch.Tensor:
        """``tail`` plus the always-padded slots [lo + kept, hi): R~ and g are constants per center type.
        g (ntypes, hi - lo - kept, M) from the padding rows evaluated alone (``pad_values``, rows
        ``pad_alone``): the gradient of indexing all of a net's rows would be a zero-filled array."""
        rr_pad = -self.davg[:, lo + kept:hi] / self.dstd[:, lo + kept:hi]
        g_pad = torch.cat(pad_values)[pad_alone[:, kept:]]
        return torch.baddbmm(tail, rr_pad.transpose(1, 2), g_pad)

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
