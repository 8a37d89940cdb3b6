"""Pair vectors, the normalized environment matrix and its Jacobian in one compiled pass
(``environment.cpp``), for coordinates that carry no gradient (training, inference): the same values
as :func:`~dpfit.model.energy_model.pair_vectors`, :meth:`~dpfit.model.descriptor.SeE2A.normalized_env`
and :meth:`~dpfit.model.descriptor.SeE2A.env_matrix_vjp` (masked), without their ~100 small ops.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable


def compiled_geometry(ext: ModuleType, desc, coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor,
                      shift: torch.Tensor | None, atype: torch.Tensor, far: float):
    """(diff (nf, nloc, nnei, 3), mask, rr (nf, nloc, nnei, 4), jac (nf, nloc, nnei, 3, 4)) with
    ``dE/dd = jac dE/dR~`` on occupied slots and 0 on padding."""
    periodic = box is not None and shift is not None
    empty_long = torch.empty(0, dtype=torch.long)
    keep = desc.pair_keep if desc.has_exclude else coord.new_empty(0)
    diff, rr, jac = ext.env_geometry(
        coord.contiguous(), nlist.long().contiguous(), shift.long().contiguous() if periodic else empty_long,
        box.contiguous() if periodic else coord.new_empty(0), atype.long().contiguous(), desc.davg.contiguous(),
        desc.dstd.contiguous(), keep.contiguous(), desc.slot_type.long().contiguous(), desc.rcut_smth, desc.rcut,
        float(far))
    return diff, nlist >= 0, rr, jac


class EnvJacobian(torch.autograd.Function):
    """``dE/dd = J dE/dR~`` per slot (J constant: the coordinates carry no gradient)."""

    @staticmethod
    def forward(ctx, ext: ModuleType, jac: torch.Tensor, grad_rr: torch.Tensor) -> torch.Tensor:
        ctx.ext = ext
        ctx.save_for_backward(jac)
        return ext.env_jacobian_apply(jac, grad_rr.contiguous(), False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (jac,) = ctx.saved_tensors
        return None, None, ctx.ext.env_jacobian_apply(jac, grad.contiguous(), True)
