"""Pair vectors in, forces and virials out: the two ends of the model that every compute path shares.

Coordinates may be *extended* (LAMMPS ``forward_lower``): ``coord`` (nf, nall, 3) holds the nloc local
atoms first and then ghost atoms, and the neighbour list (nf, nloc, nnei) indexes all nall of them. For
dpfit's own batches nall = nloc and periodic images come from integer ``shift`` vectors instead.
"""

from __future__ import annotations

import torch


def pair_vectors(
    coord: torch.Tensor, box: torch.Tensor | None, nlist: torch.Tensor, shift: torch.Tensor | None, far: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour-minus-centre vectors (nf, nloc, nnei, 3) Å and the slot mask (False on -1 padding).

    coord (nf, nall, 3), nall >= nloc; nlist (nf, nloc, nnei) indexes coord's atoms. ``shift`` (nf, nloc,
    nnei, 3) holds integer image vectors S (with ``box``, rows a, b, c): ``d = r_j + S h - r_i``. Padded
    slots get the vector (far, 0, 0), beyond the cutoff, so every norm stays finite.
    """
    nf, nloc, nnei = nlist.shape
    mask = nlist >= 0
    idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 3)
    rj = torch.gather(coord, 1, idx).reshape(nf, nloc, nnei, 3)
    diff = rj - coord[:, :nloc].unsqueeze(2)
    if box is not None and shift is not None:
        diff = diff + torch.matmul(shift.to(box.dtype).reshape(nf, nloc * nnei, 3), box).reshape(nf, nloc, nnei, 3)
    pad = torch.zeros_like(diff)
    pad[..., 0] = far
    return torch.where(mask.unsqueeze(-1), diff, pad), mask


def forces_and_virials(
    g: torch.Tensor, diff: torch.Tensor, nlist: torch.Tensor, nall: int, do_force: bool, do_virial: bool,
    do_atomic_virial: bool,
) -> dict[str, torch.Tensor]:
    """Forces, virial and atomic virials from ``g = dE/dd`` (nf, nloc, nnei, 3), zero on padded slots.

    With ``d_ij = r_j - r_i``: ``F_i = +sum_j g_ij`` and ``F_j -= g_ij`` (force (nf, nall, 3), ghost atoms
    included); the virial ``Xi = -sum_ij g_ij (x) d_ij`` (nf, 9); each pair's term of it goes to the
    neighbour atom j in the atomic virial (nf, nall, 9), as in DeePMD-kit.
    """
    nf, nloc, nnei, _ = g.shape
    out: dict[str, torch.Tensor] = {}
    if do_force:
        idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 3)
        own = g.sum(dim=2)
        if nall > nloc:
            own = torch.nn.functional.pad(own, [0, 0, 0, nall - nloc])
        out["force"] = own - g.new_zeros(nf, nall, 3).scatter_add(1, idx, g.reshape(nf, nloc * nnei, 3))
    if do_virial:  # -sum_ij g_ij (x) d_ij as one product (no pair-by-pair 3x3 array)
        out["virial"] = -torch.bmm(g.reshape(nf, nloc * nnei, 3).transpose(1, 2), diff.reshape(nf, nloc * nnei, 3)
                                   ).reshape(nf, 9)
    if do_atomic_virial:
        pair_virial = -(g.unsqueeze(-1) * diff.unsqueeze(-2)).reshape(nf, nloc * nnei, 9)
        idx9 = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 9)
        out["atom_virial"] = g.new_zeros(nf, nall, 9).scatter_add(1, idx9, pair_virial)
    return out
