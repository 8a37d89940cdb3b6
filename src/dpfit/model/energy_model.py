"""Deep Potential energy model, fast path: se_e2_a descriptor + energy fitting, forces and virials in
closed form (one backward pass in training). The plain reference with autograd forces: reference.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfit.model.descriptor import SeE2A
from dpfit.model.fitting import EnergyFitting
from dpfit.model.index_facts import reverse_slots
from dpfit.model.network import ResidualMLP

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

    Forces and virials come from ``dE/dd_ij``, the energy's gradient with respect to the pair vectors,
    written out in closed form (fitting-net input gradient, D = G^T G<, forward-mode tangents of the
    embedding nets, the environment matrix's Jacobian) instead of an autograd pass: it costs about one
    more forward pass, and training differentiates it with a single backward (no double backward).
    ``F = -dE/dr`` is gathered from ``dE/dd`` and ``Xi = -sum_ij d_ij (x) dE/dd_ij``. The pair term of
    the atomic virial goes to the neighbor atom j, as in DeePMD-kit.
    """

    __jit_unused_properties__ = ["dtype", "rcut", "sel", "kernels"]

    def __init__(self, type_map: list[str], descriptor: SeE2A, fitting: EnergyFitting, config: dict | None = None,
                 kernels: str = "off"):
        super().__init__()
        self.type_map = list(type_map)
        self.descriptor = descriptor
        self.fitting = fitting
        self.config = config or {}
        self.kernels = kernels

    @classmethod
    @torch.jit.ignore
    def from_config(cls, config: dict[str, Any]) -> EnergyModel:
        """From a plain dict: ``type_map``, ``descriptor``, ``fitting_net`` (DeePMD key names), ``precision``,
        ``kernels`` (``impl`` is read by :func:`dpfit.model.build_model`)."""
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(config).items()}
        dtype = DTYPES[cfg.get("precision", "float64")]
        type_map = list(cfg["type_map"])
        desc_cfg = {k: v for k, v in dict(cfg["descriptor"]).items() if k not in ("type", "_comment", "precision")}
        fit_cfg = {k: v for k, v in dict(cfg.get("fitting_net", {})).items() if k not in ("type", "_comment", "precision")}
        descriptor = SeE2A(ntypes=len(type_map), dtype=dtype, **desc_cfg)
        fitting = EnergyFitting(len(type_map), descriptor.dim_out, dtype=dtype, **fit_cfg)
        return cls(type_map, descriptor, fitting, config=cfg, kernels=cfg.get("kernels", "off"))

    @property
    def kernels(self) -> str:
        """Compiled CPU kernels (:mod:`dpfit.model.kernels`): ``auto`` (where they build and apply),
        ``on`` (fail if they cannot be built) or ``off``; ``DPFIT_KERNELS`` overrides it."""
        return self.descriptor.kernels

    @kernels.setter
    def kernels(self, mode: str) -> None:
        from dpfit.model.kernels import check_mode

        check_mode(mode, "model.kernels")
        for module in self.modules():
            if isinstance(module, (SeE2A, ResidualMLP)):
                module.kernels = mode
        self.config["kernels"] = mode

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    def _environment(
        self, coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor, shift: torch.Tensor | None,
        atype: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pair vectors, slot mask, R~ and (compiled kernels only) the Jacobian dE/dd = J dE/dR~."""
        far = self.descriptor.rcut + 1.0  # padded slots' pair vector (far, 0, 0), beyond the cutoff
        if not torch.jit.is_scripting():
            if self._compiled_geometry(coord):
                return self._geometry(coord, box, nlist, shift, atype, far)
        diff, mask = pair_vectors(coord, box, nlist, shift, far=far)
        return diff, mask, self.descriptor.normalized_env(diff, mask, atype), None

    def _pair_gradient(
        self, diff: torch.Tensor, mask: torch.Tensor, atype: torch.Tensor, grad_rr: torch.Tensor,
        jac: torch.Tensor | None,
    ) -> torch.Tensor:
        """dE/dd (nf, nloc, nnei, 3) from dE/dR~, zero on padded slots."""
        if not torch.jit.is_scripting():
            if jac is not None:
                return self._apply_jacobian(jac, grad_rr)
        return self.descriptor.env_matrix_vjp(diff, mask, atype, grad_rr) * mask.unsqueeze(-1)

    def _reverse_slots(self, nlist: torch.Tensor, shift: torch.Tensor | None, atype: torch.Tensor,
                       compiled: bool) -> torch.Tensor:
        """:func:`~dpfit.model.index_facts.reverse_slots`, by the compiled kernels when they run this pass."""
        if not torch.jit.is_scripting():
            if compiled:
                return self._reverse_slots_compiled(nlist, shift, atype)
        return reverse_slots(nlist, shift, atype, self.descriptor.slot_type)

    @torch.jit.unused
    def _reverse_slots_compiled(self, nlist: torch.Tensor, shift: torch.Tensor | None,
                                atype: torch.Tensor) -> torch.Tensor:
        from dpfit.model.kernels import ops

        return ops.reverse_slots(nlist.long(), None if shift is None else shift.long(), atype.long(),
                                 self.descriptor.sections)

    @torch.jit.unused
    def _compiled_geometry(self, coord: torch.Tensor) -> bool:
        """Whether the pair vectors, R~ and its Jacobian come from the compiled kernels: when they are
        in use (:mod:`dpfit.model.kernels`), on CPU, for coordinates that carry no gradient."""
        from dpfit.model.kernels import compiled_kernels

        return (not torch.compiler.is_compiling() and coord.device.type == "cpu"
                and coord.dtype in (torch.float32, torch.float64) and not coord.requires_grad and compiled_kernels(self.descriptor.kernels) is not None)

    @torch.jit.unused
    def _all_slots(self, coord: torch.Tensor) -> bool:
        """Whether this step embeds every neighbor slot with static shapes
        (:meth:`~dpfit.model.descriptor.SeE2A.embed_all_slots`): under ``torch.compile`` and off the CPU
        (no host synchronisation), or where ``descriptor.all_slots`` says so (True / False; None: auto).
        On CPU the default embeds occupied slots only, one row per reverse pair (less work)."""
        chosen = self.descriptor.all_slots
        if chosen is not None:
            return bool(chosen)
        return torch.compiler.is_compiling() or coord.device.type != "cpu"

    @torch.jit.unused
    def _geometry(self, coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor,
                  shift: torch.Tensor | None, atype: torch.Tensor, far: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from dpfit.model.kernels.environment import compiled_geometry

        return compiled_geometry(self.descriptor, coord, box, nlist, shift, atype, far)

    @torch.jit.unused
    def _apply_jacobian(self, jac: torch.Tensor, grad_rr: torch.Tensor) -> torch.Tensor:
        from dpfit.model.kernels import ops

        return ops.env_jacobian(jac, grad_rr, False)

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
        """coord (nf, nloc, 3) Å; atype (nf, nloc); nlist (nf, nloc, nnei); box (nf, 3, 3) rows a, b, c.
        ``partner``, ``kept``, ``type_counts``, ``type_order``: the batch's index facts as the data
        pipeline computed them (:func:`dpfit.model.index_facts.index_facts`); derived here when absent.

        Returns ``energy`` (nf,), ``atom_energy`` (nf, nloc), and on request ``force`` (nf, nloc, 3),
        ``virial`` (nf, 9) eV and ``atom_virial`` (nf, nloc, 9). With ``create_graph`` (training) the
        forces and virials keep their autograd graph; otherwise they are detached. Under ``torch.no_grad``
        no graph is built at all (the fastest inference).
        """
        dtype = self.descriptor.davg.dtype
        coord = coord.to(dtype)
        box = box.to(dtype) if box is not None else None
        shift = shift.to(dtype) if shift is not None else None
        fparam = fparam.to(dtype) if fparam is not None else None
        aparam = aparam.to(dtype) if aparam is not None else None
        need_grad = do_force or do_virial or do_atomic_virial
        desc = self.descriptor
        all_slots = False
        if not torch.jit.is_scripting():
            all_slots = self._all_slots(coord)
        diff, mask, rr, jac = self._environment(coord, box, nlist, shift, atype)
        if all_slots or not desc.reverse_pairs_share_input():
            partner = None
        elif partner is None:  # embed each same-type pair once (both directions)
            partner = self._reverse_slots(nlist, shift, atype, jac is not None)
        descriptor, g_t, g_blocks, t_blocks = desc.descriptor_from_env(
            rr, atype, mask, need_grad, partner, kept, all_slots, type_counts, type_order)
        if not need_grad:
            atom_energy = self.fitting(descriptor, atype, fparam, aparam, type_counts, type_order)
            return {"energy": atom_energy.sum(dim=-1), "atom_energy": atom_energy}
        atom_energy, grad_d = self.fitting.forward_with_grad(descriptor, atype, fparam, aparam, type_counts,
                                                             type_order)
        out = {"energy": atom_energy.sum(dim=-1), "atom_energy": atom_energy}
        g = self._pair_gradient(diff, mask, atype, desc.env_gradient(grad_d, g_t, rr, mask, g_blocks, t_blocks), jac)
        if not create_graph:
            g = g.detach()
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
