"""Pair vectors, the normalized environment matrix and its Jacobian in one compiled pass
(``csrc/environment.cpp``), for coordinates that carry no gradient (training, inference): the same values
as :func:`~dpfit.model.energy_model.pair_vectors`, :meth:`~dpfit.model.descriptor.SeE2A.normalized_env`
and :meth:`~dpfit.model.descriptor.SeE2A.env_matrix_vjp` (masked), without their ~100 small ops: the ops
``dpfit::env_geometry`` and ``dpfit::env_jacobian`` (dE/dd = J dE/dR~, differentiable in dE/dR~).
"""

from __future__ import annotations

import torch


def compiled_geometry(desc, coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor,
                      shift: torch.Tensor | None, atype: torch.Tensor, far: float):
    """(diff (nf, nloc, nnei, 3), mask, rr (nf, nloc, nnei, 4), jac (nf, nloc, nnei, 3, 4)) with
    ``dE/dd = jac dE/dR~`` on occupied slots and 0 on padding."""
    periodic = box is not None and shift is not None
    diff, rr, jac = torch.ops.dpfit.env_geometry(
        coord, nlist.long(), shift.long() if periodic else None, box if periodic else None, atype.long(), desc.davg,
        desc.dstd, desc.pair_keep if desc.has_exclude else None, desc.slot_type.long(), desc.rcut_smth, desc.rcut,
        float(far))
    return diff, nlist >= 0, rr, jac
