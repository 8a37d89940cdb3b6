"""The compiled-kernels backend: the model's stages on the ``torch.ops.dpfit`` ops (CPU, float32/64).

The compact layout of :mod:`dpfit.model.compact_layout` (occupied slots only, one row per same-type
pair), computed by the C++ op library: the pair vectors, R~ and its Jacobian in one pass
(``env_geometry``); each neighbour type's rows (``block_rows``), the embedding nets' values and
tangents (``value_and_tangent``; ``tabulated_value_and_tangent`` for a compressed model's tables), the
contractions straight from the rows (``slot_gt``, ``slot_env``, never gathering them into the slot
layout), the descriptor products (``descriptor_gram``, ``descriptor_vjp``) and the fitting nets with their input gradient (``fitting``). The ops carry their
backward formulas, so a training step differentiates the closed-form forces in one backward pass.

Swapped in by :meth:`dpfit.model.EnergyModel.use_backend` (same parameters and buffers); it runs where the
op library is loaded (:func:`dpfit.model.kernels.load_library`), also inside TorchScript files.
"""

# (no `from __future__ import annotations`: TorchScript reads this module's annotations)
from typing import List, Optional, Tuple

import torch

from dpfit.model.compact_layout import CompactSeE2A, own_rows_first
from dpfit.model.fitting import EnergyFitting
from dpfit.model.network import records_gradient
from dpfit.model.stages import Embedding, Environment, IndexFacts


