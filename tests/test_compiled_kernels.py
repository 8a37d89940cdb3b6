"""The dpfit op library (dpfit.model.kernels, ``torch.ops.dpfit.*``) op by op: the same values and
gradients as the PyTorch path for single nets and products, gradchecks, the edge cases of the row
bookkeeping, opcheck on every op, LAMMPS-style extended atoms, and how the library is built (ninja,
CMake), cached, loaded without dpfit (TorchScript in a fresh process) and chosen. Whole models against
the reference: tests/test_parity.py.

The library is built on first use (well under a minute, then cached). Outside CI a machine without a
C++ compiler skips these tests; in CI (``CI`` set) the build must succeed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from dpfit.data.neighbor import build_neighbor_list
from dpfit.model import EnergyModel
from dpfit.model.kernels import library as kernel_library
from dpfit.model.kernels.registration import DIFFERENTIABLE, OPS, backward_node
from dpfit.model.network import ResidualMLP
from dpfit.training.module import DeepPotentialModule

pytestmark = pytest.mark.usefixtures("single_torch_thread")

dpfit = torch.ops.dpfit
#: rows per block of the embedding kernel (csrc/ops.cpp)
BLOCK_ROWS = 128

NETS = {"deepmd_25_50_100": ([25, 50, 100], False), "resnet_dt": ([6, 12, 12], True),
        "first_layer_residual": ([2, 4, 3], True), "first_layer_equal": ([1, 1], False), "one_layer": ([7], False),
        # widths that fill whole vectors (8 float64 / 16 float32 lanes) of the AVX-512 product kernel
        "lane_multiples": ([16, 32, 64], False)}


@pytest.fixture(scope="module")
def kernels():
    """The op library loaded (its path); the tests skip where it cannot be built, except in CI."""
    try:
        return kernel_library.load_library(required=True)
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the op library is unavailable here: {exc}")


def _params(net: ResidualMLP) -> list[torch.Tensor]:
    return [p for layer in net.layers for p in (layer.matrix, layer.bias, layer.idt) if p is not None]


def _value_tangent_grads(net: ResidualMLP, s: torch.Tensor, mode: str):
    """The net's value and tangent by the op (``on``) or by PyTorch (``off``), and a loss's gradients."""
    s = s.detach().clone().requires_grad_(True)
    if mode == "on":
        g, t, _ = dpfit.value_and_tangent(s, net.flat_parameters(), net.kinds, net.has_idt, True)
    else:
        g, t = net.value_and_tangent(s)
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(g.shape, dtype=g.dtype, generator=gen)
    w2 = torch.randn(t.shape, dtype=t.dtype, generator=gen)
    loss = (g * w1).sum() + ((t * w2) ** 2).sum()
    grads = torch.autograd.grad(loss, [s, *_params(net)]) if g.numel() else []
    return g.detach(), t.detach(), grads, g.grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rows", [0, 1, BLOCK_ROWS - 1, 2 * BLOCK_ROWS + 3])
@pytest.mark.parametrize("name", list(NETS), ids=list(NETS))
def test_kernel_equals_pytorch_path(kernels, name, rows, dtype):
    """Values, tangents and every gradient (parameters and s), for row counts around the block size."""
    neuron, resnet_dt = NETS[name]
    net = ResidualMLP(1, neuron, resnet_dt, dtype=dtype, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(-1.5, 2.5, rows, dtype=dtype).unsqueeze(-1)
    g, t, grads, fn = _value_tangent_grads(net, s, "on")
    g_ref, t_ref, ref, fn_ref = _value_tangent_grads(net, s, "off")
    assert fn == backward_node("value_and_tangent") and fn_ref == "ValueAndTangentBackward"
    # float32: rounding differs (summation order, tanh), so errors relative to each tensor's scale
    eps = 1e-12 if dtype == torch.float64 else 1e-4
    assert len(grads) == len(ref)
    for a, b in zip([g, t, *grads], [g_ref, t_ref, *ref]):
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * max(scale, 1.0))


def test_kernel_gradcheck(kernels):
    net = ResidualMLP(1, [3, 6], True, generator=torch.Generator().manual_seed(1))
    s = torch.randn(9, 1, dtype=torch.float64, requires_grad=True)
    params = _params(net)
    kinds = [layer.kind for layer in net.layers]
    has_idt = [layer.idt is not None for layer in net.layers]
    assert torch.autograd.gradcheck(
        lambda s, *p: dpfit.value_and_tangent(s, list(p), kinds, has_idt, True)[:2], (s, *params))


def test_kernel_without_autograd_equals_plain_path(kernels):
    net = ResidualMLP(1, [25, 50, 100], False, generator=torch.Generator().manual_seed(2))
    s = torch.rand(300, 1, dtype=torch.float64)
    with torch.no_grad():
        g, t, kept = dpfit.value_and_tangent(s, net.flat_parameters(), net.kinds, net.has_idt, False)
        g_ref, t_ref = net.value_and_tangent(s)
    assert kept == []
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(t, t_ref, rtol=1e-13, atol=1e-13)


FITTING_NETS = {"deepmd_240x3_resnet_dt": ([24, 24, 24], True), "doubling": ([8, 16], False),
                "one_layer": ([9], True), "no_residual": ([12, 5], False)}


def _fitting_energy_and_grad(net: ResidualMLP, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitting net's output and input gradient by the op (``on``) or by PyTorch (``off``)."""
    if mode == "on":
        energy, grad, _ = dpfit.fitting(x, net.flat_parameters(), net.kinds[:-1], net.has_idt[:-1],
                                        torch.is_grad_enabled())
        return energy, grad
    return net.value_and_input_grad(x, torch.ones(1, dtype=x.dtype))


