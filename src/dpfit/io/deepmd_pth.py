"""A TorchScript ``.pth`` that DeePMD-kit's C++ library (LAMMPS ``pair_style deepmd``) loads directly.

It has the interface DeePMD-kit 3.x's ``DeepPotPT`` calls: ``has_message_passing``, ``get_rcut``,
``get_ntypes``, ``get_dim_fparam``, ``get_dim_aparam``, ``is_aparam_nall``, ``get_type_map`` (and a
few more that DeePMD's Python reads), ``forward`` and ``forward_lower``. Only torch is needed to write
or run it, no DeePMD-kit Python.

Shapes (nf frames, nloc local atoms, nall = local + ghost atoms, nq/np fparam/aparam widths)::

    forward(coord (nf, nloc*3) or (nf, nloc, 3), atype (nf, nloc) int64, box (nf, 9) or None,
            fparam (nf, nq) or None, aparam (nf, nloc, np) or None, do_atomic_virial)
      -> energy (nf, 1) float64, force (nf, nloc, 3), virial (nf, 9), atom_energy (nf, nloc, 1),
         atom_virial (nf, nloc, 9)
    forward_lower(extended_coord (nf, nall*3), extended_atype (nf, nall), nlist (nf, nloc, n) int64,
                  mapping (nf, nall) or None, fparam, aparam, do_atomic_virial, comm_dict=None)
      -> energy (nf, 1) float64, extended_force (nf, nall, 3), virial (nf, 9),
         atom_energy (nf, nloc, 1), extended_virial (nf, nall, 9)

Outputs other than ``energy`` come back in the coordinates' dtype. ``forward_lower`` takes a neighbour
list as LAMMPS hands it over: unsorted, padded with -1, built with the skin (neighbours beyond rcut); it
keeps the neighbours within rcut, sorted by distance per type and truncated/padded to ``sel``, as
``forward`` (and dpfit's data pipeline) builds them. Forces are ``-dE/dr`` of every extended atom;
DeePMD-kit folds ghost forces back onto their owners (LAMMPS reverse communication).
"""

# (no `from __future__ import annotations`: TorchScript reads this module's annotations)
import copy
import json
from pathlib import Path

import torch
from torch import nn

from dpfit.io.deepmd_export import deepmd_model_params, merge_source_params
from dpfit.io.export import torch_neighbor_list
from dpfit.model import EnergyModel


