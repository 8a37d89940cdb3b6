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
import json
from pathlib import Path

import torch
from torch import nn

from dpfit.data.neighbor import deepmd_slots
from dpfit.io.deepmd_export import deepmd_model_params, merge_source_params
from dpfit.io.export import DevicePaths, torch_neighbor_list
from dpfit.model import EnergyModel


class DeepmdFrozenModel(nn.Module):
    """dpfit's model behind DeePMD-kit's frozen-model interface (see the module docstring)."""

    type_map: list[str]
    sel: list[int]

    def __init__(self, model: EnergyModel, model_def_script: str, kernels: bool = False) -> None:
        super().__init__()
        self.model = DevicePaths(model, kernels)
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
        sel[t], then -1 (:func:`~dpfit.data.neighbor.deepmd_slots`). Accepts any order, -1 anywhere,
        neighbours beyond rcut, any width."""
        nf, nloc, nn = nlist.shape
        coord = extended_coord.reshape(nf, -1, 3)
        nall = coord.shape[1]
        real = nlist >= 0
        idx = torch.where(real, nlist, torch.zeros_like(nlist))
        rj = torch.gather(coord, 1, idx.reshape(nf, nloc * nn, 1).expand(nf, nloc * nn, 3)).reshape(nf, nloc, nn, 3)
        dist = torch.linalg.vector_norm(rj - coord[:, :nloc].unsqueeze(2), dim=-1)
        pairs = torch.nonzero((real & (dist < self.rcut)).reshape(nf * nloc, nn))
        center, column = pairs[:, 0], pairs[:, 1]
        flat = center * nn + column
        neighbour = nlist.reshape(-1).index_select(0, flat)
        frame = torch.div(center, nloc, rounding_mode="floor")
        ntype = extended_atype.reshape(-1).index_select(0, frame * nall + neighbour)
        distance = torch.round(dist.reshape(-1).index_select(0, flat) * 1e10).long()  # (ties at 1e-10 Å, one sort)
        kept, slot, _ = deepmd_slots(center, ntype, distance, neighbour, nf * nloc, self.sel)
        out = torch.full((nf * nloc * sum(self.sel),), -1, dtype=torch.long, device=nlist.device)
        out[slot] = neighbour.index_select(0, kept)
        return out.reshape(nf, nloc, -1)

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
        dtype = self.model.cpu_model.descriptor.davg.dtype
        in_dtype = extended_coord.dtype
        nf, nall = extended_atype.shape
        coord = extended_coord.reshape(nf, nall, 3).to(dtype)
        nloc = nlist.shape[1]
        nl = self.format_nlist(coord, extended_atype, nlist.to(torch.long))
        out = self.model(
            coord, extended_atype[:, :nloc], nl, None, None,
            fparam.reshape(nf, -1).to(dtype) if fparam is not None else None,
            aparam.reshape(nf, nloc, -1).to(dtype) if aparam is not None else None,
            do_atomic_virial,
        )
        result = {
            "energy": out["energy"].reshape(nf, 1).to(torch.float64),
            "atom_energy": out["atom_energy"].unsqueeze(-1).to(in_dtype),
            "extended_force": out["force"].to(in_dtype),
            "virial": out["virial"].to(in_dtype),
        }
        if do_atomic_virial:
            result["extended_virial"] = out["atom_virial"].to(in_dtype)
        return result

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
        dtype = self.model.cpu_model.descriptor.davg.dtype
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
            True,
        )
        return {
            "energy": out["energy"].reshape(nf, 1).to(torch.float64),
            "atom_energy": out["atom_energy"].unsqueeze(-1).to(in_dtype),
            "force": out["force"].to(in_dtype),
            "virial": out["virial"].to(in_dtype),
            "atom_virial": out["atom_virial"].to(in_dtype),
        }


def freeze_for_deepmd(model: EnergyModel, output: str | Path, overwrite: bool = False,
                      source_params: dict | None = None, kernels: bool = False, params: dict | None = None) -> Path:
    """Script ``model`` as :class:`DeepmdFrozenModel` and save it; refuses an existing file unless ``overwrite``.

    ``source_params``: a DeePMD source checkpoint's ``model_params`` (kept in ``get_model_def_script``).
    ``kernels``: the CPU path on dpfit's op library (LAMMPS loads it from ``DP_PLUGIN_PATH``). ``params``:
    the model's DeePMD ``model_params`` when given (a compressed model's: those of the model it was
    compressed from, :func:`~dpfit.io.deepmd_export.deepmd_model_params`), else read from ``model``.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; choose another output or pass overwrite=true")
    if params is None:
        params = deepmd_model_params(model)  # also refuses a model DeePMD-kit cannot represent
    if source_params:
        params = merge_source_params(params, source_params)
    scripted = torch.jit.script(DeepmdFrozenModel(model, json.dumps(params), kernels))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.jit.save(scripted, str(tmp))
    tmp.replace(output)
    return output