def _fitting_outputs(net: ResidualMLP, x: torch.Tensor, mode: str, with_energy: bool, with_grad: bool):
    x = x.detach().clone().requires_grad_(True)
    energy, grad = _fitting_energy_and_grad(net, x, mode)
    gen = torch.Generator().manual_seed(6)
    loss = x.new_zeros(())
    if with_energy:
        loss = loss + (energy * torch.randn(energy.shape, dtype=x.dtype, generator=gen)).sum()
    if with_grad:
        loss = loss + ((grad * torch.randn(grad.shape, dtype=x.dtype, generator=gen)) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, *_params(net)], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *_params(net)])]
    return energy.detach(), grad.detach(), grads, energy.grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["energy_and_force", "energy_only", "force_only"])
@pytest.mark.parametrize("name", list(FITTING_NETS), ids=list(FITTING_NETS))
def test_fitting_kernel_equals_pytorch_path(kernels, name, loss, dtype):
    """The compiled fitting net (energy and dE/dx in one Function): values, input gradients and every
    gradient of a loss on either or both (the x gradient feeds the descriptor), as value_and_input_grad
    through autograd."""
    neuron, resnet_dt = FITTING_NETS[name]
    net = ResidualMLP(10, neuron, resnet_dt, out_dim=1, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net.layers[-1].bias.fill_(0.3)
    x = torch.randn(37, 10, dtype=dtype, generator=torch.Generator().manual_seed(3))
    flags = {"energy_and_force": (True, True), "energy_only": (True, False), "force_only": (False, True)}[loss]
    e, g, grads, fn = _fitting_outputs(net, x, "on", *flags)
    e_ref, g_ref, ref, fn_ref = _fitting_outputs(net, x, "off", *flags)
    assert fn == backward_node("fitting") and fn_ref != fn
    eps = 1e-12 if dtype == torch.float64 else 1e-4
    for a, b in zip([e, g, *grads], [e_ref, g_ref, *ref]):
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * max(scale, 1.0))
    with torch.no_grad():  # the forward alone (inference)
        e_ng, g_ng = _fitting_energy_and_grad(net, x, "on")
    torch.testing.assert_close(e_ng, e, rtol=eps, atol=eps)
    torch.testing.assert_close(g_ng, g, rtol=eps, atol=eps)


def test_fitting_kernel_gradcheck(kernels):
    net = ResidualMLP(4, [5, 5, 10], True, out_dim=1, generator=torch.Generator().manual_seed(4))
    layers = list(net.layers)
    kinds = [layer.kind for layer in layers[:-1]]
    has_idt = [layer.idt is not None for layer in layers[:-1]]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in _params(net)]
    assert torch.autograd.gradcheck(lambda x, *p: dpfit.fitting(x, list(p), kinds, has_idt, True)[:2], (x, *params))


def _assert_kernels_match_pytorch(model, inputs: dict, nodes: tuple[str, ...] = ()) -> None:
    """Energies, forces, virials and an energy + force + virial loss's parameter gradients equal on the
    kernels backend and on PyTorch's compact layout; ``nodes``: autograd nodes the forces' graph holds
    exactly on the kernels."""
    outs, grads = {}, {}
    for mode in ("on", "off"):
        model.use_backend("kernels" if mode == "on" else "compact")
        model.zero_grad()
        out = model(**inputs, do_force=True, do_virial=True, create_graph=True)
        graph = _graph_nodes(out["force"])
        for node in nodes:
            assert (node in graph) == (mode == "on"), node
        (out["energy"].sum() + out["force"].square().sum() + out["virial"].square().sum()).backward()
        outs[mode] = {k: v.detach() for k, v in out.items()}
        grads[mode] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    for key in outs["off"]:
        torch.testing.assert_close(outs["on"][key], outs["off"][key], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads["on"], grads["off"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def _graph_nodes(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("case", ["periodic", "excluded_pair", "one_type_absent", "single_atom"])
def test_slot_contractions_on_rows_equal_padded_path(kernels, tiny_model, random_frame, case):
    """With the kernels the descriptor contracts the embedding rows directly (slot_gt / slot_env, no padded
    gather) and the environment matrix and its Jacobian come from one compiled pass (env_jacobian):
    energy, forces, virial and a loss's parameter gradients as on the PyTorch path, also with an
    excluded type pair and when a neighbor-type block is empty."""
    model = tiny_model(type_one_side=False, exclude_types=[[0, 1]] if case == "excluded_pair" else [])
    if case in ("periodic", "excluded_pair"):
        coord, atype, box = random_frame(seed=5, natoms=12)
    elif case == "one_type_absent":
        coord, atype, box = random_frame(seed=6, natoms=5, periodic=False)
        atype = np.zeros_like(atype)
    else:
        coord, atype, box = np.zeros((1, 3)), np.zeros(1, dtype=np.int64), None
    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel)
    inputs = {"coord": torch.from_numpy(coord[None].copy()), "atype": torch.from_numpy(atype[None].copy()),
              "nlist": torch.from_numpy(nl.nlist[None].copy())}
    if box is not None:
        inputs.update(box=torch.from_numpy(box[None].copy()), shift=torch.from_numpy(nl.shift[None].copy()))
    _assert_kernels_match_pytorch(model, inputs, tuple(backward_node(name) for name in (
        "slot_env", "slot_gt", "env_jacobian", "fitting", "descriptor_gram", "descriptor_vjp", "value_and_tangent")))


@pytest.mark.parametrize("periodic", [True, False])
def test_compiled_reverse_slots_equal_python(kernels, tiny_model, random_frame, periodic):
    """The compiled reverse-pair search gives the flat partner slots of dpfit.data.index_facts.reverse_slots,
    on a small triclinic cell (atoms see their own images) and a cluster; some pairs are cut by sel."""
    from dpfit.data.index_facts import reverse_slots

    model = tiny_model()
    frames = [random_frame(seed=s, natoms=14 if periodic else 8, periodic=periodic) for s in (11, 12)]
    nls = [build_neighbor_list(c, t, b, model.rcut, [6, 7], warn=False) for c, t, b in frames]
    nlist = torch.from_numpy(np.stack([nl.nlist for nl in nls]))
    atype = torch.from_numpy(np.stack([np.asarray(t) for _, t, _ in frames]))
    shift = torch.from_numpy(np.stack([nl.shift for nl in nls])) if periodic else None
    slot_type = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 7]))
    ref = reverse_slots(nlist, shift, atype, slot_type)
    sections = [0, 6, 13]
    got = dpfit.reverse_slots(nlist.long(), None if shift is None else shift.long(), atype.long(), sections)
    assert torch.equal(got, ref)
    assert int((ref >= 0).sum()) > 10