class DeepmdFrozenModel(nn.Module):
    """dpfit's model behind DeePMD-kit's frozen-model interface (see the module docstring)."""

    type_map: list[str]
    sel: list[int]

    def __init__(self, model: EnergyModel, model_def_script: str) -> None:
        super().__init__()
        model = copy.deepcopy(model).cpu().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.type_map = list(model.type_map)
        self.rcut = float(model.descriptor.rcut)
        self.sel = [int(s) for s in model.descriptor.sel]
        self.ntypes = len(self.type_map)
        self.dim_fparam = int(model.fitting.numb_fparam)
        self.dim_aparam = int(model.fitting.numb_aparam)
        self.model_def_script = model_def_script

    @torch.jit.export
    def has_message_passing(self) -> bool:
        return False

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    @torch.jit.export
    def get_ntypes(self) -> int:
        return self.ntypes

    @torch.jit.export
    def get_type_map(self) -> list[str]:
        return self.type_map

    @torch.jit.export
    def get_dim_fparam(self) -> int:
        return self.dim_fparam

    @torch.jit.export
    def get_dim_aparam(self) -> int:
        return self.dim_aparam

    @torch.jit.export
    def is_aparam_nall(self) -> bool:
        return False

    @torch.jit.export
    def has_default_fparam(self) -> bool:
        return False

    @torch.jit.export
    def get_sel(self) -> list[int]:
        return self.sel

    @torch.jit.export
    def get_nsel(self) -> int:
        return sum(self.sel)

    @torch.jit.export
    def get_nnei(self) -> int:
        return sum(self.sel)

    @torch.jit.export
    def get_sel_type(self) -> list[int]:
        return []

    @torch.jit.export
    def mixed_types(self) -> bool:
        return False

    @torch.jit.export
    def use_self_built_nlist(self) -> bool:
        """DeePMD-kit's Python then calls ``forward`` (which builds the list), not its own lower path."""
        return True

    @torch.jit.export
    def model_output_type(self) -> list[str]:
        return ["energy"]

    @torch.jit.export
    def get_model_def_script(self) -> str:
        return self.model_def_script

    @torch.jit.export
    def format_nlist(self, extended_coord: torch.Tensor, extended_atype: torch.Tensor,
                     nlist: torch.Tensor) -> torch.Tensor:
        """(nf, nloc, sum(sel)): per type t, its neighbours closer than rcut, nearest first, at most
        sel[t], then -1. Accepts any order, -1 anywhere, neighbours beyond rcut, any width."""
        nf, nloc, nn = nlist.shape
        coord = extended_coord.reshape(nf, -1, 3)
        real = nlist >= 0
        idx = torch.where(real, nlist, torch.zeros_like(nlist))
        rj = torch.gather(coord, 1, idx.reshape(nf, nloc * nn, 1).expand(nf, nloc * nn, 3)).reshape(nf, nloc, nn, 3)
        dist = torch.linalg.vector_norm(rj - coord[:, :nloc].unsqueeze(2), dim=-1)
        ntype = torch.gather(extended_atype, 1, idx.reshape(nf, nloc * nn)).reshape(nf, nloc, nn)
        keep = real & (dist < self.rcut)
        inf = torch.full_like(dist, float("inf"))
        parts: list[torch.Tensor] = []
        for t, s in enumerate(self.sel):
            k = min(s, nn)
            key = torch.where(keep & (ntype == t), dist, inf)
            vals, order = torch.topk(key, k, dim=-1, largest=False, sorted=True)
            part = torch.where(torch.isfinite(vals), torch.gather(nlist, 2, order), torch.full_like(order, -1))
            if k < s:
                part = torch.cat([part, torch.full((nf, nloc, s - k), -1, dtype=part.dtype, device=part.device)], -1)
            parts.append(part)
        return torch.cat(parts, -1)

    @torch.jit.export
    def forward_lower(
        self,
        extended_coord: torch.Tensor,
        extended_atype: torch.Tensor,
        nlist: torch.Tensor,
        mapping: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        do_atomic_virial: bool = False,
        comm_dict: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        dtype = self.model.descriptor.davg.dtype
        in_dtype = extended_coord.dtype
        nf, nall = extended_atype.shape
        coord = extended_coord.reshape(nf, nall, 3).to(dtype)
        nloc = nlist.shape[1]
        nl = self.format_nlist(coord, extended_atype, nlist.to(torch.long))
        nnei = nl.shape[2]
        atype = extended_atype[:, :nloc]
        mask = nl >= 0
        idx = torch.where(mask, nl, torch.zeros_like(nl)).reshape(nf, nloc * nnei, 1)
        rj = torch.gather(coord, 1, idx.expand(nf, nloc * nnei, 3)).reshape(nf, nloc, nnei, 3)
        diff = rj - coord[:, :nloc].unsqueeze(2)
        pad = torch.zeros_like(diff)
        pad[..., 0] = self.rcut + 1.0  # beyond the cutoff: finite norms on padded slots
        diff = torch.where(mask.unsqueeze(-1), diff, pad).detach().requires_grad_(True)
        fp = fparam.to(dtype) if fparam is not None else None
        ap = aparam.to(dtype) if aparam is not None else None
        # (autograd must be on, as for DeePMD-kit's own models: its C++ and Python callers leave it on)
        descriptor = self.model.descriptor(diff, mask, atype)
        atom_energy = self.model.fitting(descriptor, atype, fp, ap)
        grads = torch.autograd.grad([atom_energy.sum()], [diff])
        g = grads[0]
        assert g is not None
        g = (g * mask.unsqueeze(-1)).detach()
        atom_energy = atom_energy.detach()
        diff = diff.detach()
        # d_ij = r_j - r_i: F_i = +sum_j dE/dd_ij, F_j = -dE/dd_ij
        force = torch.zeros(nf, nall, 3, dtype=dtype, device=coord.device)
        force = force.scatter_add(1, idx.expand(nf, nloc * nnei, 3), -g.reshape(nf, nloc * nnei, 3))
        force[:, :nloc] += g.sum(dim=2)
        # each pair's virial -dE/dd (x) d goes to the neighbour atom, as in DeePMD-kit
        pair_virial = -(g.unsqueeze(-1) * diff.unsqueeze(-2)).reshape(nf, nloc * nnei, 9)
        virial = pair_virial.sum(dim=1)
        out = {
            "energy": atom_energy.sum(dim=-1, keepdim=True).to(torch.float64),
            "atom_energy": atom_energy.unsqueeze(-1).to(in_dtype),
            "extended_force": force.to(in_dtype),
            "virial": virial.to(in_dtype),
        }
        if do_atomic_virial:
            ext_virial = torch.zeros(nf, nall, 9, dtype=dtype, device=coord.device)
            out["extended_virial"] = ext_virial.scatter_add(1, idx.expand(nf, nloc * nnei, 9), pair_virial).to(in_dtype)
        return out

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        do_atomic_virial: bool = False,
        charge_spin: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(``charge_spin``: accepted for DeePMD-kit's Python caller, unused: se_e2_a has no such input.)"""
        dtype = self.model.descriptor.davg.dtype
        in_dtype = coord.dtype
        nf, nloc = atype.shape
        coord = coord.reshape(nf, nloc, 3).to(dtype)
        boxes = box.reshape(nf, 3, 3).to(dtype) if box is not None else None
        coords: list[torch.Tensor] = []
        nlists: list[torch.Tensor] = []
        shifts: list[torch.Tensor] = []
        for f in range(nf):
            frame_box = boxes[f] if boxes is not None else None
            wrapped, nl, shift = torch_neighbor_list(coord[f], atype[f], frame_box, self.rcut, self.sel)
            coords.append(wrapped)
            nlists.append(nl)
            shifts.append(shift)
        out = self.model(
            torch.stack(coords), atype, torch.stack(nlists), boxes,
            torch.stack(shifts) if boxes is not None else None,
            fparam.reshape(nf, -1).to(dtype) if fparam is not None else None,
            aparam.reshape(nf, nloc, -1).to(dtype) if aparam is not None else None,
            True, True, True, False,
        )
        return {
            "energy": out["energy"].reshape(nf, 1).to(torch.float64),
            "atom_energy": out["atom_energy"].unsqueeze(-1).to(in_dtype),
            "force": out["force"].to(in_dtype),
            "virial": out["virial"].to(in_dtype),
            "atom_virial": out["atom_virial"].to(in_dtype),
        }


def freeze_for_deepmd(model: EnergyModel, output: str | Path, overwrite: bool = False,
                      source_params: dict | None = None) -> Path:
    """Script ``model`` as :class:`DeepmdFrozenModel` and save it; refuses an existing file unless ``overwrite``.

    ``source_params``: a DeePMD source checkpoint's ``model_params`` (kept in ``get_model_def_script``).
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; choose another output or pass overwrite=true")
    params = deepmd_model_params(model)  # also refuses a model DeePMD-kit cannot represent
    if source_params:
        params = merge_source_params(params, source_params)
    scripted = torch.jit.script(DeepmdFrozenModel(model, json.dumps(params)))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.jit.save(scripted, str(tmp))
    tmp.replace(output)
    return output
