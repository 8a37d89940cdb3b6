"""Deep Potential energy model: se_e2_a descriptor + energy fitting, forces and virials by autograd."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfit.model.descriptor import SeE2A
from dpfit.model.fitting import EnergyFitting

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def pair_vectors(
    coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor, shift: torch.Tensor | None, far: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor-minus-center vectors (nf, nloc, nnei, 3) Å and the slot mask (False on -1 padding).

    ``shift`` (nf, nloc, nnei, 3) holds integer image vectors S: ``d = r_j + S h - r_i``. Padded slots
    get the vector (far, 0, 0), beyond the cutoff, so every norm stays finite.
    """
    nf, nloc, nnei = nlist.shape
    mask = nlist >= 0
    idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 3)
    rj = torch.gather(coord, 1, idx).reshape(nf, nloc, nnei, 3)
    diff = rj - coord.unsqueeze(2)
    if box is not None and shift is not None:
        diff = diff + torch.matmul(shift.to(box.dtype).reshape(nf, nloc * nnei, 3), box).reshape(nf, nloc, nnei, 3)
    pad = torch.zeros_like(diff)
    pad[..., 0] = far
    return torch.where(mask.unsqueeze(-1), diff, pad), mask


class EnergyModel(nn.Module):
    """Energy, atomic energies, forces, virial and atomic virial of one or more frames of one system.

    Forces and virials come from one backward pass with respect to the pair vectors ``d_ij``:
    ``F = -dE/dr`` is gathered from ``dE/dd`` and ``Xi = -sum_ij d_ij (x) dE/dd_ij``. The pair term of
    the atomic virial goes to the neighbor atom j, as in DeePMD-kit.
    """

    __jit_unused_properties__ = ["dtype", "rcut", "sel"]

    def __init__(self, type_map: list[str], descriptor: SeE2A, fitting: EnergyFitting, config: dict | None = None):
        super().__init__()
        self.type_map = list(type_map)
        self.descriptor = descriptor
        self.fitting = fitting
        self.config = config or {}

    @classmethod
    @torch.jit.ignore
    def from_config(cls, config: dict[str, Any]) -> EnergyModel:
        """Build from a plain dict: ``type_map``, ``descriptor`` and ``fitting_net`` (DeePMD key names), ``precision``."""
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(config).items()}
        dtype = DTYPES[cfg.get("precision", "float64")]
        type_map = list(cfg["type_map"])
        desc_cfg = {k: v for k, v in dict(cfg["descriptor"]).items() if k not in ("type", "_comment", "precision")}
        fit_cfg = {k: v for k, v in dict(cfg.get("fitting_net", {})).items() if k not in ("type", "_comment", "precision")}
        descriptor = SeE2A(ntypes=len(type_map), dtype=dtype, **desc_cfg)
        fitting = EnergyFitting(len(type_map), descriptor.dim_out, dtype=dtype, **fit_cfg)
        return cls(type_map, descriptor, fitting, config=cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    def _energy_gradient(
        self,
        energy: torch.Tensor,
        diff: torch.Tensor,
        rr: torch.Tensor,
        gs: list[torch.Tensor],
        ts: list[torch.Tensor],
        occupied: list[torch.Tensor],
        atoms: list[torch.Tensor],
        nets: list[int],
        create_graph: bool,
    ) -> torch.Tensor:
        """dE/d(diff) (nf, nloc, nnei, 3): autograd through fitting net, G and the environment matrix,
        forward-mode tangents (dg/ds) for the embedding nets."""
        inputs = [rr] + gs
        grads = torch.autograd.grad([energy.sum()], inputs, create_graph=create_graph, retain_graph=True,
                                    allow_unused=True)
        nf, nloc, nnei, _ = rr.shape
        du_ds = rr.new_zeros(nf * nloc, nnei)
        for p in range(len(gs)):
            grad_g = grads[p + 1]
            if grad_g is not None:
                tj = self.descriptor.net_tj[nets[p]]
                lo = self.descriptor.sections[tj]
                hi = self.descriptor.sections[tj + 1]
                rows = occupied[p]
                ds_rows = (grad_g.index_select(0, rows) * ts[p]).sum(-1)
                contrib = grad_g.new_zeros(grad_g.shape[0]).index_put((rows,), ds_rows).reshape(-1, hi - lo)
                contrib = torch.nn.functional.pad(contrib, [lo, nnei - hi])
                if atoms[p].numel() == 0:
                    du_ds = du_ds + contrib
                else:
                    du_ds = du_ds.index_add(0, atoms[p], contrib)
        upstream = torch.nn.functional.pad(du_ds.reshape(nf, nloc, nnei, 1), [0, 3])
        grad_rr = grads[0]
        if grad_rr is not None:
            upstream = upstream + grad_rr
        grad_outputs: list[torch.Tensor | None] = [upstream]
        g = torch.autograd.grad([rr], [diff], grad_outputs=grad_outputs, create_graph=create_graph)[0]
        assert g is not None
        return g

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        nlist: torch.Tensor,
        box: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        do_force: bool = True,
        do_virial: bool = False,
        do_atomic_virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """coord (nf, nloc, 3) Å; atype (nf, nloc); nlist (nf, nloc, nnei); box (nf, 3, 3) rows a, b, c.

        Returns ``energy`` (nf,), ``atom_energy`` (nf, nloc), and on request ``force`` (nf, nloc, 3),
        ``virial`` (nf, 9) eV and ``atom_virial`` (nf, nloc, 9).
        """
        dtype = self.descriptor.davg.dtype
        coord = coord.to(dtype)
        box = box.to(dtype) if box is not None else None
        shift = shift.to(dtype) if shift is not None else None
        fparam = fparam.to(dtype) if fparam is not None else None
        aparam = aparam.to(dtype) if aparam is not None else None
        diff, mask = pair_vectors(coord, box, nlist, shift, far=self.descriptor.rcut + 1.0)
        need_grad = do_force or do_virial or do_atomic_virial
        if need_grad:
            diff = diff.detach().requires_grad_(True)
        desc = self.descriptor
        rr = desc.normalized_env(diff, mask, atype)
        descriptor, gs, ts, occupied, atoms, nets = desc.descriptor_from_env(rr, atype, mask, need_grad)
        atom_energy = self.fitting(descriptor, atype, fparam, aparam)
        energy = atom_energy.sum(dim=-1)
        out = {"energy": energy, "atom_energy": atom_energy}
        if not need_grad:
            return out
        g = self._energy_gradient(energy, diff, rr, gs, ts, occupied, atoms, nets, create_graph) * mask.unsqueeze(-1)
        nf, nloc, nnei, _ = g.shape
        if do_force:
            # d_ij = r_j - r_i: dE/dr_i gets -sum_j g_ij, dE/dr_j gets +g_ij.
            idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 3)
            force = g.sum(dim=2) - torch.zeros_like(coord).scatter_add(1, idx, g.reshape(nf, nloc * nnei, 3))
            out["force"] = force
        if do_virial or do_atomic_virial:
            pair_virial = -(g.unsqueeze(-1) * diff.unsqueeze(-2)).reshape(nf, nloc, nnei, 9)
            if do_virial:
                out["virial"] = pair_virial.sum(dim=(1, 2))
            if do_atomic_virial:
                idx9 = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 9)
                out["atom_virial"] = coord.new_zeros(nf, nloc, 9).scatter_add(
                    1, idx9, pair_virial.reshape(nf, nloc * nnei, 9)
                )
        return out