def test_slot_contraction_gradcheck(kernels):
    """slot_gt and slot_env against finite differences, with rows shared by several slots."""

    gen = torch.Generator().manual_seed(8)
    rows, n, k, m = 5, 3, 4, 6
    g = torch.randn(rows, m, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(rows, m, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.tensor([[0, 1, 4, 4], [2, 0, 4, 4], [3, 1, 4, 2]])
    r = torch.randn(n, k, 4, dtype=torch.float64, generator=gen)
    gbar = torch.randn(n, 4, m, dtype=torch.float64, generator=gen, requires_grad=True)
    order, ptr = dpfit.slots_of_rows(index, rows)
    assert torch.autograd.gradcheck(lambda g: dpfit.slot_gt(g, index, r, order, ptr)[0], (g,))

    def chained(g, b):  # slot_env on slot_gt's rows, with its handle: its row gradient is summed into slot_gt's backward
        out, rows_grad = dpfit.slot_gt(g, index, r, order, ptr)
        return out, dpfit.slot_env(g, g * 2, index, index != 4, b, order, ptr, rows_grad)[0]

    assert torch.autograd.gradcheck(chained, (g, gbar))
    valid = index != 4  # row 4 plays the padding row
    assert torch.autograd.gradcheck(lambda g, t, b: dpfit.slot_env(g, t, index, valid, b, order, ptr, None),
                                    (g, t, gbar))
    padded = g[index]  # the padded layout: the same contraction
    torch.testing.assert_close(dpfit.slot_gt(g, index, r, order, ptr)[0], r.transpose(1, 2) @ padded)
    part, tds = dpfit.slot_env(g, t, index, valid, gbar, order, ptr, None)
    keep = valid.unsqueeze(-1)
    torch.testing.assert_close(part, torch.where(keep, padded @ gbar.transpose(1, 2), 0.0))
    torch.testing.assert_close(tds, torch.where(keep, t[index] @ gbar.transpose(1, 2), 0.0))
    # the padded slots' gradients are not read: the padding row gets none through slot_env
    (part.sum() + tds.sum()).backward()
    assert torch.count_nonzero(g.grad[4]) == 0 and torch.count_nonzero(t.grad[4]) == 0
    assert torch.count_nonzero(g.grad[:4]) > 0


def test_compiled_slots_of_rows_equal_argsort(kernels):
    """The counting sort's CSR equals the stable argsort's (a row's slots in increasing order), with
    rows used by many slots (padding rows), by one, and by none."""
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 40, (30, 9), generator=gen)
    index[:, 6:] = 41  # a padding row shared by many slots; rows 40, 42, 43 unused
    got = dpfit.slots_of_rows(index, 44)
    want_order = torch.argsort(index.reshape(-1), stable=True)
    want_ptr = torch.zeros(45, dtype=torch.long)
    torch.cumsum(torch.bincount(index.reshape(-1), minlength=44), 0, out=want_ptr[1:])
    assert torch.equal(got[0], want_order) and torch.equal(got[1], want_ptr)
    assert int(got[1][-1]) == index.numel()
    with pytest.raises(RuntimeError, match="out of range"):
        dpfit.slots_of_rows(index, 41)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m, a", [(100, 16), (16, 16), (8, 3), (5, 5)])
def test_descriptor_products_equal_bmm(kernels, m, a, dtype):
    """D = G^T G< and its gradient for G under dE/dD (g_bar) as the torch.bmm products of the PyTorch
    path, and their gradients as autograd's through those products, at the water shapes (M 100, a 16)
    and small ones (a = M included; a = 16 has its own code)."""
    gen = torch.Generator().manual_seed(3)
    n = 7
    g = torch.randn(n, 4, m, dtype=dtype, generator=gen)
    w = torch.randn(n, m, a, dtype=dtype, generator=gen)
    c_d = torch.randn(n, m, a, dtype=dtype, generator=gen)
    c_v = torch.randn(n, 4, m, dtype=dtype, generator=gen)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}

    def reference(g, w):
        d = torch.bmm(g.transpose(1, 2), g[..., :a])
        v = torch.bmm(g[..., :a], w.transpose(1, 2)) + torch.nn.functional.pad(torch.bmm(g, w), [0, m - a])
        return d, v

    results = []
    for compiled in (True, False):
        gg, ww = g.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if compiled:
            d, v = dpfit.descriptor_gram(gg, a), dpfit.descriptor_vjp(gg, ww)
        else:
            d, v = reference(gg, ww)
        ((d * c_d).sum() + (v * c_v).sum()).backward()
        results.append((d.detach(), v.detach(), gg.grad, ww.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


def test_descriptor_products_gradcheck(kernels):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: dpfit.descriptor_gram(g, 2), (g,))
    assert torch.autograd.gradcheck(lambda g, w: dpfit.descriptor_vjp(g, w), (g, w))


#: the arguments each differentiable op is checked with requiring grad (positions; a list: each tensor of it)
DIFFERENTIABLE_ARGS = {"value_and_tangent": (0, 1), "fitting": (0, 1), "env_jacobian": (1,), "slot_gt": (0,),
                       "slot_env": (0, 1, 4, 7), "descriptor_gram": (0,), "descriptor_vjp": (0, 1)}


class _FirstOpCalls(TorchDispatchMode):
    """The arguments of each dpfit op's first call (copies), forward and backward."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dpfit" and func._opname not in self.calls:
            self.calls[func._opname] = tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a,
                                                args)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def op_calls(kernels):
    """Each op's arguments in a training step of a tiny periodic float64 model on the kernels backend (two
    types, an excluded pair, a net per type pair, reverse pairs sharing rows, padded slots), and of the
    reverse-pair search the LAMMPS export runs on that step's neighbour list."""
    from conftest import make_random_frame, make_tiny_model

    from dpfit.data.index_facts import index_facts

    model = make_tiny_model(type_one_side=False, exclude_types=[[0, 1]]).use_backend("kernels")
    coord, atype, box = make_random_frame(seed=5, natoms=12)
    inputs = _frame_inputs(model, coord, atype, box)
    inputs.update(index_facts(inputs["nlist"], inputs["shift"], inputs["atype"], model.sel))
    with _FirstOpCalls() as mode:
        out = model(**inputs, do_force=True, do_virial=True, create_graph=True)
        (out["energy"].sum() + out["force"].square().sum() + out["virial"].square().sum()).backward()
        dpfit.reverse_slots(inputs["nlist"], inputs["shift"], inputs["atype"], model.descriptor.sections)
    return mode.calls


