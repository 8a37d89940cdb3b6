"""ASE calculator for dpfit and DeePMD-kit se_e2_a models, with a neighbor list reused between MD steps.

    from dpfit.calculators import DPCalculator
    atoms.calc = DPCalculator("outputs/<date>/<time>/checkpoints/last.ckpt")   # or a DeePMD-kit model.ckpt.pt
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

The neighbor list follows DeePMD's layout exactly (every neighbor within ``rcut``, per type nearest first,
truncated to ``sel``): candidates are searched once within ``rcut + skin`` and, at every call, their
distances are recomputed and those within ``rcut`` are selected and sorted. The candidates are searched
again when an atom has moved more than ``skin / 2`` since the last search, or when the cell, the atoms or
the periodicity change, so the list is always the one a fresh search would give.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from dpfit.data.index_facts import index_facts
from dpfit.data.neighbor import build_neighbor_list, deepmd_slots, distance_key, tie_key
from dpfit.inference.evaluate import inference_mode


class SkinNeighborList:
    """DeePMD neighbor list (``nlist`` (nloc, nnei), ``shift`` (nloc, nnei, 3)) kept across calls.

    :meth:`update` returns exactly what :func:`dpfit.data.neighbor.build_neighbor_list` at ``rcut`` would
    give for the current positions (same slots, same order for distinct distances), but searches
    candidates within ``rcut + skin`` only when needed; ``nbuild`` counts the searches.
    """

    def __init__(self, rcut: float, sel: list[int], skin: float = 1.0) -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.rcut = float(rcut)
        self.sel = [int(s) for s in sel]
        self.skin = float(skin)
        self.nbuild = 0
        self.n_dropped = 0
        # candidate capacity per type: sel scaled by the volume of the larger sphere, with a margin
        scale = ((self.rcut + self.skin) / self.rcut) ** 3 if self.rcut > 0 else 1.0
        self._capacity = [max(math.ceil(1.25 * s * scale), 1) for s in self.sel]
        self._ref_positions: np.ndarray | None = None
        self._ref_atype: np.ndarray | None = None
        self._ref_cell: np.ndarray | None = None

    def _needs_build(self, positions: np.ndarray, atype: np.ndarray, cell: np.ndarray | None) -> bool:
        if self._ref_positions is None or positions.shape != self._ref_positions.shape:
            return True
        if not np.array_equal(atype, self._ref_atype):
            return True
        if (cell is None) != (self._ref_cell is None) or (cell is not None and not np.array_equal(cell, self._ref_cell)):
            return True
        if len(positions) == 0:
            return False
        moved = np.sqrt(np.max(np.sum((positions - self._ref_positions) ** 2, axis=1)))
        return bool(moved > 0.5 * self.skin)

    def _build(self, positions: np.ndarray, atype: np.ndarray, cell: np.ndarray | None) -> None:
        while True:
            cand = build_neighbor_list(positions, atype, cell, self.rcut + self.skin, self._capacity, warn=False)
            if cand.n_dropped == 0:
                break
            # more candidates than slots: enlarge to the largest count seen (plus a margin) and search again
            self._capacity = [max(c, math.ceil(1.25 * m) + 1) for c, m in zip(self._capacity, cand.max_per_type)]
        self.nbuild += 1
        self._ref_positions = positions.copy()
        self._ref_atype = atype.copy()
        self._ref_cell = None if cell is None else cell.copy()
        self._cand_j = cand.nlist
        self._cand_valid = cand.nlist >= 0
        self._cand_safe_j = np.where(self._cand_valid, cand.nlist, 0)
        self._cand_shift = cand.shift
        # what does not change until the next search: each candidate's type and order key for equal distances
        self._cand_type = atype[self._cand_safe_j]
        self._cand_tie = tie_key(self._cand_safe_j.reshape(-1), cand.shift.reshape(-1, 3)).reshape(cand.nlist.shape)
        # Cartesian image offsets S h; valid until the cell changes (which triggers a new search)
        self._cand_offset = None if cell is None else cand.shift.astype(np.float64) @ cell

    def update(self, positions, atype, cell=None) -> tuple[np.ndarray, np.ndarray]:
        """(nlist, shift) of the current frame: positions (nloc, 3) Å, atype (nloc,), cell (3, 3) rows or None."""
        positions = np.ascontiguousarray(positions, dtype=np.float64)
        atype = np.asarray(atype, dtype=np.int64)
        cell = None if cell is None else np.ascontiguousarray(cell, dtype=np.float64).reshape(3, 3)
        if self._needs_build(positions, atype, cell):
            self._build(positions, atype, cell)
        diff = positions[self._cand_safe_j] - positions[:, None, :]
        if self._cand_offset is not None:
            diff += self._cand_offset
        dist2 = np.einsum("ijk,ijk->ij", diff, diff)
        center, column = np.nonzero(self._cand_valid & (dist2 < self.rcut * self.rcut))
        j = self._cand_j[center, column]
        s = self._cand_shift[center, column]
        nloc = len(positions)
        kept, slot, _ = deepmd_slots(torch.from_numpy(center), torch.from_numpy(self._cand_type[center, column]),
                                     torch.from_numpy(distance_key(np.sqrt(dist2[center, column]))),
                                     torch.from_numpy(self._cand_tie[center, column]), nloc, self.sel)
        kept, slot = kept.numpy(), slot.numpy()
        nnei = sum(self.sel)
        nlist = np.full(nloc * nnei, -1, dtype=np.int64)
        shift = np.zeros((nloc * nnei, 3), dtype=np.int64)
        nlist[slot] = j[kept]
        shift[slot] = s[kept]
        self.n_dropped = int(len(center) - len(kept))
        return nlist.reshape(nloc, nnei), shift.reshape(nloc, nnei, 3)


class DPCalculator(Calculator):
    """ASE calculator for an :class:`dpfit.model.EnergyModel`.

    ``model``: an EnergyModel, or the path of a dpfit (Lightning) checkpoint or of a DeePMD-kit
    ``model.ckpt.pt`` (loaded with :func:`dpfit.io.checkpoint.load_model`; ``precision`` overrides the
    checkpoint's). ``device``: where the model runs. ``skin`` (Å): neighbor-list skin, see
    :class:`SkinNeighborList` (0 searches at every call). ``fparam`` (numb_fparam,) and ``aparam``
    (natoms, numb_aparam) or (numb_aparam,) for all atoms: the model's frame / atomic parameters.
    ``kernels`` (``auto`` / ``on`` / ``off``; None: the model's ``kernels`` option): the compiled CPU
    kernels, for the backend selected on the model for ``device`` (:meth:`~dpfit.model.EnergyModel.select_backend`).

    Properties: ``energy`` = ``free_energy`` (eV), ``forces`` (eV/Å), ``energies`` (per atom, eV) and,
    for periodic atoms (pbc all true), ``stress`` = -virial / volume (eV/Å^3, Voigt order xx yy zz yz xz xy).
    Atom types come from the chemical symbols through the model's ``type_map``.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model,
        device: str | torch.device = "cpu",
        skin: float = 1.0,
        fparam=None,
        aparam=None,
        precision: str | None = None,
        kernels: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(model, (str, os.PathLike)):
            from dpfit.io.checkpoint import load_model

            model = load_model(model, precision=precision)
        elif precision is not None:
            raise ValueError("precision applies to a checkpoint path; convert the model object yourself")
        if hasattr(model, "property_name"):  # a PropertyModel: no energy, no forces
            raise ValueError(f"{model.property_name}: a property model has no energy or forces for an ASE calculator; "
                             "evaluate it with test.py or its frozen TorchScript (freeze.py)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.select_backend(self.device, kernels)
        self.type_map = list(model.type_map)
        self._type_index = {name: k for k, name in enumerate(self.type_map)}
        self.neighbors = SkinNeighborList(model.rcut, list(model.sel), skin)
        self.fparam = None if fparam is None else np.asarray(fparam, dtype=np.float64).reshape(-1)
        self.aparam = None if aparam is None else np.asarray(aparam, dtype=np.float64)
        self._check_params()
        self.nlist: np.ndarray | None = None
        self.shift: np.ndarray | None = None
        self._warned_dropped = False

    # ------------------------------------------------------------------ inputs
    def _check_params(self) -> None:
        nf = int(getattr(self.model.fitting, "numb_fparam", 0))
        na = int(getattr(self.model.fitting, "numb_aparam", 0))
        for key, need, value in (("fparam", nf, self.fparam), ("aparam", na, self.aparam)):
            if need and value is None:
                raise ValueError(f"the model needs {key} ({need} values{' per atom' if key == 'aparam' else ''}): "
                                 f"pass DPCalculator(..., {key}=...)")
            if not need and value is not None:
                raise ValueError(f"the model takes no {key} (numb_{key} = 0) but {key} was given")
        if self.fparam is not None and self.fparam.size != nf:
            raise ValueError(f"fparam has {self.fparam.size} values but the model expects {nf}")
        if self.aparam is not None and self.aparam.shape[-1] != na:
            raise ValueError(f"aparam has {self.aparam.shape[-1]} values per atom but the model expects {na}")

    def atom_types(self, atoms) -> np.ndarray:
        """Model type index of every atom, from its chemical symbol (ValueError for an element not in type_map)."""
        symbols = atoms.get_chemical_symbols()
        unknown = sorted(set(symbols) - set(self._type_index))
        if unknown:
            raise ValueError(f"element(s) {', '.join(unknown)} not in the model's type_map {self.type_map}")
        return np.array([self._type_index[s] for s in symbols], dtype=np.int64)

    def _aparam(self, natoms: int) -> np.ndarray:
        ap = self.aparam
        if ap.ndim == 1:
            return np.broadcast_to(ap, (natoms, ap.size))
        if ap.shape[0] != natoms:
            raise ValueError(f"aparam has {ap.shape[0]} rows but there are {natoms} atoms")
        return ap.reshape(natoms, -1)

    def _reverse_pairs(self, inputs: dict) -> torch.Tensor | None:
        descriptor = getattr(self.model, "descriptor", None)
        if not hasattr(descriptor, "reverse_pairs"):  # (the reference model)
            return None
        return descriptor.reverse_pairs(inputs["nlist"], inputs.get("shift"), inputs["atype"])

    # ------------------------------------------------------------------ ASE interface
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise ValueError(f"mixed periodicity pbc={pbc.tolist()} is not supported: use all true or all false")
        periodic = bool(pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs periodic atoms (pbc all true)")
        atype = self.atom_types(atoms)
        positions = atoms.get_positions()
        cell = np.asarray(atoms.cell.array, dtype=np.float64) if periodic else None
        if periodic and abs(np.linalg.det(cell)) < 1e-12:
            raise ValueError("periodic atoms need a cell with nonzero volume")
        self.nlist, self.shift = self.neighbors.update(positions, atype, cell)
        if self.neighbors.n_dropped and not self._warned_dropped:
            warnings.warn(
                f"{self.neighbors.n_dropped} neighbors within rcut beyond sel={list(self.model.sel)} were dropped; "
                "the model sees truncated environments",
                stacklevel=2,
            )
            self._warned_dropped = True
        dev = self.device
        natoms = len(atoms)
        inputs = {
            "coord": torch.from_numpy(positions.reshape(1, natoms, 3)),
            "atype": torch.from_numpy(atype.reshape(1, natoms)),
            "nlist": torch.from_numpy(self.nlist[None]),
        }
        if periodic:
            inputs["box"] = torch.from_numpy(cell.reshape(1, 3, 3).copy())
            inputs["shift"] = torch.from_numpy(self.shift[None])
        # the index facts next to the neighbour list, on the host (the model's step does not derive them); the
        # reverse pairs by the model's backend where it finds them itself (the op library's search)
        inputs.update(index_facts(inputs["nlist"], inputs.get("shift"), inputs["atype"], list(self.model.sel),
                                  self._reverse_pairs(inputs)))
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if self.fparam is not None:
            inputs["fparam"] = torch.from_numpy(self.fparam.reshape(1, -1).copy()).to(dev)
        if self.aparam is not None:
            inputs["aparam"] = torch.from_numpy(np.ascontiguousarray(self._aparam(natoms))[None]).to(dev)
        with inference_mode(self.model):
            out = self.model(**inputs, do_force=True, do_virial=periodic)
        res = {k: v.detach().to("cpu", torch.float64).numpy()[0] for k, v in out.items()}
        energy = float(res["energy"])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = res["atom_energy"].copy()
        self.results["forces"] = res["force"].copy()
        if periodic:
            virial = res["virial"].reshape(3, 3)
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())
