"""What the model's compute stages hand each other: the same records for every backend.

A backend (:mod:`dpfit.model.backends`) implements the stages of :class:`~dpfit.model.EnergyModel`:

1. ``descriptor.environment(coord, box, nlist, shift, atype) -> Environment``
2. ``descriptor.embed(env, atype, tangent, facts) -> Embedding``
3. ``fitting.forward(d, ...)`` or ``fitting.forward_with_grad(d, ...) -> (atomic energies, dE/dD)``
4. ``descriptor.env_gradient(dE/dD, embedding, env, atype) -> dE/dd`` (nf, nloc, nnei, 3)
5. :func:`dpfit.model.geometry.forces_and_virials` (shared by all)

Fields a backend does not use are empty (a tensor of size 0, an empty list); none changes meaning.
"""

# (no `from __future__ import annotations`: TorchScript reads these records' annotations)
from typing import List, NamedTuple, Optional, Tuple

import torch


class IndexFacts(NamedTuple):
    """A batch's neighbour-list bookkeeping, as the data pipeline computes it
    (:func:`dpfit.data.index_facts.index_facts`); None where not given (a backend then does without or
    derives what it needs).

    ``partner`` (nf, nloc, nnei) int64: flat slot of each slot's reverse pair, or -1; ``kept``: per
    neighbour type, how many leading slots of its block are occupied in some atom; ``type_counts`` and
    ``type_order``: the atoms (flattened) grouped by type, and the stable order that sorts them (None:
    already sorted)."""

    partner: Optional[torch.Tensor]
    kept: Optional[List[int]]
    type_counts: Optional[List[int]]
    type_order: Optional[torch.Tensor]


def type_groups(atype: torch.Tensor, ntypes: int) -> Tuple[List[int], Optional[torch.Tensor]]:
    """The atoms (flattened) grouped by type, for a call without the data pipeline's index facts: the
    count of each type and the stable order that sorts them (None when already sorted). Reads back
    from the device (the pipeline's facts avoid that)."""
    flat = atype.reshape(-1)
    counts: List[int] = torch.bincount(flat, minlength=ntypes).tolist()
    if flat.numel() < 2 or bool((flat[1:] >= flat[:-1]).all()):
        return counts, None
    return counts, torch.sort(flat, stable=True)[1]


class Environment(NamedTuple):
    """The neighbourhoods: ``diff`` (nf, nloc, nnei, 3) Å pair vectors (padded slots (far, 0, 0)), ``mask``
    (nf, nloc, nnei) occupied slots, ``rr`` (nf, nloc, nnei, 4) the normalised environment matrix R~, and
    ``jacobian`` (nf, nloc, nnei, 3, 4) with dE/dd = J dE/dR~ where the backend computes it with R~ (the
    compiled kernels), else empty (the PyTorch backends apply the derivative directly)."""

    diff: torch.Tensor
    mask: torch.Tensor
    rr: torch.Tensor
    jacobian: torch.Tensor


class Embedding(NamedTuple):
    """The descriptor and what its gradient pass reuses. N = nf * nloc atoms, M = the embedding width.

    ``descriptor`` D (nf, nloc, M * axis_neuron); ``gt`` G^T / nnei (N, 4, M); per neighbour type t:
    ``values`` g and ``tangents`` dg/ds (empty list without forces), either in the slot layout (N, k_t,
    M) or as rows (R_t, M) addressed by ``rows`` (N, k_t) (empty list in the slot layout), with the
    rows' slots ``row_slots`` (order, ptr: a CSR of rows -> slots, two entries per type) and
    ``rows_grad`` (a handle on the rows' gradient, one per type) for the kernels' backward."""

    descriptor: torch.Tensor
    gt: torch.Tensor
    values: List[torch.Tensor]
    tangents: List[torch.Tensor]
    rows: List[torch.Tensor]
    row_slots: List[torch.Tensor]
    rows_grad: List[torch.Tensor]
