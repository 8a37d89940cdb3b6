"""The reference Deep Potential model (DeePMD ``se_e2_a`` + energy fitting) in plain PyTorch.

This file is the place to read the physics (SPEC.md): every option in a few lines of tensor code,
forces and virials by ``torch.autograd.grad``. It is selected by ``model.impl=reference``. The default
model (``model.impl=fast``, :class:`dpfit.model.EnergyModel`) computes the same numbers faster and is
tested against this one (tests/test_parity.py). Both have the same parameters and buffers under the
same names, and draw the same initial weights from a seed, so a checkpoint of one loads into the other.

Shapes: nf frames, nloc atoms, nnei = sum(sel) neighbor slots (type 0's slots first), M = neuron[-1].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Layer(nn.Module):
    """DeePMD's layer: ``y = tanh(x W + b)``, times ``idt`` (``resnet_dt``), plus ``x`` when the width is
    unchanged or ``[x, x]`` when it doubles. ``activate=False``: the linear output layer ``x W + b``."""

    def __init__(self, n_in: int, n_out: int, use_idt: bool, residual: bool, activate: bool,
                 dtype: torch.dtype, generator: torch.Generator | None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(n_in + n_out)
        self.matrix = nn.Parameter(torch.randn(n_in, n_out, dtype=dtype, generator=generator) * std)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=dtype, generator=generator))
        self.residual = residual and n_out in (n_in, 2 * n_in)
        if use_idt and self.residual:
            self.idt = nn.Parameter(0.1 + 0.001 * torch.randn(n_out, dtype=dtype, generator=generator))
        else:
            self.register_parameter("idt", None)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix + self.bias
        if not self.activate:
            return y
        y = torch.tanh(y)
        if self.idt is not None:
            y = y * self.idt
        if self.residual:
            y = y + (x if y.shape[-1] == x.shape[-1] else torch.cat([x, x], dim=-1))
        return y


class MLP(nn.Module):
    """Layers of widths ``neuron`` on (..., in_dim) inputs; with ``out_dim``, a final linear layer with
    a zero bias (a new model starts from its energy bias)."""

    def __init__(self, in_dim: int, neuron: list[int], resnet_dt: bool, out_dim: int | None = None,
                 dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> None:
        super().__init__()
        widths = [in_dim, *neuron]
        layers = [Layer(a, b, resnet_dt, True, True, dtype, generator) for a, b in zip(widths[:-1], widths[1:])]
        if out_dim is not None:
            layers.append(Layer(widths[-1], out_dim, False, False, False, dtype, generator))
            with torch.no_grad():
                layers[-1].bias.zero_()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def switching_function(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """1 below ``rcut_smth``, 0 from ``rcut`` on, ``u^3 (-6 u^2 + 15 u - 10) + 1`` between (C2-smooth)."""
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


class Descriptor(nn.Module):
    """se_e2_a: ``D_i = G_i^T G_i[:, :axis_neuron]`` with ``G_i = (1/nnei) sum_j R~_ij^T g(s_ij)`` (4, M).

    ``R~_ij`` is the normalized row ``w(r)[1/r, x/r^2, y/r^2, z/r^2]`` of slot j, ``s_ij`` its first
    entry and ``g`` the embedding net of the neighbor's type (``type_one_side``) or of the (center,
    neighbor) type pair (net ``t_i + ntypes * t_j``). ``davg``/``dstd`` (ntypes, nnei, 4) are set from data.
    """

    def __init__(self, ntypes: int, sel: list[int], rcut: float = 6.0, rcut_smth: float = 0.5,
                 neuron: list[int] = (25, 50, 100), axis_neuron: int = 16, resnet_dt: bool = False,
                 type_one_side: bool = True, exclude_types: list[list[int]] = (), set_davg_zero: bool = False,
                 seed: int | None = None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if len(sel) != ntypes:
            raise ValueError(f"sel has {len(sel)} entries but the type map has {ntypes} types")
        if rcut_smth >= rcut:
            raise ValueError(f"rcut_smth ({rcut_smth}) must be smaller than rcut ({rcut})")
        if axis_neuron > neuron[-1]:
            raise ValueError(f"axis_neuron ({axis_neuron}) exceeds the embedding width ({neuron[-1]})")
        self.ntypes, self.sel, self.nnei = ntypes, [int(s) for s in sel], int(sum(sel))
        self.rcut, self.rcut_smth = float(rcut), float(rcut_smth)
        self.neuron, self.axis_neuron = [int(n) for n in neuron], int(axis_neuron)
        self.type_one_side, self.set_davg_zero = bool(type_one_side), bool(set_davg_zero)
        self.exclude_types = [tuple(int(t) for t in pair) for pair in exclude_types]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        nnets = ntypes if type_one_side else ntypes * ntypes
        self.embeddings = nn.ModuleList(MLP(1, self.neuron, resnet_dt, None, dtype, gen) for _ in range(nnets))
        keep = torch.ones(ntypes, ntypes, dtype=dtype)  # 0 for excluded (center, neighbor) type pairs
        for ti, tj in self.exclude_types:
            keep[ti, tj] = keep[tj, ti] = 0.0
        self.register_buffer("pair_keep", keep)
        self.register_buffer("davg", torch.zeros(ntypes, self.nnei, 4, dtype=dtype))
        self.register_buffer("dstd", torch.ones(ntypes, self.nnei, 4, dtype=dtype))
        self.register_buffer("slot_type", torch.repeat_interleave(torch.arange(ntypes), torch.tensor(self.sel)),
                             persistent=False)

    @property
    def dim_out(self) -> int:
        return self.neuron[-1] * self.axis_neuron

    def env_matrix(self, diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw rows ``w(r) [1/r, d/r^2]`` (nf, nloc, nnei, 4), zero on padded slots (also for statistics)."""
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        w = switching_function(r, self.rcut_smth, self.rcut) * mask.unsqueeze(-1)
        return torch.cat([1.0 / r, diff / (r * r)], dim=-1) * w

    def forward(self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Descriptor (nf, nloc, M * axis_neuron) from pair vectors ``diff`` (nf, nloc, nnei, 3) Å."""
        # normalized by the center type's statistics; a padded slot keeps -davg/dstd (as in DeePMD)
        rr = (self.env_matrix(diff, mask) - self.davg[atype]) / self.dstd[atype]
        keep = self.pair_keep[atype.unsqueeze(-1), self.slot_type]  # (nf, nloc, nnei)
        rr = rr * torch.where(mask, keep, torch.ones_like(keep)).unsqueeze(-1)  # excluded pairs: 0
        s = rr[..., :1]  # embedding input (nf, nloc, nnei, 1)
        blocks = []
        for tj in range(self.ntypes):  # the slots of neighbor type tj
            lo, hi = sum(self.sel[:tj]), sum(self.sel[:tj + 1])
            if self.type_one_side:
                blocks.append(self.embeddings[tj](s[:, :, lo:hi]))
            else:  # each center type ti has its own net for neighbors of type tj
                center = atype[:, :, None, None]
                blocks.append(sum(torch.where(center == ti, self.embeddings[ti + self.ntypes * tj](s[:, :, lo:hi]), 0.0)
                                  for ti in range(self.ntypes)))
        g = torch.cat(blocks, dim=2)  # (nf, nloc, nnei, M)
        gr = torch.einsum("fisc,fism->ficm", rr, g) / self.nnei  # G^T (nf, nloc, 4, M)
        d = torch.einsum("ficm,fica->fima", gr, gr[..., :self.axis_neuron])
        return d.reshape(*d.shape[:2], -1)


class Fitting(nn.Module):
    """``E_i = F_{t_i}([D_i, (fparam - avg) * inv_std, (aparam_i - avg) * inv_std]) + bias_atom_e[t_i]``,
    one net per atom type; the statistics and ``bias_atom_e`` (ntypes,) eV are set from data."""

    def __init__(self, ntypes: int, dim_descrpt: int, neuron: list[int] = (240, 240, 240), resnet_dt: bool = True,
                 numb_fparam: int = 0, numb_aparam: int = 0, seed: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.ntypes, self.dim_descrpt = ntypes, dim_descrpt
        self.numb_fparam, self.numb_aparam = int(numb_fparam), int(numb_aparam)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        in_dim = dim_descrpt + self.numb_fparam + self.numb_aparam
        self.nets = nn.ModuleList(MLP(in_dim, list(neuron), resnet_dt, 1, dtype, gen) for _ in range(ntypes))
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dtype=dtype))
        for key, n in (("fparam", self.numb_fparam), ("aparam", self.numb_aparam)):
            self.register_buffer(f"{key}_avg", torch.zeros(n, dtype=dtype))
            self.register_buffer(f"{key}_inv_std", torch.ones(n, dtype=dtype))

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor, fparam: torch.Tensor | None = None,
                aparam: torch.Tensor | None = None) -> torch.Tensor:
        """Atomic energies (nf, nloc) eV; fparam (nf, numb_fparam), aparam (nf, nloc, numb_aparam)."""
        nf, nloc, _ = descriptor.shape
        x = [descriptor]
        if self.numb_fparam:
            if fparam is None:
                raise ValueError(f"this model needs fparam ({self.numb_fparam} values per frame)")
            fp = (fparam.reshape(nf, 1, -1) - self.fparam_avg) * self.fparam_inv_std
            x.append(fp.expand(nf, nloc, self.numb_fparam))
        if self.numb_aparam:
            if aparam is None:
                raise ValueError(f"this model needs aparam ({self.numb_aparam} values per atom)")
            x.append((aparam.reshape(nf, nloc, -1) - self.aparam_avg) * self.aparam_inv_std)
        x = torch.cat(x, dim=-1)
        energy = sum(torch.where(atype == t, net(x).squeeze(-1), 0.0) for t, net in enumerate(self.nets))
        return energy + self.bias_atom_e[atype]


class ReferenceEnergyModel(nn.Module):
    """Energy, atomic energies, forces, virial and atomic virial of frames of one system (same
    ``forward`` as :class:`dpfit.model.EnergyModel`)."""

    def __init__(self, type_map: list[str], descriptor: Descriptor, fitting: Fitting, config: dict | None = None):
        super().__init__()
        self.type_map, self.descriptor, self.fitting = list(type_map), descriptor, fitting
        self.config = config or {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ReferenceEnergyModel:
        """From ``type_map``, ``descriptor``, ``fitting_net`` (DeePMD key names) and ``precision``."""
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(config).items()}
        dtype = DTYPES[cfg.get("precision", "float64")]
        skip = ("type", "_comment", "precision")
        descriptor = Descriptor(len(cfg["type_map"]), dtype=dtype,
                                **{k: v for k, v in cfg["descriptor"].items() if k not in skip})
        fitting = Fitting(len(cfg["type_map"]), descriptor.dim_out, dtype=dtype,
                          **{k: v for k, v in cfg.get("fitting_net", {}).items() if k not in skip})
        return cls(cfg["type_map"], descriptor, fitting, config=cfg)

    @property
    def kernels(self) -> str:
        """The fast model's option, kept for :func:`dpfit.model.convert` (no compiled kernels here)."""
        return self.config.get("kernels", "off")

    @property
    def backend(self) -> str:
        return "reference"

    def select_backend(self, device: torch.device | str | None = None, kernels: str | None = None) -> str:
        """The fast model's choice (:meth:`dpfit.model.EnergyModel.select_backend`): there is one backend
        here; ``kernels`` is recorded for :func:`dpfit.model.convert`."""
        if kernels is not None:
            self.config["kernels"] = kernels
        return "reference"

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    def forward(self, coord: torch.Tensor, atype: torch.Tensor, nlist: torch.Tensor, box: torch.Tensor | None = None,
                shift: torch.Tensor | None = None, fparam: torch.Tensor | None = None,
                aparam: torch.Tensor | None = None, do_force: bool = True, do_virial: bool = False,
                do_atomic_virial: bool = False, create_graph: bool = False,
                **index_facts: object) -> dict[str, torch.Tensor]:
        """coord (nf, nloc, 3) Å; atype (nf, nloc); nlist (nf, nloc, nnei) atom indices, -1 padded; box
        (nf, 3, 3) rows a, b, c and shift (nf, nloc, nnei, 3) integer images S (periodic only): the pair
        vector of a slot is ``d_ij = r_j + S box - r_i``. Returns energy (nf,), atom_energy (nf, nloc),
        and on request force (nf, nloc, 3), virial (nf, 9), atom_virial (nf, nloc, 9). ``index_facts``
        (a batch's partner, kept, type_counts, type_order, for the fast model) are not needed here."""
        need_grad = do_force or do_virial or do_atomic_virial
        # autograd needs a graph: leave inference mode (never on under torch.compile, which cannot trace the check)
        if need_grad and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                inputs = [None if t is None else t.clone() for t in (coord, atype, nlist, box, shift, fparam, aparam)]
                return self.forward(*inputs, do_force, do_virial, do_atomic_virial, create_graph)
        dtype = self.dtype
        coord, box = coord.to(dtype), None if box is None else box.to(dtype)
        fparam = None if fparam is None else fparam.to(dtype)
        aparam = None if aparam is None else aparam.to(dtype)
        outer_grad = torch.is_grad_enabled()  # training: the parameters' graph is kept
        with torch.set_grad_enabled(need_grad or outer_grad):
            if need_grad and not coord.requires_grad:
                coord = coord.detach().requires_grad_()
            nf, nloc, nnei = nlist.shape
            mask = nlist >= 0
            j = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(-1, -1, 3)
            diff = torch.gather(coord, 1, j).reshape(nf, nloc, nnei, 3) - coord.unsqueeze(2)
            if box is not None and shift is not None:
                diff = diff + torch.einsum("fisk,fkc->fisc", shift.to(dtype), box)
            # padded slots get a vector beyond the cutoff: every norm stays finite, the switch is 0
            far = torch.tensor([self.rcut + 1.0, 0.0, 0.0], dtype=dtype, device=coord.device)
            diff = torch.where(mask.unsqueeze(-1), diff, far)
            atom_energy = self.fitting(self.descriptor(diff, mask, atype), atype, fparam, aparam)
            out = {"energy": atom_energy.sum(dim=-1), "atom_energy": atom_energy}
            if need_grad:
                # F = -dE/dr; the virial from g_ij = dE/dd_ij: Xi = -sum_ij g_ij (x) d_ij
                de_dr, g = torch.autograd.grad(out["energy"].sum(), [coord, diff], create_graph=create_graph,
                                               retain_graph=create_graph or outer_grad)
                if not create_graph:
                    de_dr, g = de_dr.detach(), g.detach()
                if do_force:
                    out["force"] = -de_dr
                pair_virial = -(g.unsqueeze(-1) * diff.unsqueeze(-2)).reshape(nf, nloc, nnei, 9)
                if do_virial:
                    out["virial"] = pair_virial.sum(dim=(1, 2))
                if do_atomic_virial:  # each pair's term goes to its neighbor atom j, as in DeePMD-kit
                    j9 = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(-1, -1, 9)
                    out["atom_virial"] = pair_virial.new_zeros(nf, nloc, 9).scatter_add(
                        1, j9, pair_virial.reshape(nf, -1, 9))
        return out if outer_grad else {k: v.detach() for k, v in out.items()}
