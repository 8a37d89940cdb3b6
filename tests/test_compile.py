"""torch.compile(fullgraph=True, dynamic=False): no host synchronisation, no data-dependent shapes.

The reference (dpfit.model.reference) is plain tensor code whose shapes depend only on the system
(frames, atoms, sel). The fast model compiles on its ``static`` backend (every neighbour slot embedded;
the batch's index facts, computed by the data pipeline, instead of facts read back from the neighbour
list). For both, the energy, the forces and virial and a training loss on them are captured
in one graph (``fullgraph``: a graph break, e.g. a ``.item()`` or a data-dependent shape, fails the
test), and the loss's backward through that graph gives the eager gradients. The ``aot_eager`` backend
checks the capture (forward and backward) without code generation, which takes minutes on 2 cores
(``scripts/benchmark_compile.py`` measures the generated code against the compiled kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import batch_inputs, random_labels

from dpfit.model import convert

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_reference_training_loss_compiles_as_one_graph(tiny_model, random_frame):
    model = convert(tiny_model(type_one_side=False, resnet_dt=True), "reference")
    inputs = batch_inputs(model, [random_frame(seed=20 + k, natoms=7) for k in range(2)])
    labels = random_labels(inputs)

    def loss_of(coord, atype, nlist, box, shift):
        out = model(coord, atype, nlist, box, shift, do_force=True, do_virial=True, create_graph=True)
        return (((out["energy"] - labels["energy"]) ** 2).mean() + ((out["force"] - labels["force"]) ** 2).mean()
                + ((out["virial"] - labels["virial"]) ** 2).mean())

    args = (inputs["coord"].clone().requires_grad_(), inputs["atype"], inputs["nlist"], inputs["box"], inputs["shift"])
    params = list(model.parameters())
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # autograd.grad (the forces) inside the graph
        compiled = torch.compile(loss_of, fullgraph=True, dynamic=False, backend="aot_eager")
        loss = compiled(*args)
    grads = torch.autograd.grad(loss, params)
    want_loss = loss_of(*args)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-12, atol=0)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _water_batch(water_fixture, nframes: int = 2):
    from test_parity import _npz

    from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint

    model = load_deepmd_checkpoint(water_fixture / "model.ckpt.pt")
    ref = _npz(water_fixture / "reference_data_3.npz")
    frames = [(ref["coord"][k].reshape(-1, 3).astype(np.float64), ref["atype"], ref["box"][k].reshape(3, 3))
              for k in range(nframes)]
    inputs = batch_inputs(model, frames, facts=True)  # the index facts as the data pipeline gives them
    return model, inputs, random_labels(inputs)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_fast_training_loss_compiles_as_one_graph(water_fixture, precision):
    """The fast model (closed-form forces and virial) on the DeePMD-kit water fixture, on its static
    backend (every slot embedded, index facts from the batch): energy, forces, virial and the loss are
    captured in one graph (fullgraph: any graph break fails), and the backward through it (AOTAutograd)
    gives the eager gradients."""
    model, inputs, labels = _water_batch(water_fixture)
    model = model.to(getattr(torch, precision)).use_backend("static")
    tol = 1e-10 if precision == "float64" else 2e-5  # (float32: as test_parity's outputs)
    model.train()
    facts = {k: inputs[k] for k in ("partner", "kept", "type_counts", "type_order") if k in inputs}

    def loss_of(coord, box):
        out = model(coord, inputs["atype"], inputs["nlist"], box, inputs["shift"], do_force=True, do_virial=True,
                    create_graph=True, **facts)
        return (((out["energy"] - labels["energy"]) ** 2).mean() + ((out["force"] - labels["force"]) ** 2).mean()
                + ((out["virial"] - labels["virial"]) ** 2).mean())

    args = (inputs["coord"], inputs["box"])
    params = list(model.parameters())
    compiled = torch.compile(loss_of, fullgraph=True, dynamic=False, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, params)
    want_loss = loss_of(*args)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=tol / 100, atol=0)
    for a, b in zip(grads, want):  # (relative to each gradient's largest entry, as in test_parity)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