def test_every_op_runs_in_a_training_step(op_calls):
    assert set(op_calls) == set(OPS)
    assert set(DIFFERENTIABLE) < set(OPS)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(op_calls, name):
    """torch.library.opcheck on each op (schema and aliasing, autograd registration, the fake
    implementation against the kernel, AOT dispatch with dynamic shapes), with the arguments of a
    training step; the differentiable arguments of the differentiable ops require grad."""
    args = list(op_calls[name])
    for i in DIFFERENTIABLE_ARGS.get(name, ()):
        if isinstance(args[i], list):
            args[i] = [t.requires_grad_(True) for t in args[i]]
        elif args[i] is not None:
            args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.dpfit, name).default, tuple(args))


def test_slot_env_without_handle_opcheck(op_calls):
    """slot_env's row gradient to G itself (no handle of slot_gt)."""
    g, t, index, valid, gbar, order, ptr, _ = op_calls["slot_env"]
    args = (g.requires_grad_(True), t.requires_grad_(True), index, valid, gbar.requires_grad_(True), order, ptr, None)
    torch.library.opcheck(torch.ops.dpfit.slot_env.default, args)


def test_ops_under_torch_compile_and_fx(kernels):
    """torch.compile (full graph, AOT autograd) and make_fx trace the ops as graph nodes (their fake
    implementations and autograd formulas from Python); values and gradients as in eager mode."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(g, w):
        return dpfit.descriptor_gram(g, 2).sum() + dpfit.descriptor_vjp(g, w).square().sum()

    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    want = f(g, w), *torch.autograd.grad(f(g, w), (g, w))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(g, w), *torch.autograd.grad(compiled(g, w), (g, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    graph = make_fx(lambda g, w: dpfit.descriptor_vjp(g, w))(g.detach(), w.detach()).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch.ops.dpfit.descriptor_vjp.default]


@pytest.mark.parametrize("name", sorted(set(OPS) - set(DIFFERENTIABLE) - {"reverse_slots", "slots_of_rows"}))
def test_not_differentiable_op_says_so(op_calls, name):
    """A gradient asked of an op without a backward formula (all but two of which take floating-point
    tensors) is an error naming the op, not a silent zero."""
    args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in op_calls[name]]
    out = [t for t in tree_leaves(getattr(dpfit, name)(*args)) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert out
    with pytest.raises(RuntimeError, match=f"derivative for dpfit::{name} is not implemented"):
        sum(t.sum() for t in out).backward()


def _frame_inputs(model, coord, atype, box) -> dict:
    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel)
    return {"coord": torch.from_numpy(coord[None].copy()), "atype": torch.from_numpy(atype[None].copy()),
            "nlist": torch.from_numpy(nl.nlist[None].copy()), "box": torch.from_numpy(box[None].copy()),
            "shift": torch.from_numpy(nl.shift[None].copy())}


def test_ase_calculator_with_kernels(kernels, tiny_model, random_frame):
    """DPCalculator(kernels=...) selects the model's backend; energies, forces and stress as without."""
    from ase import Atoms

    from dpfit.calculators.ase import DPCalculator

    model = tiny_model(sel=[24, 24])
    model.type_map = ["Cu", "Ni"]
    coord, atype, box = random_frame(seed=9, natoms=10)
    results = {}
    for mode in ("off", "on"):
        atoms = Atoms(symbols=[model.type_map[t] for t in atype], positions=coord, cell=box, pbc=True)
        atoms.calc = DPCalculator(model, kernels=mode)
        assert atoms.calc.model.kernels == mode
        assert atoms.calc.model.backend == ("kernels" if mode == "on" else "compact")
        with torch.enable_grad():  # (the kernels' autograd nodes show they ran)
            out = model(**_frame_inputs(model, coord, atype, box), create_graph=True)
        assert (backward_node("fitting") in _graph_nodes(out["force"])) == (mode == "on")
        results[mode] = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    for a, b in zip(results["on"], results["off"]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_backend_is_chosen_once_for_the_device(kernels, tiny_model):
    """The model option and the device pick the backend when the model is built or placed (never per
    call): kernels on / auto on a CPU, compact with kernels off, static elsewhere; a backend refuses a
    device it does not run on."""
    from dpfit.model.backends import choose_backend

    model = tiny_model()
    assert model.select_backend("cpu", "on") == "kernels" == model.backend
    assert type(model.descriptor).__name__ == "KernelSeE2A" and type(model.fitting).__name__ == "KernelFitting"
    assert model.select_backend("cpu", "off") == "compact" == model.backend
    assert model.select_backend("cpu", "auto") == "kernels" and model.kernels == "auto"
    assert choose_backend("on", "meta") == "static" and choose_backend("auto", torch.device("cuda", 0)) == "static"
    params = [id(p) for p in model.parameters()]
    model.use_backend("static")
    assert [id(p) for p in model.parameters()] == params  # the same tensors, another compute class
    with pytest.raises(ValueError, match="'kernels' backend runs on cpu, not on meta"):
        model.use_backend("kernels", "meta")


def test_mode_is_validated(tiny_model):
    with pytest.raises(ValueError, match="kernels='fast'"):
        DeepPotentialModule(model={}, loss=None, schedule=None, kernels="fast")
    with pytest.raises(ValueError, match="model.kernels='fast'"):
        EnergyModel.from_config({**tiny_model().config, "kernels": "fast"})
    with pytest.raises(ValueError, match="model.kernels='fast'"):
        tiny_model().select_backend("cpu", "fast")


def test_failed_build_falls_back_or_raises(monkeypatch, caplog):
    """``auto``: a failed build leaves the PyTorch path with one warning naming the cause; ``on`` raises,
    saying how to fix it."""

    def broken():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(kernel_library, "_load", broken)
    monkeypatch.setattr(kernel_library, "_path", None)
    monkeypatch.setattr(kernel_library, "_failure", None)
    monkeypatch.setattr(kernel_library, "_warned", False)
    from dpfit.model.backends import choose_backend

    with caplog.at_level("WARNING", logger="dpfit.model.kernels.library"):
        assert kernel_library.load_library(required=False) is None
        assert choose_backend("auto", "cpu") == "compact"
    assert caplog.text.count("no C++ compiler found") == 1  # warned once
    assert choose_backend("off", "cpu") == "compact" and kernel_library.library_path() is None
    with pytest.raises(RuntimeError, match=r"unavailable \(OSError: no C\+\+ compiler found\).*g\+\+.*ninja.*"
                                           r"pip install dpfit\[kernels\].*model.kernels=off"):
        kernel_library.load_library(required=True)
    with pytest.raises(RuntimeError, match="no C"):
        choose_backend("on", "cpu")


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_module_kernels_is_the_model_option(tiny_model, mode):
    """train.yaml's ``kernels`` (when set) overrides ``model.kernels``; the option is stored in the
    checkpoint's model config, and the backend is chosen from it when Lightning sets the module up."""
    from dpfit.io.checkpoint import MODEL_CONFIG_KEY
    from dpfit.training.loss import EnergyLoss
    from dpfit.training.schedule import ExponentialDecay

    config = {**tiny_model().config, "kernels": "on"}
    module = DeepPotentialModule(model=config, loss=EnergyLoss(), schedule=ExponentialDecay(), kernels=mode)
    assert module.model.kernels == mode and module.hparams[MODEL_CONFIG_KEY]["kernels"] == mode
    assert module.model.backend == "compact"  # (until setup, which knows the device)
    module.setup("fit")
    assert module.model.backend == ("compact" if mode == "off" else "kernels")
    module = DeepPotentialModule(model=config, loss=EnergyLoss(), schedule=ExponentialDecay())
    assert module.model.kernels == "on"


def test_build_says_so_first_and_cache_is_reused(tmp_path, monkeypatch, caplog):
    """The first build logs a message with the expected duration before it starts, and builds a plain
    library (not a Python module; --as-needed first, so torch's -ltorch_python drops out); the folder is
    keyed by the sources (not by paths of the environment), and a finished build is loaded directly."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    events = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, extra_include_paths, build_directory,
                  is_python_module, verbose):
        assert not is_python_module and extra_ldflags[0] == "-Wl,--as-needed"
        assert {Path(s).name for s in sources} == {p.name for p in kernel_library.SOURCES}
        events.append(("load", [r.getMessage() for r in caplog.records]))
        path = Path(build_directory) / f"{name}.so"
        path.write_text("")
        return str(path)

    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: events.append(("load_library", path)))
    with caplog.at_level("WARNING", logger="dpfit.model.kernels.library"):
        built = kernel_library._build()
        assert events[0][0] == "load" and any("building the dpfit op library" in m and "minutes" in m
                                              for m in events[0][1])
        assert kernel_library._build() == built
    (folder,) = tmp_path.iterdir()
    assert events[1] == ("load_library", str(next(folder.glob("*.so"))))
    (folder / "complete").unlink()  # an unfinished build whose process was killed: the lock file is named
    (folder / "lock").write_text("")
    with caplog.at_level("WARNING", logger="dpfit.model.kernels.library"):
        kernel_library._build()
    assert f"delete {folder / 'lock'}" in caplog.text
    key = kernel_library._cache_dir("x", [])
    monkeypatch.setattr(kernel_library.sys, "prefix", "/another/venv")  # another environment: the same folder
    assert kernel_library._cache_dir("x", []) == key
    monkeypatch.setattr(kernel_library, "SOURCES", kernel_library.SOURCES[:-1])  # other sources: another folder
    assert kernel_library._cache_dir("x", []) != key


# ------------------------------------------------------------------------------------------------
# LAMMPS-style extended atoms: coord (nf, nall, 3), the first nloc atoms the centers, nlist into nall


def _extended_frames(model, seeds=(11, 12), natoms=(14, 10)):
    """Periodic frames (nf = 2, different sizes padded to one nloc) as (coord, atype, box, nlist, shift),
    and the same frames with every periodic image a ghost atom after the local ones (LAMMPS' layout; no
    shift or box): (coord (nf, nall, 3), atype (nf, nall), nlist into nall); frames padded with far atoms."""
    sel = [6, 7]
    frames = [make_frame(seed=s, natoms=n) for s, n in zip(seeds, natoms)]
    nloc = max(natoms)
    local = {"coord": [], "atype": [], "box": [], "nlist": [], "shift": []}
    ext = {"coord": [], "atype": [], "nlist": []}
    for coord, atype, box in frames:
        nl = build_neighbor_list(coord, atype, box, model.rcut, sel, warn=False)
        pad = nloc - len(coord)  # padding atoms (far away, no neighbors)
        coord_l = np.concatenate([coord, 50.0 + 10.0 * np.arange(pad)[:, None] * np.ones((1, 3))])
        atype_l = np.concatenate([atype, np.zeros(pad, dtype=atype.dtype)])
        nlist = np.concatenate([nl.nlist, -np.ones((pad, sum(sel)), dtype=nl.nlist.dtype)])
        shift = np.concatenate([nl.shift, np.zeros((pad, sum(sel), 3), dtype=nl.shift.dtype)])
        ghosts, ext_coord, ext_type, ext_nlist = {}, list(coord_l), list(atype_l), nlist.copy()
        for i, p in zip(*np.nonzero(nlist >= 0)):
            image = tuple(shift[i, p])
            if image != (0, 0, 0):
                key = (nlist[i, p], image)
                if key not in ghosts:
                    ghosts[key] = len(ext_coord)
                    ext_coord.append(coord_l[key[0]] + np.asarray(image) @ box)
                    ext_type.append(atype_l[key[0]])
                ext_nlist[i, p] = ghosts[key]
        for key, value in zip(("coord", "atype", "box", "nlist", "shift"), (coord_l, atype_l, box, nlist, shift)):
            local[key].append(value)
        for key, value in zip(("coord", "atype", "nlist"), (ext_coord, ext_type, ext_nlist)):
            ext[key].append(np.asarray(value))
    nall = max(len(c) for c in ext["coord"])
    for f in range(len(frames)):  # pad the frames' ghosts to one nall (unreferenced far atoms)
        more = nall - len(ext["coord"][f])
        ext["coord"][f] = np.concatenate([ext["coord"][f], -80.0 - np.arange(more)[:, None] * np.ones((1, 3))])
        ext["atype"][f] = np.concatenate([ext["atype"][f], np.ones(more, dtype=np.int64)])
    local = {k: torch.from_numpy(np.stack(v)) for k, v in local.items()}
    ext = {k: torch.from_numpy(np.stack(v)) for k, v in ext.items()}
    assert ext["coord"].shape[1] > nloc + 10 and bool((ext["nlist"] >= nloc).any())
    return local, ext


def make_frame(seed, natoms):
    from conftest import make_random_frame

    return make_random_frame(seed=seed, natoms=natoms)


def _env_params(model, nnei=13):
    gen = torch.Generator().manual_seed(4)
    davg = 0.1 * torch.randn(2, nnei, 4, dtype=torch.float64, generator=gen)
    dstd = 0.5 + torch.rand(2, nnei, 4, dtype=torch.float64, generator=gen)
    slot_type = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 7]))
    return davg, dstd, slot_type, float(model.descriptor.rcut_smth), float(model.rcut)


def _env_reference(coord, nlist, atype, davg, dstd, rcut_smth, rcut, far):
    """diff, R~ and J (dE/dd = J dE/dR~) by brute force: gather, the switching function written out,
    the Jacobian by autograd."""
    nf, nloc, nnei = nlist.shape
    index = nlist.clamp(min=0).reshape(nf, -1, 1).expand(-1, -1, 3)
    rj = torch.gather(coord, 1, index).reshape(nf, nloc, nnei, 3)
    mask = (nlist >= 0).unsqueeze(-1)
    d = torch.where(mask, rj - coord[:, :nloc, None, :], coord.new_tensor([far, 0.0, 0.0]))
    d = d.detach().requires_grad_(True)
    r = d.norm(dim=-1, keepdim=True)
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0, 1)
    w = u**3 * (-6 * u**2 + 15 * u - 10) + 1
    env = torch.cat([w / r, d * w / r**2], dim=-1)
    avg, std = davg[atype[:, :nloc]], dstd[atype[:, :nloc]]
    rr = torch.where(mask, (env - avg) / std, -avg / std)
    jac = torch.stack([torch.autograd.grad(rr[..., c].sum(), d, retain_graph=True)[0] for c in range(4)], dim=-1)
    return d.detach(), rr.detach(), torch.where(mask.unsqueeze(-1), jac, 0.0)


def _reverse_reference(nlist, atype, sections):
    """The reverse pair's flat slot by brute force: the first slot of j (of i's type, in i's type's
    section) that holds i; -1 for padding, another type, a ghost neighbor (j >= nloc) or no such slot."""
    nf, nloc, nnei = nlist.shape
    out = -torch.ones_like(nlist)
    for f in range(nf):
        for i in range(nloc):
            t = int(atype[f, i])
            for p in range(sections[t], sections[t + 1]):
                j = int(nlist[f, i, p])
                if 0 <= j < nloc and int(atype[f, j]) == t:
                    qs = [q for q in range(sections[t], sections[t + 1]) if int(nlist[f, j, q]) == i]
                    if qs:
                        out[f, i, p] = (f * nloc + j) * nnei + qs[0]
    return out


def test_env_geometry_extended_atoms(kernels, tiny_model):
    """coord (nf, nall, 3) with ghosts: unreferenced ghosts change nothing (bit for bit, atype (nf, nloc)
    or (nf, nall)); ghosts in place of periodic images give the periodic result (to rounding: r_j + S box
    is summed first) and the brute-force one, on two frames of different sizes."""
    model = tiny_model()
    local, ext = _extended_frames(model)
    davg, dstd, slot_type, rcut_smth, rcut = _env_params(model)
    nloc, far = local["nlist"].shape[1], rcut + 1.0

    def geometry(coord, nlist, atype, shift=None, box=None):
        return dpfit.env_geometry(coord, nlist, shift, box, atype, davg, dstd, None, slot_type, rcut_smth, rcut, far)

    periodic = geometry(local["coord"], local["nlist"], local["atype"], local["shift"], local["box"])
    # the local atoms followed by ghosts that no slot references: the same numbers
    padded = torch.cat([local["coord"], ext["coord"][:, nloc:]], dim=1)
    atype_all = torch.cat([local["atype"], ext["atype"][:, nloc:]], dim=1)
    for atype in (local["atype"], atype_all):
        got = geometry(padded, local["nlist"], atype, local["shift"], local["box"])
        assert all(torch.equal(a, b) for a, b in zip(got, periodic))
    # ghosts for the periodic images: the periodic result, and brute force
    for atype in (ext["atype"], ext["atype"][:, :nloc]):
        got = geometry(ext["coord"], ext["nlist"], atype)
        for a, b in zip(got, periodic):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    want = _env_reference(ext["coord"], ext["nlist"], ext["atype"], davg, dstd, rcut_smth, rcut, far)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert float((want[1] != -davg[ext["atype"][:, :nloc]] / dstd[ext["atype"][:, :nloc]]).sum()) > 100
    torch.library.opcheck(dpfit.env_geometry.default, (ext["coord"], ext["nlist"], None, None, ext["atype"], davg,
                                                       dstd, None, slot_type, rcut_smth, rcut, far))
    bad = ext["nlist"].clone()
    bad[1, 0, 0] = ext["coord"].shape[1]
    with pytest.raises(RuntimeError, match="a neighbor index >= nall"):  # (a C++ host's bad list: an error)
        geometry(ext["coord"], bad, ext["atype"])


def test_reverse_slots_extended_atoms(kernels, tiny_model):
    """nlist into nall atoms: a slot whose neighbor is local finds its reverse pair as with nall == nloc
    (where that pair has no periodic shift), a ghost neighbor's slot gets -1; as brute force."""
    model = tiny_model()
    local, ext = _extended_frames(model)
    sections, nloc = [0, 6, 13], local["nlist"].shape[1]
    periodic = dpfit.reverse_slots(local["nlist"], local["shift"], local["atype"], sections)
    assert torch.equal(periodic, _reverse_reference_periodic(local, sections))
    for atype in (ext["atype"], ext["atype"][:, :nloc]):
        got = dpfit.reverse_slots(ext["nlist"], None, atype, sections)
        assert torch.equal(got, _reverse_reference(ext["nlist"], ext["atype"], sections))
        is_local = (ext["nlist"] >= 0) & (ext["nlist"] < nloc)
        assert torch.equal(got[is_local], periodic[is_local])
        assert bool((got[~is_local] == -1).all()) and int((periodic[~is_local & (ext["nlist"] >= 0)] >= 0).sum()) > 0
        assert int((got >= 0).sum()) > 20
    # the PyTorch search a frozen file uses without the op library (TorchScript) gives the same slots
    from dpfit.data.index_facts import reverse_slots
    slot_type = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 7]))
    script = torch.jit.script(reverse_slots)
    for search in (reverse_slots, script):
        assert torch.equal(search(ext["nlist"], None, ext["atype"][:, :nloc], slot_type), got)
    torch.library.opcheck(dpfit.reverse_slots.default, (ext["nlist"], None, ext["atype"], sections))


