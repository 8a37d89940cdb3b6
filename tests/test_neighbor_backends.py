"""The optional torch-cluster neighbor backend gives the same DeePMD neighbor lists as vesin."""

from __future__ import annotations

import numpy as np
import pytest

from dpfit.data.neighbor import build_neighbor_list

pytest.importorskip("torch_cluster")


def _slots(nl):
    """Per atom and type section: the ordered (j, S) slots."""
    return [[(int(j), tuple(int(x) for x in s)) for j, s in zip(row, srow)] for row, srow in zip(nl.nlist, nl.shift)]


@pytest.mark.parametrize("case", ["triclinic_outside", "small_cell", "nopbc"])
def test_torch_cluster_equals_vesin(case):
    rng = np.random.default_rng(11)
    if case == "nopbc":
        box, coord, rcut = None, rng.uniform(0, 6, size=(20, 3)), 3.5
    elif case == "small_cell":  # cutoff larger than half the box: many images, own images included
        box = np.array([[3.0, 0.0, 0.0], [0.4, 3.2, 0.0], [0.3, -0.5, 3.1]])
        coord, rcut = rng.uniform(0, 1, size=(5, 3)) @ box, 4.0
    else:  # skewed cell, atoms far outside it
        box = np.array([[6.0, 0.0, 0.0], [2.5, 5.0, 0.0], [-1.5, 1.0, 5.5]])
        coord, rcut = rng.uniform(-1.5, 2.5, size=(24, 3)) @ box, 4.5
    atype = rng.integers(0, 2, size=len(coord))
    sel = [80, 80]
    ref = build_neighbor_list(coord, atype, box, rcut, sel, backend="vesin")
    got = build_neighbor_list(coord, atype, box, rcut, sel, backend="torch_cluster")
    assert got.n_dropped == ref.n_dropped == 0
    assert _slots(got) == _slots(ref)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="neighbor backend"):
        build_neighbor_list(np.zeros((2, 3)), np.zeros(2, dtype=int), None, 3.0, [4], backend="cell_list")