class KernelSeE2A(CompactSeE2A):
    """:class:`~dpfit.model.compact_layout.CompactSeE2A` on the compiled ops (same parameters and buffers).

    Coordinates must not require a gradient (forces are written out in closed form; the geometry op
    has no derivative with respect to them)."""

    def environment(
        self, coord: torch.Tensor, box: Optional[torch.Tensor], nlist: torch.Tensor, shift: Optional[torch.Tensor],
        atype: torch.Tensor,
    ) -> Environment:
        """``env_geometry``: pair vectors, R~ and its Jacobian dE/dd = J dE/dR~ (zero on padding) in one
        pass. coord (nf, nall, 3), nall >= nloc."""
        periodic = box is not None and shift is not None
        keep: Optional[torch.Tensor] = None
        if self.has_exclude:
            keep = self.pair_keep
        diff, rr, jac = torch.ops.dpfit.env_geometry(
            coord, nlist.long(), shift.long() if periodic and shift is not None else None,
            box if periodic else None, atype.long(), self.davg, self.dstd, keep, self.slot_type.long(),
            self.rcut_smth, self.rcut, self.rcut + 1.0)
        return Environment(diff, nlist >= 0, rr, jac)

    def reverse_pairs(self, nlist: torch.Tensor, shift: Optional[torch.Tensor],
                      atype: torch.Tensor) -> Optional[torch.Tensor]:
        """``reverse_slots``: each slot's reverse pair among the local atoms (a ghost neighbour has none)."""
        return torch.ops.dpfit.reverse_slots(nlist.long(), None if shift is None else shift.long(), atype.long(),
                                             self.sections)

    def embed(self, env: Environment, atype: torch.Tensor, tangent: bool, facts: IndexFacts) -> Embedding:
        """The descriptor from the occupied slots' rows: per neighbour type, which slots get rows and
        each slot's row (``block_rows``), the nets' values and tangents on the rows (``value_and_tangent``),
        G^T from the rows (``slot_gt``) and D (``descriptor_gram``). The tangents are computed in any case
        (the op gives both) and kept with ``tangent``."""
        rr, mask = env.rr, env.mask
        nf, nloc, nnei, _ = rr.shape
        n = nf * nloc
        partner = facts.partner if self.reverse_pairs_share_input() else None
        kept_slots = self.kept_slots(mask, facts)
        flat_rr = rr.reshape(n, nnei, 4)
        flat_s = rr[..., 0].reshape(n, nnei).contiguous()
        flat_mask = mask.reshape(n, nnei).contiguous()
        flat_type = atype.reshape(-1).contiguous().long()
        flat_partner: Optional[torch.Tensor] = None
        if partner is not None:
            flat_partner = partner.reshape(n, nnei).contiguous()
        s_pad = -self.davg[:, :, 0] / self.dstd[:, :, 0]
        values: List[torch.Tensor] = []
        tangents: List[torch.Tensor] = []
        rows: List[torch.Tensor] = []
        row_slots: List[torch.Tensor] = []
        rows_grad: List[torch.Tensor] = []
        parts: List[torch.Tensor] = []
        tail = rr.new_zeros(self.ntypes, 4, self.neuron[-1])
        for tj in range(self.ntypes):
            lo, hi = self.sections[tj], self.sections[tj + 1]
            width = hi - lo
            kept = kept_slots[tj]
            pad_alone = torch.zeros(self.ntypes, width, dtype=torch.long)
            distincts: List[torch.Tensor] = []
            centers: List[int] = []
            alone = 0
            for k in range(len(self.net_tj)):
                if self.net_tj[k] == tj:
                    ti = self.net_ti[k]
                    distinct, which = self.padding_inputs(s_pad, lo, hi, ti)
                    if ti < 0:
                        pad_alone = which + alone
                    else:
                        pad_alone[ti] = which[0] + alone
                    alone += distinct.shape[0]
                    distincts.append(distinct.unsqueeze(-1))
                    centers.append(ti)
            index_and_inputs = torch.ops.dpfit.block_rows(flat_s, flat_mask, flat_type, flat_partner, lo, kept,
                                                          centers, pad_alone.contiguous())
            index = index_and_inputs[0]
            g_parts: List[torch.Tensor] = []
            t_parts: List[torch.Tensor] = []
            pad_values: List[torch.Tensor] = []
            n_own: List[int] = []
            p = 0
            for k, net in enumerate(self.embeddings):
                if self.net_tj[k] == tj:
                    x_own = index_and_inputs[1 + p]
                    x_pad = distincts[p]
                    p += 1
                    # (the net's own op: value_and_tangent, or tabulated_value_and_tangent for a table)
                    g_x, t_x = net.kernel_value_and_tangent(torch.cat([x_own, x_pad]))
                    g_parts.append(g_x)
                    t_parts.append(t_x)
                    n_own.append(x_own.shape[0])
                    if kept < width:
                        pad_values.append(net.kernel_value_and_tangent(x_pad)[0])
            g_rows = own_rows_first(g_parts, n_own)
            if kept < width:
                tail = self.padded_tail(tail, lo, hi, kept, pad_values, pad_alone)
            order, ptr = torch.ops.dpfit.slots_of_rows(index.contiguous(), g_rows.shape[0])
            values.append(g_rows)
            if tangent:
                tangents.append(own_rows_first(t_parts, n_own))
            rows.append(index)
            row_slots.append(order)
            row_slots.append(ptr)
            r_block = flat_rr[:, lo:lo + kept].contiguous()
            # (with a handle on the rows' gradient: slot_env's row gradient is summed into slot_gt's backward)
            part, handle = torch.ops.dpfit.slot_gt(g_rows, index, r_block, order, ptr)
            parts.append(part)
            rows_grad.append(handle)
        gt = tail.index_select(0, flat_type)
        for part in parts:
            gt = gt + part
        gt = gt / self.nnei
        d = torch.ops.dpfit.descriptor_gram(gt, self.axis_neuron)
        return Embedding(d.reshape(nf, nloc, -1), gt, values, tangents, rows, row_slots, rows_grad)

    def env_gradient(self, grad_d: torch.Tensor, emb: Embedding, env: Environment, atype: torch.Tensor) -> torch.Tensor:
        """dE/dd from dE/dD on the rows: g_bar (``descriptor_vjp``), the slot products (``slot_env``) and the
        Jacobian of R~ (``env_jacobian``)."""
        m = self.neuron[-1]
        n = emb.gt.shape[0]
        nnei = env.rr.shape[2]
        d_bar = grad_d.reshape(n, m, self.axis_neuron).contiguous()
        g_bar = torch.ops.dpfit.descriptor_vjp(emb.gt, d_bar) / self.nnei
        flat_mask = env.mask.reshape(n, nnei)
        blocks: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for tj in range(self.ntypes):
            index = emb.rows[tj]
            lo = self.sections[tj]
            valid = flat_mask[:, lo:lo + index.shape[1]].contiguous()
            part, tds = torch.ops.dpfit.slot_env(emb.values[tj], emb.tangents[tj], index, valid, g_bar,
                                                 emb.row_slots[2 * tj], emb.row_slots[2 * tj + 1], emb.rows_grad[tj])
            blocks.append((part, tds))
        grad_rr = self.slot_gradient(blocks, env.rr, env.mask)
        return torch.ops.dpfit.env_jacobian(env.jacobian, grad_rr, False)


class KernelFitting(EnergyFitting):
    """:class:`~dpfit.model.fitting.EnergyFitting` whose nets run as the ``fitting`` op (the energies and
    their input gradient in one forward; same parameters and buffers)."""

    def run_nets(self, pieces: List[torch.Tensor], counts: List[int],
                 with_grad: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        values: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        for t, net in enumerate(self.nets):
            if counts[t] > 0:
                params = net.flat_parameters()
                kinds = net.kinds[:-1]
                has_idt = net.has_idt[:-1]
                energy, grad, kept = torch.ops.dpfit.fitting(pieces[t], params, kinds, has_idt,
                                                             records_gradient(params, pieces[t]))
                values.append(energy.squeeze(-1))
                if with_grad:
                    grads.append(grad)
        return values, grads
