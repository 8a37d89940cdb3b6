"""Energy fitting net: per-type networks mapping [descriptor, fparam, aparam] to atomic energies."""

from __future__ import annotations

import torch
from torch import nn

from dpfit.model.network import ResidualMLP
from dpfit.model.stages import type_groups


class FittingInputs:
    """The fitting nets' input: the descriptor with the normalised fparam and aparam; mixed into the fitting
    modules (energy, property), whose ``numb_fparam``/``numb_aparam`` and ``fparam_avg``, ``fparam_inv_std``,
    ``aparam_avg``, ``aparam_inv_std`` buffers it reads."""

    def _inputs(self, descriptor: torch.Tensor, fparam: torch.Tensor | None, aparam: torch.Tensor | None) -> torch.Tensor:
        """The nets' input (nf, nloc, dim + nq + np): descriptor, normalised fparam and aparam."""
        nf, nloc, _ = descriptor.shape
        parts = [descriptor]
        if self.numb_fparam:
            if fparam is None:
                raise ValueError(f"this model needs fparam ({self.numb_fparam} values per frame)")
            fp = (fparam.reshape(nf, self.numb_fparam) - self.fparam_avg) * self.fparam_inv_std
            parts.append(fp.unsqueeze(1).expand(nf, nloc, self.numb_fparam))
        if self.numb_aparam:
            if aparam is None:
                raise ValueError(f"this model needs aparam ({self.numb_aparam} values per atom)")
            parts.append((aparam.reshape(nf, nloc, self.numb_aparam) - self.aparam_avg) * self.aparam_inv_std)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else descriptor  # no copy of a lone descriptor


class EnergyFitting(FittingInputs, nn.Module):
    """``E_i = F_{t_i}([D_i, (fparam - avg) * inv_std, (aparam_i - avg) * inv_std]) + bias_atom_e[t_i]``.

    One ResidualMLP (hidden ``neuron``, tanh, linear output of width 1) per atom type. The input
    statistics and ``bias_atom_e`` (ntypes,) eV are buffers filled from training data.
    """

    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        neuron: list[int] = (240, 240, 240),
        resnet_dt: bool = True,
        numb_fparam: int = 0,
        numb_aparam: int = 0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.ntypes = ntypes
        self.dim_descrpt = dim_descrpt
        self.numb_fparam = int(numb_fparam)
        self.numb_aparam = int(numb_aparam)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        in_dim = dim_descrpt + self.numb_fparam + self.numb_aparam
        self.nets = nn.ModuleList(
            ResidualMLP(in_dim, list(neuron), resnet_dt, out_dim=1, dtype=dtype, generator=gen)
            for _ in range(ntypes)
        )
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dtype=dtype))
        self.register_buffer("fparam_avg", torch.zeros(self.numb_fparam, dtype=dtype))
        self.register_buffer("fparam_inv_std", torch.ones(self.numb_fparam, dtype=dtype))
        self.register_buffer("aparam_avg", torch.zeros(self.numb_aparam, dtype=dtype))
        self.register_buffer("aparam_inv_std", torch.ones(self.numb_aparam, dtype=dtype))

    def forward(
        self,
        descriptor: torch.Tensor,
        atype: torch.Tensor,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        type_counts: list[int] | None = None,
        type_order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Atomic energies (nf, nloc) eV from descriptor (nf, nloc, dim), fparam (nf, nq), aparam (nf, nloc, np)."""
        return self._per_type(descriptor, atype, fparam, aparam, False, type_counts, type_order)[0]

    def forward_with_grad(
        self,
        descriptor: torch.Tensor,
        atype: torch.Tensor,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        type_counts: list[int] | None = None,
        type_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (nf, nloc) and dE_i/dD_i (nf, nloc, dim_descrpt), the gradient written out
        explicitly (differentiable by one backward pass)."""
        energy, grad = self._per_type(descriptor, atype, fparam, aparam, True, type_counts, type_order)
        assert grad is not None
        return energy, grad

    def _per_type(
        self,
        descriptor: torch.Tensor,
        atype: torch.Tensor,
        fparam: torch.Tensor | None,
        aparam: torch.Tensor | None,
        with_grad: bool,
        type_counts: list[int] | None = None,
        type_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each type's net on its atoms: energies (nf, nloc) and, ``with_grad``, dE/dD (nf, nloc, dim).

        The atoms are taken in type order (a stable sort; none when already sorted, as in DeePMD's data
        with one frame), so each net reads a contiguous slice and the outputs are concatenated, not
        scattered into zeros. ``type_counts``/``type_order``: that grouping as the data pipeline
        computed it (:class:`~dpfit.model.stages.IndexFacts`), else derived here."""
        nf, nloc, dim = descriptor.shape
        x = self._inputs(descriptor, fparam, aparam)
        flat_x = x.reshape(nf * nloc, -1)
        perm: torch.Tensor | None = type_order
        if type_counts is not None:
            counts: list[int] = type_counts
        else:
            counts, perm = type_groups(atype, len(self.nets))
        if perm is not None:
            flat_x = flat_x.index_select(0, perm)
        # one split (its backward is one concatenation; a slice's backward zero-fills the whole input)
        values, grads = self.run_nets(flat_x.split(counts), counts, with_grad)
        out = torch.cat([x.new_zeros(0)] + values)
        grad: torch.Tensor | None = None
        if with_grad:
            grad = torch.cat([x.new_zeros(0, dim)] + [g[:, :dim] if g.shape[1] > dim else g for g in grads])
        if perm is not None:
            inverse = torch.argsort(perm)
            out = out.index_select(0, inverse)
            grad = grad.index_select(0, inverse) if grad is not None else None
        energy = out.reshape(nf, nloc) + self.bias_atom_e[atype]
        return energy, grad.reshape(nf, nloc, dim) if grad is not None else None

    def run_nets(self, pieces: list[torch.Tensor], counts: list[int],
                 with_grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each type's net on its rows (``pieces[t]``, (counts[t], in)): the energies (rows,) of the types
        present and, ``with_grad``, their input gradients (rows, in), written out (no autograd)."""
        values: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for t, net in enumerate(self.nets):
            if counts[t] > 0:
                if with_grad:
                    value, g = net.value_and_input_grad(pieces[t], torch.ones(1, dtype=pieces[t].dtype,
                                                                               device=pieces[t].device))
                    grads.append(g)
                else:
                    value = net(pieces[t])
                values.append(value.squeeze(-1))
        return values, grads
