"""Neighbor lists with vesin, turned into DeePMD's padded per-type layout with integer image shifts."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import vesin


@dataclass
class NeighborList:
    """``nlist`` (nloc, nnei) int64, -1 padded; ``shift`` (nloc, nnei, 3) int image vectors S.

    Slot k of atom i holds neighbor ``nlist[i, k]`` at ``r_j + S h``; slots are grouped by neighbor
    type (``sel[t]`` each), nearest first. ``n_dropped`` counts neighbors beyond ``sel``.
    """

    nlist: np.ndarray
    shift: np.ndarray
    n_dropped: int = 0
    max_per_type: np.ndarray | None = None


BACKENDS = ("vesin", "torch_cluster")


def image_reach(box: torch.Tensor, rcut: float) -> list[int]:
    """How many periodic images along each cell vector (rows of ``box``) can hold a neighbor within
    ``rcut``: ``ceil(rcut / height)``, the height being the distance between the cell's opposite faces.
    TorchScript-compatible (used by the frozen model's own neighbor search too)."""
    volume = torch.abs(torch.linalg.det(box))
    faces = torch.linalg.cross(torch.roll(box, -1, 0), torch.roll(box, -2, 0))  # (b x c, c x a, a x b)
    heights = volume / torch.linalg.vector_norm(faces, dim=-1)
    return [int(math.ceil(rcut / float(heights[a]))) for a in range(3)]


def _pairs_torch_cluster(coord: np.ndarray, box: np.ndarray | None, rcut: float):
    """Pairs by torch-cluster's radius search on ghost-extended coordinates (GPU-capable; extra [cluster]).

    Atoms are wrapped into the cell, every image within the cutoff is added as a ghost, and image
    vectors are mapped back to the original (unwrapped) positions.
    """
    from torch_cluster import radius

    n = len(coord)
    if box is None:
        images = np.zeros((1, 3), dtype=np.int64)
        wrapped, cell_shift = coord, np.zeros((n, 3), dtype=np.int64)
    else:
        frac = coord @ np.linalg.inv(box)
        cell_shift = np.floor(frac).astype(np.int64)
        wrapped = coord - cell_shift @ box
        reach = image_reach(torch.from_numpy(np.asarray(box, dtype=np.float64)), rcut)
        grid = np.meshgrid(*[np.arange(-m, m + 1) for m in reach], indexing="ij")
        images = np.stack(grid, -1).reshape(-1, 3)
    ghosts = (wrapped[None, :, :] + (images @ box if box is not None else images)[:, None, :]).reshape(-1, 3)
    x = torch.from_numpy(ghosts)
    y = torch.from_numpy(np.ascontiguousarray(wrapped))
    centers, cols = radius(x, y, r=float(rcut), max_num_neighbors=len(ghosts))
    i = centers.numpy().astype(np.int64)
    cols = cols.numpy().astype(np.int64)
    j = cols % n
    s = images[cols // n]
    zero = int(np.nonzero((images == 0).all(-1))[0][0])
    keep = ~((j == i) & (cols // n == zero))
    i, j, s = i[keep], j[keep], s[keep]
    d = np.linalg.norm(ghosts[cols[keep]] - wrapped[i], axis=-1)
    s = s + cell_shift[i] - cell_shift[j]  # back to the unwrapped positions
    inside = d < rcut
    return i[inside], j[inside], s[inside], d[inside]


def _pairs(coord: np.ndarray, box: np.ndarray | None, rcut: float, backend: str = "vesin"):
    """All ordered pairs (i, j, S, distance) within rcut, any image, excluding i == j at S = 0."""
    if backend == "torch_cluster":
        return _pairs_torch_cluster(coord, box, rcut)
    if backend != "vesin":
        raise ValueError(f"neighbor backend must be one of {BACKENDS}, got {backend!r}")
    nl = vesin.NeighborList(cutoff=float(rcut), full_list=True)
    if box is None:
        i, j, d = nl.compute(points=coord, box=np.zeros((3, 3)), periodic=False, quantities="ijd")
        s = np.zeros((len(i), 3), dtype=np.int64)
    else:
        i, j, s, d = nl.compute(points=coord, box=box, periodic=True, quantities="ijSd")
    keep = d < rcut
    return i[keep].astype(np.int64), j[keep].astype(np.int64), np.asarray(s)[keep].astype(np.int64), d[keep]


def closest_pair(coord: np.ndarray, box: np.ndarray | None, cutoff: float) -> tuple[int, int, float] | None:
    """(i, j, distance) of the closest pair of atoms (an atom and a periodic image included) nearer than
    ``cutoff`` Å, else None: a cell-list search with that small cutoff."""
    pair = nearest_pair(coord, box, cutoff)
    return pair if pair is not None and pair[2] < cutoff else None


def nearest_pair(coord: np.ndarray, box: np.ndarray | None, cutoff: float = 0.0) -> tuple[int, int, float] | None:
    """(i, j, distance) of the closest pair of atoms (periodic images included) within the search radius
    max(``cutoff``, the atoms' mean spacing), else None: one cell-list search of about one cell per atom."""
    coord = np.ascontiguousarray(coord, dtype=np.float64)
    box = None if box is None else np.ascontiguousarray(box, dtype=np.float64).reshape(3, 3)
    # search at least as far as the mean spacing of the atoms: the cell list then has about one cell per
    # atom (a 0.1 Å cutoff would make ~1000 cells per Å^3 and cost milliseconds)
    if box is not None:
        volume = abs(float(np.linalg.det(box)))
    else:
        volume = float(np.prod(np.ptp(coord, axis=0) + 1.0))
    search = max(float(cutoff), (volume / max(len(coord), 1)) ** (1 / 3))
    if box is not None:
        heights = volume / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
        search = min(search, max(float(cutoff), 0.49 * float(heights.min())))
    i, j, _, d = _pairs(coord, box, search)
    if not len(d):
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def distance_key(d: np.ndarray) -> np.ndarray:
    """Distances in units of 1e-10 Å (int64), the sort key of :func:`deepmd_slots` on the host (the
    neighbour search backends agree to that precision, so equal distances stay equal)."""
    return np.rint(d * 1e10).astype(np.int64)


def tie_key(j: np.ndarray, s: np.ndarray) -> np.ndarray:
    """An integer key (npairs,) ordering equal distances by neighbour index, then image S (npairs, 3), so
    that every search backend gives the same list."""
    k = int(np.abs(s).max()) + 1 if len(s) else 1
    b = 2 * k + 1
    return ((j * b + s[:, 0] + k) * b + s[:, 1] + k) * b + s[:, 2] + k


def deepmd_slots(center: torch.Tensor, ntype: torch.Tensor, dist: torch.Tensor, tie: torch.Tensor, nloc: int,
                 sel: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeePMD's neighbour-list layout, the one place it is written (data, exports, ASE, LAMMPS): each
    centre's neighbours grouped by type (``sel[t]`` slots each, type 0's first), nearest first, equal
    distances in the order of ``tie``, truncated to ``sel[t]``. TorchScript-compatible.

    Candidate pairs, all (npairs,): ``center`` in [0, nloc), ``ntype`` the neighbour's type, ``dist`` the
    sort key (the distance; or an int64 key such as :func:`distance_key`'s), ``tie`` an integer key for
    equal distances. Returns the candidates kept (indices into the pairs), their flat slots
    ``center * sum(sel) + slot``, and the count of candidates per (centre, type), (nloc * ntypes,),
    truncated or not.
    """
    ntypes = len(sel)
    device = center.device
    order = torch.sort(tie, stable=True)[1]
    group = center * ntypes + ntype
    packed = not dist.is_floating_point() and nloc * ntypes < 2**23
    if packed and dist.numel() > 0:
        packed = int(dist.min()) >= 0 and int(dist.max()) < 2**40
    if packed:  # (centre, type) then distance in one int64 key: one sort instead of two
        key = (group * 2**40 + dist).index_select(0, order)
        order = order.index_select(0, torch.sort(key, stable=True)[1])
    else:
        order = order.index_select(0, torch.sort(dist.index_select(0, order), stable=True)[1])
        order = order.index_select(0, torch.sort(group.index_select(0, order), stable=True)[1])
    group = group.index_select(0, order)
    counts = torch.bincount(group, minlength=nloc * ntypes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.shape[0], device=device) - starts.index_select(0, group)
    sel_t = torch.tensor(sel, dtype=torch.long, device=device)
    offsets = torch.cumsum(sel_t, 0) - sel_t
    types = ntype.index_select(0, order)
    ok = rank < sel_t.index_select(0, types)
    slot = center.index_select(0, order) * int(sum(sel)) + offsets.index_select(0, types) + rank
    return order[ok], slot[ok], counts


def build_neighbor_list(
    coord: np.ndarray,
    atype: np.ndarray,
    box: np.ndarray | None,
    rcut: float,
    sel: list[int],
    warn: bool = True,
    backend: str = "vesin",
) -> NeighborList:
    """DeePMD neighbor list of one frame. coord (nloc, 3) Å, box (3, 3) rows or None (non-periodic).

    ``backend``: ``vesin`` (default) or ``torch_cluster`` (radius search on ghost atoms; extra [cluster]).
    """
    coord = np.ascontiguousarray(coord, dtype=np.float64)
    box = None if box is None else np.ascontiguousarray(box, dtype=np.float64).reshape(3, 3)
    nloc = coord.shape[0]
    ntypes = len(sel)
    i, j, s, d = _pairs(coord, box, rcut, backend)
    kept, slot, counts = deepmd_slots(torch.from_numpy(i), torch.from_numpy(np.asarray(atype, dtype=np.int64)[j]),
                                      torch.from_numpy(distance_key(d)), torch.from_numpy(tie_key(j, s)), nloc,
                                      list(sel))
    kept, slot, counts = kept.numpy(), slot.numpy(), counts.numpy()
    nlist = np.full(nloc * int(sum(sel)), -1, dtype=np.int64)
    shift = np.zeros((nloc * int(sum(sel)), 3), dtype=np.int64)
    nlist[slot] = j[kept]
    shift[slot] = s[kept]
    nlist = nlist.reshape(nloc, -1)
    shift = shift.reshape(nloc, -1, 3)
    n_dropped = int(len(i) - len(kept))
    max_per_type = counts.reshape(nloc, ntypes).max(axis=0) if nloc else np.zeros(ntypes, dtype=np.int64)
    if n_dropped and warn:
        warnings.warn(
            f"{n_dropped} neighbors beyond sel={list(sel)} were dropped (max neighbors per type "
            f"{max_per_type.tolist()}); increase sel to keep them",
            stacklevel=2,
        )
    return NeighborList(nlist, shift, n_dropped, max_per_type)