def _reverse_reference_periodic(local, sections):
    """Brute force with shifts (nall == nloc): j's slot holding i with the opposite image."""
    nlist, shift, atype = local["nlist"], local["shift"], local["atype"]
    nf, nloc, nnei = nlist.shape
    out = -torch.ones_like(nlist)
    for f, i, p in zip(*torch.nonzero(nlist >= 0, as_tuple=True)):
        f, i, p = int(f), int(i), int(p)
        t, j = int(atype[f, i]), int(nlist[f, i, p])
        if not sections[t] <= p < sections[t + 1] or int(atype[f, j]) != t:
            continue
        for q in range(sections[t], sections[t + 1]):
            if int(nlist[f, j, q]) == i and torch.equal(shift[f, j, q], -shift[f, i, p]):
                out[f, i, p] = (f * nloc + j) * nnei + q
                break
    return out


# ------------------------------------------------------------------------------------------------
# the library outside dpfit: no Python in it, loaded by a fresh process, TorchScript, CMake

FRESH_PROCESS = r"""
import sys
from typing import List

import torch

library, data, saved = sys.argv[1:4]
torch.ops.load_library(library)


class Frozen(torch.nn.Module):
    def forward(self, coord: torch.Tensor, nlist: torch.Tensor, atype: torch.Tensor, davg: torch.Tensor,
                dstd: torch.Tensor, slot_type: torch.Tensor, s: torch.Tensor, params: List[torch.Tensor],
                x: torch.Tensor, fit: List[torch.Tensor]) -> List[torch.Tensor]:
        diff, rr, jac = torch.ops.dpfit.env_geometry(coord, nlist, None, None, atype, davg, dstd, None, slot_type,
                                                     0.5, 4.0, 5.0)
        partner = torch.ops.dpfit.reverse_slots(nlist, None, atype, [0, 6, 13])
        g, t, kept = torch.ops.dpfit.value_and_tangent(s, params, [0, 2], [False, True], False)
        gg = g.reshape(-1, 4, g.shape[1])
        d = torch.ops.dpfit.descriptor_gram(gg, 2)
        v = torch.ops.dpfit.descriptor_vjp(gg, d)
        energy, grad, _ = torch.ops.dpfit.fitting(x, fit, [0], [False], False)
        return [diff, rr, jac, partner, g, t, d, v, torch.ops.dpfit.env_jacobian(jac, rr, False), energy, grad]


module = torch.jit.script(Frozen())
torch.jit.save(module, saved)
loaded = torch.jit.load(saved)
inputs = torch.load(data)
outputs = loaded(**inputs)
torch.save(outputs, data + ".out")
assert not any(name == "dpfit" or name.startswith("dpfit.") for name in sys.modules), "dpfit was imported"
print("ok")
"""


