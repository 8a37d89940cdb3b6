"""Embedding-row shortcuts of the compact layout (dpfit.model.compact_layout, the CPU default without the
kernels): each same-type pair embedded once (reverse slots, from the data pipeline's index facts), and
neighbor slots that are padding for every atom of the batch folded into a per-type constant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfit.data.index_facts import reverse_slots
from dpfit.data.neighbor import build_neighbor_list

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _lists(frames, rcut, sel):
    nls = [build_neighbor_list(c, a, b, rcut, sel, warn=False) for c, a, b in frames]
    nlist = torch.from_numpy(np.stack([nl.nlist for nl in nls]))
    shift = torch.from_numpy(np.stack([nl.shift for nl in nls])) if frames[0][2] is not None else None
    atype = torch.from_numpy(np.stack([a for _, a, _ in frames]))
    slot_type = torch.repeat_interleave(torch.arange(len(sel)), torch.tensor(sel))
    return nlist, shift, atype, slot_type


def _brute_force(nlist, shift, atype, slot_type):
    nf, nloc, nnei = nlist.shape
    where = {}
    for f in range(nf):
        for i in range(nloc):
            for k in range(nnei):
                j = int(nlist[f, i, k])
                if j >= 0:
                    s = tuple(int(v) for v in shift[f, i, k]) if shift is not None else (0, 0, 0)
                    where[(f, i, j, s)] = (f * nloc + i) * nnei + k
    expect = np.full(nf * nloc * nnei, -1)
    for (f, i, j, s), p in where.items():
        if int(atype[f, i]) == int(atype[f, j]):
            expect[p] = where.get((f, j, i, tuple(-v for v in s)), -1)
    return expect


@pytest.mark.parametrize("case", ["triclinic", "small_cell_self_images", "nopbc", "truncated_sel"])
def test_reverse_slots_match_brute_force(random_frame, case):
    rcut, sel, box = 4.0, [30, 30], None
    if case == "small_cell_self_images":  # rcut > half the cell: an atom neighbors its own images
        box, sel = np.diag([3.1, 3.3, 3.6]) + np.array([[0, 0, 0], [0.6, 0, 0], [-0.4, 0.5, 0]]), [60, 60]
    if case == "truncated_sel":  # reverse pairs cut by sel from one of the two lists stay unmatched
        sel = [3, 4]
    natoms = 4 if case == "small_cell_self_images" else 8
    frames = [random_frame(seed=s, natoms=natoms, periodic=case != "nopbc", box=box) for s in (1, 2)]
    nlist, shift, atype, slot_type = _lists(frames, rcut, sel)
    got = reverse_slots(nlist, shift, atype, slot_type).reshape(-1).numpy()
    expect = _brute_force(nlist, shift, atype, slot_type)
    np.testing.assert_array_equal(got, expect)
    matched = np.flatnonzero(got >= 0)
    assert len(matched) > 0
    np.testing.assert_array_equal(got[got[matched]], matched)  # an involution
    if case == "small_cell_self_images":
        nf, nloc, nnei = nlist.shape
        atom = (matched // nnei) % nloc
        assert np.any((got[matched] // nnei) % nloc == atom), "expected an atom paired with its own image"


def test_sharing_needs_slot_independent_statistics(tiny_model):
    model = tiny_model("float64")
    assert model.descriptor.reverse_pairs_share_input()
    with torch.no_grad():
        model.descriptor.davg[0, 1, 0] += 0.1  # one slot normalised differently: s(r) no longer symmetric
    assert not model.descriptor.reverse_pairs_share_input()


@pytest.mark.parametrize("case", ["one_type_only", "slot_dependent_stats"])
def test_energy_equals_every_slot_embedded(fd_forces, tiny_model, random_frame, run_model, case):
    """Against the reference model, which embeds every slot, padding included. one_type_only: a frame with
    atoms of one type only, so the other type's block is padding everywhere (no slot kept) and enters
    through its constant. slot_dependent_stats: davg/dstd differ per slot, so padded slots have many
    distinct inputs (one padding row each) and no pair is shared. Forces are still -dE/dr."""
    model = tiny_model("float64")
    coord, atype, box = random_frame(seed=8, natoms=6, periodic=True)
    if case == "one_type_only":
        atype = np.zeros(len(coord), dtype=np.int64)
    else:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.descriptor.davg.add_(0.05 * torch.randn(model.descriptor.davg.shape, generator=gen, dtype=torch.float64))
            model.descriptor.dstd.mul_(1.0 + 0.1 * torch.rand(model.descriptor.dstd.shape, generator=gen, dtype=torch.float64))
        assert not model.descriptor.reverse_pairs_share_input()
    ref = run_model(model, coord, atype, box)
    fd = fd_forces(lambda c: run_model(model, c, atype, box, virial=False)["energy"], coord, 1e-5)
    np.testing.assert_allclose(ref["force"], fd, rtol=0, atol=1e-7)
    # the reference model embeds every slot (no shortcuts); energy and embedding-parameter gradients
    from dpfit.model import convert

    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel, warn=False)
    inputs = (torch.from_numpy(coord)[None], torch.from_numpy(atype)[None], torch.from_numpy(nl.nlist)[None],
              torch.from_numpy(box)[None], torch.from_numpy(nl.shift)[None])
    grads = []
    for impl in (model, convert(model, "reference")):
        energy = impl(*inputs, do_force=False)["energy"].sum()
        grads.append((energy.item(), torch.autograd.grad(energy, list(impl.descriptor.embeddings.parameters()))))
    (e_fast, g_fast), (e_ref, g_ref) = grads
    assert abs(e_fast - e_ref) < 1e-10
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_reverse_pair_is_embedded_once(tiny_model, random_frame, monkeypatch):
    """The shortcut is taken: the nets see one row per occupied slot, less one per matched pair, plus
    one row per distinct input of a padded slot (per center type here: slot-independent statistics)."""
    from dpfit.model.network import ResidualMLP

    model = tiny_model("float64")
    coord, atype, box = random_frame(seed=5, natoms=10, periodic=True, box=np.diag([3.4, 3.6, 3.9]), min_dist=1.0)
    nlist, shift, atypes, slot_type = _lists([(coord, atype, box)], model.rcut, model.sel)
    partner = reverse_slots(nlist, shift, atypes, slot_type)
    rows = []
    original = ResidualMLP.value_and_tangent

    def counting(self, s):
        rows.append(s.shape[0])
        return original(self, s)

    monkeypatch.setattr(ResidualMLP, "value_and_tangent", counting)
    inputs = dict(coord=torch.from_numpy(coord)[None], atype=atypes, nlist=nlist, box=torch.from_numpy(box)[None],
                  shift=shift, partner=partner)
    assert model.backend == "compact"
    model(**inputs, do_force=True)
    occupied = int((nlist >= 0).sum())
    pairs = int((partner >= 0).sum()) // 2
    assert pairs > 0
    desc = model.descriptor
    s_pad = (-desc.davg[..., 0] / desc.dstd[..., 0]).tolist()  # (center type, slot)
    padding_rows = sum(len({row[k] for row in s_pad for k in range(desc.sections[t], desc.sections[t + 1])})
                       for t in range(desc.ntypes))
    assert padding_rows == desc.ntypes * desc.ntypes
    assert sum(rows) == occupied - pairs + padding_rows


def test_slots_padded_for_the_whole_batch_are_not_embedded(tiny_model, random_frame):
    """The embedding blocks end at the last slot any atom of the batch occupies."""
    from dpfit.model.stages import IndexFacts

    model = tiny_model("float64")
    desc = model.descriptor
    coord, atype, box = random_frame(seed=3, natoms=6, periodic=True)
    nlist, shift, atypes, _ = _lists([(coord, atype, box)], model.rcut, model.sel)
    env = desc.environment(torch.from_numpy(coord)[None], torch.from_numpy(box)[None], nlist, shift, atypes)
    emb = desc.embed(env, atypes, True, IndexFacts(None, None, None, None))
    for t in range(desc.ntypes):
        most = int(env.mask[..., desc.sections[t]:desc.sections[t + 1]].sum(-1).max())
        assert most < desc.sel[t]
        assert emb.values[t].shape[1] == most and emb.tangents[t].shape[1] == most
