"""torch.compile of the reference model: no host synchronisation, no data-dependent shapes.

The reference (dpfit.model.reference) is plain tensor code whose shapes depend only on the system
(frames, atoms, sel), so ``torch.compile(fullgraph=True, dynamic=False)`` captures its energy, its
autograd forces and virial, and a training loss built on them in one graph; the loss's backward
through that graph gives the eager gradients. (The fast model is not there yet: it derives index
facts from the neighbour list on the host at every step.) The ``aot_eager`` backend checks the
capture without code generation, which on 2 busy cores takes minutes with inductor.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import batch_inputs, random_labels

from dpfit.model import convert

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]


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
