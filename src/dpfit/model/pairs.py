"""Reverse pairs in a DeePMD neighbor list: slot (i -> j, image S) and slot (j -> i, image -S).

For two atoms of the same type the embedding input s(r) is the same in both directions (the
normalisation depends on the center type only, and r on the pair), so the embedding net needs to run
once per such pair. :func:`reverse_slots` finds, for every occupied slot, the slot of its reverse pair.
"""

from __future__ import annotations

import torch


def reverse_slots(nlist: torch.Tensor, shift: torch.Tensor | None, atype: torch.Tensor,
                  slot_type: torch.Tensor) -> torch.Tensor:
    """Flat index (into nf * nloc * nnei) of each slot's reverse pair, or -1 where there is none.

    nlist (nf, nloc, nnei) with -1 padding; shift (nf, nloc, nnei, 3) integer images (None: no
    periodicity); atype (nf, nloc); slot_type (nnei,) neighbor type of each slot. Only pairs of two
    atoms of the same type are matched; a pair whose reverse was cut from the other atom's list by
    ``sel`` stays unmatched.
    """
    nf, nloc, nnei = nlist.shape
    same = (nlist >= 0) & (atype.unsqueeze(-1) == slot_type)
    flat = torch.nonzero(same.reshape(-1)).squeeze(-1)
    out = torch.full((nf * nloc * nnei,), -1, dtype=torch.long, device=nlist.device)
    if flat.numel() == 0:
        return out.reshape(nf, nloc, nnei)
    frame = flat // (nloc * nnei)
    i = (flat // nnei) % nloc
    j = nlist.reshape(-1).index_select(0, flat).long()
    if shift is not None:
        s = shift.reshape(-1, 3).index_select(0, flat).long()
        k = int(s.abs().max()) + 1
    else:
        s = torch.zeros(flat.shape[0], 3, dtype=torch.long, device=nlist.device)
        k = 1
    base = 2 * k + 1
    image = ((s[:, 0] + k) * base + (s[:, 1] + k)) * base + (s[:, 2] + k)
    mirror = ((k - s[:, 0]) * base + (k - s[:, 1])) * base + (k - s[:, 2])
    cells = base * base * base
    key = ((frame * nloc + i) * nloc + j) * cells + image
    wanted = ((frame * nloc + j) * nloc + i) * cells + mirror
    sorted_key, order = torch.sort(key)
    pos = torch.searchsorted(sorted_key, wanted).clamp(max=flat.shape[0] - 1)
    found = sorted_key.index_select(0, pos) == wanted
    partner = torch.where(found, flat.index_select(0, order.index_select(0, pos)), torch.full_like(flat, -1))
    out = out.index_put((flat,), partner)
    return out.reshape(nf, nloc, nnei)