def _fresh_inputs(tiny_model) -> dict:
    model = tiny_model()
    _, ext = _extended_frames(model)
    davg, dstd, slot_type, _, _ = _env_params(model)
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(1, 3, dtype=torch.float64, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen),
              torch.randn(3, 6, dtype=torch.float64, generator=gen), torch.randn(6, dtype=torch.float64, generator=gen),
              torch.rand(6, dtype=torch.float64, generator=gen)]
    fit = [torch.randn(5, 7, dtype=torch.float64, generator=gen), torch.randn(7, dtype=torch.float64, generator=gen),
           torch.randn(7, 1, dtype=torch.float64, generator=gen), torch.randn(1, dtype=torch.float64, generator=gen)]
    return {"coord": ext["coord"], "nlist": ext["nlist"], "atype": ext["atype"], "davg": davg, "dstd": dstd,
            "slot_type": slot_type, "s": torch.rand(40, 1, dtype=torch.float64, generator=gen), "params": params,
            "x": torch.randn(9, 5, dtype=torch.float64, generator=gen), "fit": fit}


def _run_fresh(library: str, inputs: dict, tmp_path: Path) -> list[torch.Tensor]:
    """FRESH_PROCESS's outputs: the library loaded with torch.ops.load_library by a Python process that
    never imports dpfit, running a TorchScript module saved and loaded back."""
    data, script = tmp_path / "inputs.pt", tmp_path / "fresh_process.py"  # (TorchScript reads the source file)
    torch.save(inputs, data)
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k not in ("DPFIT_OPS_LIBRARY", "PYTHONPATH")}
    out = subprocess.run([sys.executable, str(script), library, str(data), str(tmp_path / "frozen.pt")],
                         env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    return torch.load(str(data) + ".out")


def _same_outputs(inputs: dict) -> list[torch.Tensor]:
    """FRESH_PROCESS's outputs computed here (eagerly, the library this process loaded)."""
    i = inputs
    diff, rr, jac = dpfit.env_geometry(i["coord"], i["nlist"], None, None, i["atype"], i["davg"], i["dstd"], None,
                                       i["slot_type"], 0.5, 4.0, 5.0)
    partner = dpfit.reverse_slots(i["nlist"], None, i["atype"], [0, 6, 13])
    g, t, _ = dpfit.value_and_tangent(i["s"], i["params"], [0, 2], [False, True], False)
    gg = g.reshape(-1, 4, g.shape[1])
    d = dpfit.descriptor_gram(gg, 2)
    energy, grad, _ = dpfit.fitting(i["x"], i["fit"], [0], [False], False)
    return [diff, rr, jac, partner, g, t, d, dpfit.descriptor_vjp(gg, d), dpfit.env_jacobian(jac, rr, False), energy,
            grad]


def test_fresh_process_runs_torchscript_with_the_library(kernels, tiny_model, tmp_path):
    """A process that never imports dpfit loads the library (torch.ops.load_library), scripts a module
    calling torch.ops.dpfit.* (environment, reverse pairs, embedding and fitting nets, descriptor
    products), saves and loads it back and runs it: the outputs of the ops here, bit for bit."""
    inputs = _fresh_inputs(tiny_model)
    got = _run_fresh(kernels, inputs, tmp_path)
    want = _same_outputs(inputs)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def _needed(path: str) -> list[str]:
    """The shared libraries a library names as NEEDED (readelf -d)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed")
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def test_library_needs_no_python(kernels):
    """The library links libtorch_cpu and c10, not libtorch_python or libpython (C++ hosts load it)."""
    needed = _needed(kernels)
    assert any(name.startswith("libtorch_cpu") for name in needed) and any(name.startswith("libc10") for name in needed)
    assert not any("python" in name for name in needed), needed


def test_prebuilt_library_from_the_environment(kernels, tmp_path):
    """DPFIT_OPS_LIBRARY: that library is loaded, nothing built (the extensions folder stays empty), the
    Python parts registered (a gradient through an op); a missing file is named, and ``required`` says
    how to fix it. A library the host loaded before dpfit (torch.ops.load_library) is used as it is."""
    code = ("import torch; from dpfit.model.kernels import load_library, library_path\n"
            "path = load_library(required=False); print(path == library_path(), path)\n"
            "if path:\n"
            "    g = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)\n"
            "    torch.ops.dpfit.descriptor_gram(g, 2).sum().backward(); print(g.grad.shape)\n"
            "load_library(required=True)\n")
    empty = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(empty), "OMP_NUM_THREADS": "1", "DPFIT_OPS_LIBRARY": kernels}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", str(Path(kernels).resolve()), "torch.Size([2,", "4,", "5])"]
    assert not empty.exists()
    env["DPFIT_OPS_LIBRARY"] = str(tmp_path / "missing.so")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[:2] == ["True", "None"] and out.returncode != 0
    assert out.stderr.count(f"DPFIT_OPS_LIBRARY={tmp_path / 'missing.so'}: no such file") == 2  # warning, error
    assert "pip install dpfit[kernels]" in out.stderr and not empty.exists()
    del env["DPFIT_OPS_LIBRARY"]
    code = f"import torch; torch.ops.load_library({kernels!r})\n" + code
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[:2] == ["True", kernels], out.stderr[-3000:]
    assert not empty.exists()


def test_fake_implementations_from_the_named_module(kernels, tmp_path):
    """The library names the module of its fake implementations (set_python_module; torch checks the
    name when a fake runs): a process that loaded the library by itself and imports just that module
    traces an op with symbolic fake tensors (make_fx)."""
    code = (f"import sys, torch; torch.ops.load_library({kernels!r})\n"
            "import dpfit.model.kernels.registration\n"
            "from torch.fx.experimental.proxy_tensor import make_fx\n"
            "g = torch.rand(3, 4, 6, dtype=torch.float64)\n"
            "graph = make_fx(lambda g: torch.ops.dpfit.descriptor_gram(g, 2), tracing_mode='symbolic')(g).graph\n"
            "print([str(n.target) for n in graph.nodes if n.op == 'call_function'],"
            " 'dpfit.model.kernels.library' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["['dpfit.descriptor_gram.default']", "True"]
    from dpfit.model.kernels import library_path

    assert library_path() == kernels  # (this process: the library loaded once)


@pytest.mark.slow
def test_cmake_build(kernels, tiny_model, tmp_path):
    """CMakeLists.txt builds libdpfit_ops.so against this torch (find_package(Torch)) with the ninja
    build's instruction set; a fresh process loads it and runs the TorchScript module: the ninja-built
    library's outputs bit for bit; it needs no Python either."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    source = Path(kernel_library.__file__).parent
    isa = {"AVX512": ["-DDPFIT_AVX512=ON"], "AVX2": []}.get(torch.backends.cpu.get_cpu_capability(), ["-DDPFIT_AVX2=OFF"])
    build = tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ([cmake, "-S", str(source), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     *isa], [cmake, "--build", str(build), "-j", "2"]):
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    library = build / "libdpfit_ops.so"
    assert not any("python" in name for name in _needed(str(library)))
    inputs = _fresh_inputs(tiny_model)
    got = _run_fresh(str(library), inputs, tmp_path)
    want = _same_outputs(inputs)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
