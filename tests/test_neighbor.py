"""DeePMD neighbor lists against a brute-force loop over periodic images."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from dpfit.data.neighbor import build_neighbor_list


def brute_force_pairs(coord: np.ndarray, box: np.ndarray | None, rcut: float):
    """Every (i, j, S, distance) with |r_j + S h - r_i| < rcut, (j, S) != (i, 0); plain loops over images.

    The image range covers rcut plus the spread of the fractional coordinates, so atoms far outside the
    cell are handled too.
    """
    n = len(coord)
    if box is None:
        images = np.zeros((1, 3), dtype=np.int64)
    else:
        frac = coord @ np.linalg.inv(box)
        spread = frac.max(axis=0) - frac.min(axis=0)
        volume = abs(np.linalg.det(box))
        heights = volume / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
        reach = np.ceil(rcut / heights + spread).astype(int) + 1
        axes = [np.arange(-m, m + 1) for m in reach]
        images = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    image_vectors = images @ box if box is not None else np.zeros((1, 3))
    pairs = []
    for i in range(n):
        for j in range(n):
            shifted = coord[j] + image_vectors - coord[i]
            dist = np.linalg.norm(shifted, axis=1)
            for s, d in zip(images, dist):
                if d < rcut and not (i == j and not s.any()):
                    pairs.append((i, j, tuple(int(x) for x in s), float(d)))
    return pairs


def reference_sections(pairs, atype, natoms: int, ntypes: int):
    """{(i, t): [(j, S, d), ...] sorted by distance} from brute-force pairs."""
    out = {(i, t): [] for i in range(natoms) for t in range(ntypes)}
    for i, j, s, d in pairs:
        out[(i, int(atype[j]))].append((j, s, d))
    for v in out.values():
        v.sort(key=lambda x: x[2])
    return out


def check_layout(nl, coord, atype, box, rcut, sel, ref):
    """Each type section of each row holds the nearest min(count, sel[t]) type-t neighbors, nearest first."""
    natoms = len(coord)
    nnei = sum(sel)
    assert nl.nlist.shape == (natoms, nnei)
    assert nl.shift.shape == (natoms, nnei, 3)
    assert np.issubdtype(nl.nlist.dtype, np.integer) and np.issubdtype(nl.shift.dtype, np.integer)
    offsets = np.concatenate([[0], np.cumsum(sel)])
    dropped = 0
    for i in range(natoms):
        for t in range(len(sel)):
            row = nl.nlist[i, offsets[t] : offsets[t + 1]]
            shifts = nl.shift[i, offsets[t] : offsets[t + 1]]
            filled = row >= 0
            k = int(filled.sum())
            # padding only at the end of the section
            assert np.all(filled[:k]) and not np.any(filled[k:]), (i, t, row)
            assert np.all(shifts[~filled] == 0)
            expected = ref[(i, t)]
            assert k == min(len(expected), sel[t]), (i, t, k, len(expected))
            dropped += len(expected) - k
            got = [(int(j), tuple(int(x) for x in s)) for j, s in zip(row[:k], shifts[:k])]
            # neighbor types are right and the entries are unique
            assert all(atype[j] == t for j, _ in got)
            assert len(set(got)) == k
            # same set as the brute-force nearest k (ties between distances are measure-zero here)
            assert set(got) == {(j, s) for j, s, _ in expected[:k]}, (i, t)
            # nearest first, and the slot's (j, S) reproduces the distance
            diff = coord[row[:k]] - coord[i]
            if box is not None:
                diff = diff + shifts[:k] @ box
            dist = np.linalg.norm(diff, axis=1)
            assert np.all(np.diff(dist) >= 0), (i, t, dist)
            assert np.all(dist < rcut)
            np.testing.assert_allclose(dist, [d for _, _, d in expected[:k]], rtol=1e-12)
    return dropped


def _case(coord, atype, box, rcut, ntypes, slack=2):
    """Build a reference and a sel large enough to keep everyone (with ``slack`` padded slots per type)."""
    pairs = brute_force_pairs(coord, box, rcut)
    ref = reference_sections(pairs, atype, len(coord), ntypes)
    counts = np.zeros((len(coord), ntypes), dtype=int)
    for (i, t), v in ref.items():
        counts[i, t] = len(v)
    sel = [int(c) + slack for c in counts.max(axis=0)]
    return pairs, ref, sel


def skewed_case(rng):
    box = np.array([[6.0, 0.0, 0.0], [4.7, 3.9, 0.0], [-3.8, 2.9, 4.4]])  # strongly sheared cell
    coord = rng.uniform(0, 1, size=(12, 3)) @ box
    atype = rng.integers(0, 3, size=12)
    return coord, atype, box, 4.5, 3


def small_cell_case(rng):
    # heights ~2.5-3 Å, rcut 5 Å: many images, each atom sees its own images
    box = np.array([[3.0, 0.0, 0.0], [0.6, 2.8, 0.0], [0.4, -0.7, 3.1]])
    coord = rng.uniform(0, 1, size=(3, 3)) @ box
    atype = np.array([0, 1, 1])
    return coord, atype, box, 5.0, 2


def nopbc_case(rng):
    coord = rng.uniform(-3.0, 3.0, size=(15, 3))
    atype = rng.integers(0, 2, size=15)
    return coord, atype, None, 3.0, 2


def outside_box_case(rng):
    box = np.array([[5.0, 0.0, 0.0], [1.5, 4.5, 0.0], [1.0, -1.2, 5.5]])
    frac = rng.uniform(-2.5, 3.5, size=(10, 3))  # far outside the cell, negative too
    coord = frac @ box
    atype = rng.integers(0, 2, size=10)
    return coord, atype, box, 4.0, 2


def single_atom_case(rng):
    box = np.array([[2.2, 0.0, 0.0], [0.3, 2.4, 0.0], [-0.2, 0.5, 2.6]])
    coord = np.array([[0.7, -3.1, 9.0]])
    return coord, np.array([0]), box, 4.0, 1


CASES = {
    "triclinic_skewed": skewed_case,
    "cutoff_exceeds_half_box": small_cell_case,
    "nopbc_molecule": nopbc_case,
    "atoms_outside_box": outside_box_case,
    "single_atom_own_images": single_atom_case,
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_brute_force(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    coord, atype, box, rcut, ntypes = CASES[name](rng)
    pairs, ref, sel = _case(coord, atype, box, rcut, ntypes)
    assert pairs, "the case must have neighbors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no warning
        nl = build_neighbor_list(coord, atype, box, rcut, sel)
    assert nl.n_dropped == 0
    assert check_layout(nl, coord, atype, box, rcut, sel, ref) == 0
    if name in ("cutoff_exceeds_half_box", "single_atom_own_images"):
        own = [(i, s) for i, j, s, _ in pairs if i == j]
        assert own, "own periodic images expected"
        for i, s in own:
            assert any(
                j == i and tuple(sh) == s for j, sh in zip(nl.nlist[i], nl.shift[i])
            ), (i, s)


def test_float32_coordinates_are_accepted():
    rng = np.random.default_rng(5)
    coord, atype, box, rcut, ntypes = skewed_case(rng)
    _, _, sel = _case(coord, atype, box, rcut, ntypes)
    nl64 = build_neighbor_list(coord, atype, box, rcut, sel)
    c32, b32 = coord.astype(np.float32), box.astype(np.float32)
    nl32 = build_neighbor_list(c32, atype, b32, rcut, sel)
    np.testing.assert_array_equal(nl32.nlist, nl64.nlist)
    np.testing.assert_array_equal(nl32.shift, nl64.shift)


def test_empty_neighborhood_is_all_padding():
    coord = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, -10.0, 3.0]])
    nl = build_neighbor_list(coord, np.array([0, 1, 0]), None, 3.0, [2, 3])
    assert nl.nlist.shape == (3, 5)
    assert np.all(nl.nlist == -1) and np.all(nl.shift == 0) and nl.n_dropped == 0


@pytest.mark.parametrize("name", ["triclinic_skewed", "cutoff_exceeds_half_box", "nopbc_molecule"])
def test_truncation_keeps_nearest_and_warns(name):
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    coord, atype, box, rcut, ntypes = CASES[name](rng)
    _, ref, full_sel = _case(coord, atype, box, rcut, ntypes, slack=0)
    sel = [max(1, s // 2) for s in full_sel]
    expected_dropped = sum(max(0, len(v) - sel[t]) for (i, t), v in ref.items())
    assert expected_dropped > 0
    with pytest.warns(UserWarning) as record:
        nl = build_neighbor_list(coord, atype, box, rcut, sel)
    assert nl.n_dropped == expected_dropped
    messages = [str(w.message) for w in record]
    assert any(re.search(rf"(?<![\d.]){expected_dropped}(?![\d.])", m) for m in messages), messages
    assert check_layout(nl, coord, atype, box, rcut, sel, ref) == expected_dropped
    # warn=False: silent, same result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = build_neighbor_list(coord, atype, box, rcut, sel, warn=False)
    np.testing.assert_array_equal(quiet.nlist, nl.nlist)
    np.testing.assert_array_equal(quiet.shift, nl.shift)
    assert quiet.n_dropped == expected_dropped


def test_zero_sel_for_a_type():
    """sel[t] = 0 gives an empty section: all type-t neighbors are dropped and counted."""
    rng = np.random.default_rng(3)
    coord, atype, box, rcut, ntypes = nopbc_case(rng)
    _, ref, sel = _case(coord, atype, box, rcut, ntypes)
    sel[1] = 0
    n_type1 = sum(len(v) for (i, t), v in ref.items() if t == 1)
    nl = build_neighbor_list(coord, atype, box, rcut, sel, warn=False)
    assert nl.nlist.shape == (len(coord), sel[0])
    assert nl.n_dropped == n_type1
    assert check_layout(nl, coord, atype, box, rcut, sel, ref) == n_type1


def test_water_frame_against_brute_force(shared_dir):
    """A real 192-atom water frame with the reference model's rcut and sel."""
    from dpfit.data.system import DeepmdSystem

    system = DeepmdSystem(shared_dir / "data" / "water" / "data_0", ["O", "H"])
    frame = system.frame(7)
    coord, atype, box = frame["coord"], frame["atype"], frame["box"]
    rcut, sel = 6.0, [46, 92]
    nl = build_neighbor_list(coord, atype, box, rcut, sel)
    assert nl.n_dropped == 0
    # vectorised brute force over the 27 neighboring images (the cell is > 2 rcut wide)
    assert np.all(np.abs(np.linalg.det(box)) / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
                  > rcut)
    g = np.arange(-1, 2)
    images = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    frac = coord @ np.linalg.inv(box)
    wrapped = coord - np.floor(frac) @ box
    diff = wrapped[None, :, None, :] + (images @ box)[None, None] - wrapped[:, None, None, :]
    dist = np.linalg.norm(diff, axis=-1)
    dist[np.arange(192), np.arange(192), 13] = np.inf
    counts = (dist < rcut).sum(axis=(1, 2))
    got_counts = (nl.nlist >= 0).sum(axis=1)
    np.testing.assert_array_equal(got_counts, counts)
    # every slot reproduces a distance below rcut, nearest first per section
    d = coord[np.clip(nl.nlist, 0, None)] + nl.shift @ box - coord[:, None]
    r = np.linalg.norm(d, axis=-1)
    assert np.all(r[nl.nlist >= 0] < rcut)
    for lo, hi in ((0, 46), (46, 138)):
        sec = np.where(nl.nlist[:, lo:hi] >= 0, r[:, lo:hi], 1e9)
        assert np.all(np.diff(sec, axis=1) >= 0)
    assert np.all(atype[nl.nlist[:, :46][nl.nlist[:, :46] >= 0]] == 0)
    assert np.all(atype[nl.nlist[:, 46:][nl.nlist[:, 46:] >= 0]] == 1)
