"""Index facts from the data pipeline: the batch carries them, they are right, and the model gives the same
numbers with them as when it derives them itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import batch_inputs, loss_gradients, outputs, random_labels

from dpfit.data.batch import collate, model_inputs
from dpfit.data.datamodule import FrameDataset
from dpfit.data.index_facts import index_facts, kept_slots, type_split
from dpfit.data.sampler import SystemView
from dpfit.data.system import DeepmdSystem
from dpfit.model.kernels import load_library
from dpfit.model.stages import type_groups

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FACTS = ("partner", "kept", "type_counts", "type_order")


def test_kept_slots_and_type_split_match_brute_force(random_frame):
    sel = [5, 7]
    frames = [random_frame(seed=s, natoms=9) for s in (3, 4)]
    frames[1] = (frames[1][0], frames[1][1][::-1].copy(), frames[1][2])  # not in type order
    inputs = batch_inputs(type("M", (), {"rcut": 3.0, "sel": sel})(), frames)
    nlist = inputs["nlist"].numpy()
    expect = []
    for lo, hi in ((0, 5), (5, 12)):
        used = [k for k in range(hi - lo) if (nlist[..., lo + k] >= 0).any()]
        expect.append(max(used) + 1 if used else 0)
    assert kept_slots(inputs["nlist"], [0, 5, 12]) == expect
    assert 0 < expect[0] <= 5 and 0 < expect[1] <= 7
    flat = inputs["atype"].reshape(-1)
    counts, order = type_split(inputs["atype"], 2)
    assert counts == [int((flat == t).sum()) for t in range(2)]
    assert order is not None and bool((flat[order][1:] >= flat[order][:-1]).all())
    np.testing.assert_array_equal(flat[order].numpy(), np.sort(flat.numpy(), kind="stable"))
    assert type_split(torch.sort(flat)[0], 2)[1] is None  # already in type order: no reordering
    # the model's own grouping (for calls without the pipeline's facts) agrees
    model_counts, model_order = type_groups(inputs["atype"], 2)
    assert model_counts == counts and torch.equal(model_order, order)


def _write_system(path, frames) -> DeepmdSystem:
    (path / "set.000").mkdir(parents=True)
    coord, atype, box = zip(*frames)
    (path / "type.raw").write_text("\n".join(str(int(t)) for t in atype[0]))
    (path / "type_map.raw").write_text("A\nB\n")
    np.save(path / "set.000" / "coord.npy", np.stack(coord).reshape(len(frames), -1))
    np.save(path / "set.000" / "box.npy", np.stack(box).reshape(len(frames), 9))
    np.save(path / "set.000" / "energy.npy", np.zeros(len(frames)))
    np.save(path / "set.000" / "force.npy", np.zeros((len(frames), len(atype[0]) * 3)))
    return DeepmdSystem(path, ["A", "B"])


def test_collate_gives_the_batch_its_index_facts(tmp_path, random_frame, tiny_model):
    """A DataLoader batch (FrameDataset samples, collate) holds the facts of its neighbour lists, and they
    reach the model through model_inputs."""
    model = tiny_model()
    first = random_frame(seed=7, natoms=8)
    frames = [first] + [(random_frame(seed=8 + k, natoms=8)[0], first[1], first[2]) for k in range(2)]
    system = _write_system(tmp_path / "sys", frames)
    dataset = FrameDataset([SystemView(system, np.arange(3), 3)], model.rcut, model.sel)
    batch = collate([dataset[(0, f)] for f in range(3)])
    want = index_facts(batch["nlist"], batch["shift"], batch["atype"], model.sel)
    assert set(want) <= set(batch) and set(want) <= set(model_inputs(batch))
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0)
        else:
            assert batch[key] == value
    assert (batch["partner"] >= 0).any()


@pytest.mark.parametrize("backend", ["compact", "kernels", "static"])
@pytest.mark.parametrize("option", [{}, {"type_one_side": False}])
def test_model_numbers_are_the_same_with_given_or_derived_facts(tiny_model, random_frame, backend, option):
    """A model called without the pipeline's facts derives what it needs (the atoms' type grouping, the
    occupied slots) and embeds a same-type pair from both sides instead of once: the static layout (which
    shares no rows) gives the same numbers bit for bit, the others to round-off (the nets then run on
    other row counts, and the shared rows' gradients are summed in another order)."""
    model = tiny_model(**option)
    if backend == "kernels" and load_library(required=False) is None:
        pytest.skip("the op library is unavailable")
    model.use_backend(backend)
    frames = [random_frame(seed=30 + k, natoms=7) for k in range(3)]
    frames[1] = (frames[1][0], frames[1][1][::-1].copy(), frames[1][2])
    bare = batch_inputs(model, frames)
    given = batch_inputs(model, frames, facts=True)
    assert set(FACTS) <= set(given)
    tol = 0.0 if backend == "static" else 1e-13

    def check(got: dict, want: dict) -> None:
        for key, value in got.items():
            scale = float(want[key].abs().max())
            torch.testing.assert_close(value, want[key], rtol=0, atol=tol * max(scale, 1e-30), msg=key)

    check(outputs(model, given), outputs(model, bare))
    labels = random_labels(bare)
    check(loss_gradients(model, given, labels), loss_gradients(model, bare, labels))
