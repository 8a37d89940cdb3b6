"""Property fitting net: per-type networks mapping [descriptor, fparam, aparam] to ``task_dim`` atomic values.

DeePMD-kit's ``property`` fitting: the nets' outputs are scaled back to the label's units by the
statistics of the training labels, ``p_i = F_{t_i}(x_i) * out_std[t_i] + out_bias[t_i]``, and the frame's
property is their sum (extensive) or mean (``intensive``). The per-atom values ``p_i`` may be fitted to
atomic labels too (partial charges); ``atom_sum`` fixes each frame's sum of them (e.g. 0: neutral).
"""

from __future__ import annotations

import torch
from torch import nn

from dpfit.model.fitting import FittingInputs
from dpfit.model.network import ResidualMLP


class PropertyFitting(FittingInputs, nn.Module):
    """``p_i = F_{t_i}([D_i, (fparam - avg) * inv_std, (aparam_i - avg) * inv_std]) * out_std[t_i] + out_bias[t_i]``.

    One ResidualMLP (hidden ``neuron``, tanh, linear output of width ``task_dim``) per atom type.
    ``out_bias`` / ``out_std`` (ntypes, task_dim), in the property's units, and the fparam/aparam
    normalisation are buffers set from the training data (:mod:`dpfit.training.statistics`).
    ``distinguish_types`` only changes how the statistics are computed (DeePMD-kit's option): per type
    by least squares on the type counts (true) or one mean for all types (false).
    ``atom_sum`` (None or a number): shift each frame's atomic values uniformly so that they sum to
    it (per task), e.g. 0 for the partial charges of neutral systems.
    """

    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        property_name: str = "property",
        task_dim: int = 1,
        intensive: bool = False,
        neuron: list[int] = (128, 128, 128),
        resnet_dt: bool = True,
        numb_fparam: int = 0,
        numb_aparam: int = 0,
        distinguish_types: bool = True,
        atom_sum: float | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if int(task_dim) < 1:
            raise ValueError(f"task_dim must be 1 or more, got {task_dim}")
        if not str(property_name) or not all(c.isalnum() or c in "_-." for c in str(property_name)):
            raise ValueError(f"property_name {property_name!r}: a label file's name (letters, digits, _ - .)")
        if atom_sum is not None and bool(intensive):
            raise ValueError("atom_sum fixes the sum of the atomic values: it needs an extensive property "
                             "(intensive: false)")
        self.ntypes = int(ntypes)
        self.dim_descrpt = int(dim_descrpt)
        self.property_name = str(property_name)
        self.task_dim = int(task_dim)
        self.intensive = bool(intensive)
        self.distinguish_types = bool(distinguish_types)
        self.numb_fparam = int(numb_fparam)
        self.numb_aparam = int(numb_aparam)
        self.has_atom_sum = atom_sum is not None
        self.atom_sum = float(atom_sum) if atom_sum is not None else 0.0
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        in_dim = self.dim_descrpt + self.numb_fparam + self.numb_aparam
        self.nets = nn.ModuleList(
            ResidualMLP(in_dim, list(neuron), resnet_dt, out_dim=self.task_dim, dtype=dtype, generator=gen)
            for _ in range(self.ntypes)
        )
        self.register_buffer("out_bias", torch.zeros(self.ntypes, self.task_dim, dtype=dtype))
        self.register_buffer("out_std", torch.ones(self.ntypes, self.task_dim, dtype=dtype))
        self.register_buffer("fparam_avg", torch.zeros(self.numb_fparam, dtype=dtype))
        self.register_buffer("fparam_inv_std", torch.ones(self.numb_fparam, dtype=dtype))
        self.register_buffer("aparam_avg", torch.zeros(self.numb_aparam, dtype=dtype))
        self.register_buffer("aparam_inv_std", torch.ones(self.numb_aparam, dtype=dtype))

    def net_outputs(self, descriptor: torch.Tensor, atype: torch.Tensor, fparam: torch.Tensor | None = None,
                    aparam: torch.Tensor | None = None) -> torch.Tensor:
        """The nets' raw outputs (nf, nloc, task_dim), before the output statistics: each type's net on its atoms."""
        nf, nloc, _ = descriptor.shape
        x = self._inputs(descriptor, fparam, aparam)
        flat_x = x.reshape(nf * nloc, x.shape[-1])
        flat_type = atype.reshape(-1)
        out = x.new_zeros(nf * nloc, self.task_dim)
        for t, net in enumerate(self.nets):
            rows = torch.nonzero(flat_type == t).squeeze(-1)
            if rows.numel() > 0:
                out = out.index_copy(0, rows, net(flat_x.index_select(0, rows)))
        return out.reshape(nf, nloc, self.task_dim)

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor, fparam: torch.Tensor | None = None,
                aparam: torch.Tensor | None = None) -> torch.Tensor:
        """Atomic values (nf, nloc, task_dim) in the property's units; descriptor (nf, nloc, dim),
        fparam (nf, numb_fparam), aparam (nf, nloc, numb_aparam)."""
        atomic = self.net_outputs(descriptor, atype, fparam, aparam) * self.out_std[atype] + self.out_bias[atype]
        if self.has_atom_sum:
            excess = atomic.sum(dim=1, keepdim=True) - self.atom_sum
            atomic = atomic - excess / atomic.shape[1]
        return atomic

    def reduce(self, atomic: torch.Tensor) -> torch.Tensor:
        """The frame's property (nf, task_dim) from atomic values (nf, nloc, task_dim): mean or sum."""
        total = atomic.sum(dim=1)
        return total / atomic.shape[1] if self.intensive else total
