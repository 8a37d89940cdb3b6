"""Deep Potential energy model, fast path: se_e2_a descriptor + energy fitting, forces and virials in
closed form (one backward pass in training). The plain reference with autograd forces: reference.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfit.model.backends import BackendChoice, check_kernels_option
from dpfit.model.descriptor import SeE2A
from dpfit.model.fitting import EnergyFitting
from dpfit.model.geometry import forces_and_virials
from dpfit.model.stages import IndexFacts

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class EnergyModel(BackendChoice, nn.Module):
    """Energy, atomic energies, forces, virial and atomic virial of one or more frames of one system.

    Forces and virials come from ``dE/dd_ij``, the energy's gradient with respect to the pair vectors,
    written out in closed form (fitting-net input gradient, D = G^T G<, forward-mode tangents of the
    embedding nets, the environment matrix's Jacobian) instead of an autograd pass: it costs about one
    more forward pass, and training differentiates it with a single backward (no double backward).
    ``F = -dE/dr`` is gathered from ``dE/dd`` and ``Xi = -sum_ij d_ij (x) dE/dd_ij``
    (:func:`~dpfit.model.geometry.forces_and_virials`).

    The stages run on a backend (:mod:`dpfit.model.backends`: the compiled kernels, or PyTorch in the
    compact or the static layout), chosen once by :meth:`select_backend` for the device the model runs on.
    """

    __jit_unused_properties__ = ["dtype", "rcut", "sel", "kernels", "backend"]

    def __init__(self, type_map: list[str], descriptor: SeE2A, fitting: EnergyFitting, config: dict | None = None):
        super().__init__()
        self.type_map = list(type_map)
        self.descriptor = descriptor
        self.fitting = fitting
        self.config = config or {}

    @classmethod
    @torch.jit.ignore
    def from_config(cls, config: dict[str, Any], device: torch.device | str | None = "cpu") -> EnergyModel:
        """From a plain dict: ``type_map``, ``descriptor``, ``fitting_net`` (DeePMD key names), ``precision``,
        ``kernels`` (``impl`` is read by :func:`dpfit.model.build_model`). The backend is selected for
        ``device`` (:meth:`select_backend`); None: a PyTorch backend for now (select it when the device is
        known, e.g. in Lightning's ``setup``, so that a GPU run never builds the CPU kernels)."""
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(config).items()}
        dtype = DTYPES[cfg.get("precision", "float64")]
        type_map = list(cfg["type_map"])
        check_kernels_option(cfg.get("kernels", "off"))
        desc_cfg = {k: v for k, v in dict(cfg["descriptor"]).items() if k not in ("type", "_comment", "precision")}
        fit_cfg = {k: v for k, v in dict(cfg.get("fitting_net", {})).items() if k not in ("type", "_comment", "precision")}
        descriptor = SeE2A(ntypes=len(type_map), dtype=dtype, **desc_cfg)
        fitting = EnergyFitting(len(type_map), descriptor.dim_out, dtype=dtype, **fit_cfg)
        model = cls(type_map, descriptor, fitting, config=cfg)
        if device is None:
            model.use_backend("compact")
        else:
            model.select_backend(device)
        return model

    @torch.jit.ignore
    def compress(self, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0):
        """Replace the embedding nets by tables of quintic pieces (:mod:`dpfit.model.tabulation`, DeePMD-kit's
        ``dp compress``), in place, for inference: every backend then evaluates g and dg/ds from the tables
        (no matrix products); the model is put in eval mode and refuses ``train()``. ``min_nbor_dist`` (Å):
        the training data's smallest neighbour distance, where the accurate part of the tables ends;
        ``step``: the pieces' width in the nets' input s; ``extrapolate``: the coarse part reaches
        ``extrapolate`` times the largest w(r)/r. Returns the :class:`~dpfit.model.tabulation.Compression`
        (tables, measured error bound)."""
        from dpfit.model.tabulation import compress

        self.eval()
        return compress(self.descriptor, min_nbor_dist, step, extrapolate)

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

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
        partner: torch.Tensor | None = None,
        kept: list[int] | None = None,
        type_counts: list[int] | None = None,
        type_order: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """coord (nf, nloc, 3) Å; atype (nf, nloc); nlist (nf, nloc, nnei); box (nf, 3, 3) rows a, b, c and
        shift (nf, nloc, nnei, 3) integer images (periodic only). ``coord`` may also be extended, (nf, nall,
        3) with ghost atoms after the nloc local ones that nlist indexes (LAMMPS; no box/shift then): forces
        and atomic virials are then (nf, nall, ...). ``partner``, ``kept``, ``type_counts``, ``type_order``:
        the batch's index facts as the data pipeline computed them (:class:`~dpfit.model.stages.IndexFacts`);
        a backend does without or derives what it needs when absent.

        Returns ``energy`` (nf,), ``atom_energy`` (nf, nloc), and on request ``force`` (nf, nloc, 3),
        ``virial`` (nf, 9) eV and ``atom_virial`` (nf, nloc, 9). With ``create_graph`` (training) the
        forces and virials keep their autograd graph; otherwise they are detached. Under ``torch.no_grad``
        no graph is built at all (the fastest inference).
        """
        dtype = self.descriptor.davg.dtype
        coord = coord.to(dtype)
        box = box.to(dtype) if box is not None else None
        fparam = fparam.to(dtype) if fparam is not None else None
        aparam = aparam.to(dtype) if aparam is not None else None
        need_grad = do_force or do_virial or do_atomic_virial
        facts = IndexFacts(partner, kept, type_counts, type_order)
        env = self.descriptor.environment(coord, box, nlist, shift, atype)
        emb = self.descriptor.embed(env, atype, need_grad, facts)
        if not need_grad:
            atom_energy = self.fitting(emb.descriptor, atype, fparam, aparam, type_counts, type_order)
            return {"energy": atom_energy.sum(dim=-1), "atom_energy": atom_energy}
        atom_energy, grad_d = self.fitting.forward_with_grad(emb.descriptor, atype, fparam, aparam, type_counts,
                                                             type_order)
        out = {"energy": atom_energy.sum(dim=-1), "atom_energy": atom_energy}
        g = self.descriptor.env_gradient(grad_d, emb, env, atype)
        if not create_graph:
            g = g.detach()
        out.update(forces_and_virials(g, env.diff, nlist, coord.shape[1], do_force, do_virial, do_atomic_virial))
        return out
