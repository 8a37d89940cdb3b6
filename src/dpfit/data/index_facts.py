"""Index facts of a neighbor list that the fast model uses: reverse pairs, occupied slots, atoms by type.

They depend on the neighbor list and atom types only, so the data pipeline computes them once per batch
(:func:`index_facts`, in DataLoader collate) and the model's step takes them as given.

Reverse pairs: slot (i -> j, image S) and slot (j -> i, image -S). For two atoms of the same type the
embedding input s(r) is the same in both directions (the normalisation depends on the center type only,
and r on the pair), so the embedding net needs to run once per such pair. :func:`reverse_slots` finds,
for every occupied slot, the slot of its reverse pair.
"""

from __future__ import annotations

import torch


def reverse_slots(nlist: torch.Tensor, shift: torch.Tensor | None, atype: torch.Tensor,
                  slot_type: torch.Tensor) -> torch.Tensor:
    """Flat index (into nf * nloc * nnei) of each slot's reverse pair, or -1 where there is none.

    nlist (nf, nloc, nnei) with -1 padding; shift (nf, nloc, nnei, 3) integer images (None: no
    periodicity); atype (nf, nloc); slot_type (nnei,) neighbor type of each slot. Only pairs of two
    atoms of the same type are matched; a pair whose reverse was cut from the other atom's list by
    ``sel`` stays unmatched. With extended atoms (LAMMPS: nlist indexes nall >= nloc atoms, ghosts after
    the local ones) only pairs of two local atoms are matched. TorchScript-compatible (frozen files).
    """
    nf, nloc, nnei = nlist.shape
    same = (nlist >= 0) & (nlist < nloc) & (atype.unsqueeze(-1) == slot_type)
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
    out = out.index_put([flat], partner)
    return out.reshape(nf, nloc, nnei)


def kept_slots(nlist: torch.Tensor, sections: list[int]) -> list[int]:
    """Per neighbor type t: how many leading slots of its block [sections[t], sections[t+1]) hold a
    neighbor in some atom of the batch (DeePMD's lists are nearest first, padded at the end)."""
    occupied = (nlist.reshape(-1, nlist.shape[-1]) >= 0).any(0)
    kept: list[int] = []
    for lo, hi in zip(sections[:-1], sections[1:]):
        used = torch.nonzero(occupied[lo:hi])
        kept.append(int(used.max()) + 1 if used.numel() else 0)
    return kept


def type_split(atype: torch.Tensor, ntypes: int) -> tuple[list[int], torch.Tensor | None]:
    """The atoms of a batch (flattened, nf * nloc) grouped by type: the count of each type and the
    stable order that sorts them by type (None when they already are, as in DeePMD's data)."""
    flat = atype.reshape(-1)
    counts = torch.bincount(flat, minlength=ntypes).tolist()
    if flat.numel() < 2 or bool((flat[1:] >= flat[:-1]).all()):
        return counts, None
    return counts, torch.sort(flat, stable=True)[1]


def index_facts(nlist: torch.Tensor, shift: torch.Tensor | None, atype: torch.Tensor, sel: list[int],
                partner: torch.Tensor | None = None) -> dict:
    """The index facts of a batch, as keyword arguments of :meth:`dpfit.model.EnergyModel.forward`
    (:class:`dpfit.model.stages.IndexFacts`): ``partner`` (nf, nloc, nnei) reverse-pair slots
    (:func:`reverse_slots`, unless given), ``kept`` (per type, :func:`kept_slots`), ``type_counts`` and
    ``type_order`` (:func:`type_split`). Computed on the host next to the neighbour list (DataLoader
    collate, test.py, the ASE calculator), so that the model's step needs no host synchronisation for them."""
    ntypes = len(sel)
    sections = [sum(sel[:t]) for t in range(ntypes + 1)]
    counts, order = type_split(atype, ntypes)
    slot_type = torch.repeat_interleave(torch.arange(ntypes, device=nlist.device), torch.tensor(sel, device=nlist.device))
    if partner is None:
        partner = reverse_slots(nlist, shift, atype, slot_type)
    facts = {"partner": partner, "kept": kept_slots(nlist, sections), "type_counts": counts}
    if order is not None:
        facts["type_order"] = order
    return facts
