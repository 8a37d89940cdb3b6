"""The compiled CPU kernels (dpfit.model.kernels) one by one: the same values and gradients as the
PyTorch path for single nets and products, gradchecks, the edge cases of the row bookkeeping, and how
they are chosen, built and cached. Whole models against the reference: tests/test_parity.py.

The kernels are built on first use (minutes, then cached). Outside CI a machine without a C++ compiler
skips these tests; in CI (``CI`` set) the build must succeed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from dpfit.model.kernels.embedding import BLOCK_ROWS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from dpfit.data.neighbor import build_neighbor_list
from dpfit.model import EnergyModel
from dpfit.model.kernels import build as kernel_build
from dpfit.model.kernels import compiled_kernels, compiled_kernels_mode, ops, set_compiled_kernels
from dpfit.model.network import ResidualMLP
from dpfit.training.module import DeepPotentialModule

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NETS = {"deepmd_25_50_100": ([25, 50, 100], False), "resnet_dt": ([6, 12, 12], True),
        "first_layer_residual": ([2, 4, 3], True), "first_layer_equal": ([1, 1], False), "one_layer": ([7], False),
        # widths that fill whole vectors (8 float64 / 16 float32 lanes) of the AVX-512 product kernel
        "lane_multiples": ([16, 32, 64], False)}


@pytest.fixture(scope="module")
def kernels():
    """Compiled kernels on for the module's tests (the process override), the override before afterwards."""
    before = compiled_kernels_mode()
    try:
        set_compiled_kernels("on")
    except RuntimeError as exc:
        set_compiled_kernels(before)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"compiled kernels unavailable here: {exc}")
    yield compiled_kernels("on")
    set_compiled_kernels(before)


def _params(net: ResidualMLP) -> list[torch.Tensor]:
    return [p for layer in net.layers for p in (layer.matrix, layer.bias, layer.idt) if p is not None]


def _value_tangent_grads(net: ResidualMLP, s: torch.Tensor, mode: str):
    set_compiled_kernels(mode)
    s = s.detach().clone().requires_grad_(True)
    g, t = net.value_and_tangent(s)
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(g.shape, dtype=g.dtype, generator=gen)
    w2 = torch.randn(t.shape, dtype=t.dtype, generator=gen)
    loss = (g * w1).sum() + ((t * w2) ** 2).sum()
    grads = torch.autograd.grad(loss, [s, *_params(net)]) if g.numel() else []
    return g.detach(), t.detach(), grads, type(g.grad_fn).__name__


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
    set_compiled_kernels("on")
    assert fn == ops.backward_node("value_and_tangent") and fn_ref == "ValueAndTangentBackward"
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
        lambda s, *p: ops.value_and_tangent(s, list(p), kinds, has_idt, True)[:2], (s, *params))


def test_kernel_without_autograd_equals_plain_path(kernels):
    net = ResidualMLP(1, [25, 50, 100], False, generator=torch.Generator().manual_seed(2))
    s = torch.rand(300, 1, dtype=torch.float64)
    with torch.no_grad():
        g, t = net.value_and_tangent(s)
        set_compiled_kernels("off")
        g_ref, t_ref = net.value_and_tangent(s)
        set_compiled_kernels("on")
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(t, t_ref, rtol=1e-13, atol=1e-13)


FITTING_NETS = {"deepmd_240x3_resnet_dt": ([24, 24, 24], True), "doubling": ([8, 16], False),
                "one_layer": ([9], True), "no_residual": ([12, 5], False)}


def _fitting_outputs(net: ResidualMLP, x: torch.Tensor, mode: str, with_energy: bool, with_grad: bool):
    set_compiled_kernels(mode)
    x = x.detach().clone().requires_grad_(True)
    energy, grad = net.energy_and_input_grad(x)
    gen = torch.Generator().manual_seed(6)
    loss = x.new_zeros(())
    if with_energy:
        loss = loss + (energy * torch.randn(energy.shape, dtype=x.dtype, generator=gen)).sum()
    if with_grad:
        loss = loss + ((grad * torch.randn(grad.shape, dtype=x.dtype, generator=gen)) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, *_params(net)], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *_params(net)])]
    return energy.detach(), grad.detach(), grads, type(energy.grad_fn).__name__


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
    set_compiled_kernels("on")
    assert fn == ops.backward_node("fitting") and fn_ref != fn
    eps = 1e-12 if dtype == torch.float64 else 1e-4
    for a, b in zip([e, g, *grads], [e_ref, g_ref, *ref]):
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * max(scale, 1.0))
    with torch.no_grad():  # the forward alone (inference)
        e_ng, g_ng = net.energy_and_input_grad(x)
    torch.testing.assert_close(e_ng, e, rtol=eps, atol=eps)
    torch.testing.assert_close(g_ng, g, rtol=eps, atol=eps)


def test_fitting_kernel_gradcheck(kernels):
    net = ResidualMLP(4, [5, 5, 10], True, out_dim=1, generator=torch.Generator().manual_seed(4))
    layers = list(net.layers)
    kinds = [layer.kind for layer in layers[:-1]]
    has_idt = [layer.idt is not None for layer in layers[:-1]]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in _params(net)]
    assert torch.autograd.gradcheck(lambda x, *p: ops.fitting(x, list(p), kinds, has_idt, True)[:2], (x, *params))


def _assert_kernels_match_pytorch(model, inputs: dict, nodes: tuple[str, ...] = ()) -> None:
    """Energies, forces, virials and an energy + force + virial loss's parameter gradients equal with
    the kernels on and off; ``nodes``: autograd nodes the forces' graph holds exactly when they are on."""
    outs, grads = {}, {}
    for mode in ("on", "off"):
        set_compiled_kernels(mode)
        model.zero_grad()
        out = model(**inputs, do_force=True, do_virial=True, create_graph=True)
        graph = _graph_nodes(out["force"])
        for node in nodes:
            assert (node in graph) == (mode == "on"), node
        (out["energy"].sum() + out["force"].square().sum() + out["virial"].square().sum()).backward()
        outs[mode] = {k: v.detach() for k, v in out.items()}
        grads[mode] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    set_compiled_kernels("on")
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
        names.add(type(fn).__name__)
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
    _assert_kernels_match_pytorch(model, inputs, tuple(ops.backward_node(name) for name in (
        "slot_env", "slot_gt", "env_jacobian", "fitting", "descriptor_gram", "descriptor_vjp", "value_and_tangent")))


@pytest.mark.parametrize("periodic", [True, False])
def test_compiled_reverse_slots_equal_python(kernels, tiny_model, random_frame, periodic):
    """The compiled reverse-pair search gives the flat partner slots of dpfit.model.index_facts.reverse_slots,
    on a small triclinic cell (atoms see their own images) and a cluster; some pairs are cut by sel."""
    from dpfit.model.index_facts import reverse_slots

    model = tiny_model()
    frames = [random_frame(seed=s, natoms=14 if periodic else 8, periodic=periodic) for s in (11, 12)]
    nls = [build_neighbor_list(c, t, b, model.rcut, [6, 7], warn=False) for c, t, b in frames]
    nlist = torch.from_numpy(np.stack([nl.nlist for nl in nls]))
    atype = torch.from_numpy(np.stack([np.asarray(t) for _, t, _ in frames]))
    shift = torch.from_numpy(np.stack([nl.shift for nl in nls])) if periodic else None
    slot_type = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 7]))
    ref = reverse_slots(nlist, shift, atype, slot_type)
    sections = [0, 6, 13]
    got = kernels.reverse_slots(nlist.long().contiguous(),
                                torch.empty(0, dtype=torch.long) if shift is None else shift.long().contiguous(),
                                atype.long().contiguous(), sections)
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
    order, ptr = kernels.slots_of_rows(index, rows)
    assert torch.autograd.gradcheck(lambda g: ops.slot_gt(g, index, r, order, ptr)[0], (g,))

    def chained(g, b):  # slot_env on slot_gt's rows, with its handle: its row gradient is summed into slot_gt's backward
        out, rows_grad = ops.slot_gt(g, index, r, order, ptr)
        return out, ops.slot_env(g, g * 2, index, index != 4, b, order, ptr, rows_grad)[0]

    assert torch.autograd.gradcheck(chained, (g, gbar))
    valid = index != 4  # row 4 plays the padding row
    assert torch.autograd.gradcheck(lambda g, t, b: ops.slot_env(g, t, index, valid, b, order, ptr, None),
                                    (g, t, gbar))
    padded = g[index]  # the padded layout: the same contraction
    torch.testing.assert_close(ops.slot_gt(g, index, r, order, ptr)[0], r.transpose(1, 2) @ padded)
    part, tds = ops.slot_env(g, t, index, valid, gbar, order, ptr, None)
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
    got = kernels.slots_of_rows(index, 44)
    want_order = torch.argsort(index.reshape(-1), stable=True)
    want_ptr = torch.zeros(45, dtype=torch.long)
    torch.cumsum(torch.bincount(index.reshape(-1), minlength=44), 0, out=want_ptr[1:])
    assert torch.equal(got[0], want_order) and torch.equal(got[1], want_ptr)
    assert int(got[1][-1]) == index.numel()
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.slots_of_rows(index, 41)


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
            d, v = ops.descriptor_gram(gg, a), ops.descriptor_vjp(gg, ww)
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
    assert torch.autograd.gradcheck(lambda g: ops.descriptor_gram(g, 2), (g,))
    assert torch.autograd.gradcheck(lambda g, w: ops.descriptor_vjp(g, w), (g, w))


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
    """Each op's arguments in a training step of a tiny periodic float64 model (two types, an excluded
    pair, a net per type pair, reverse pairs sharing rows, padded slots)."""
    from conftest import make_random_frame, make_tiny_model

    model = make_tiny_model(type_one_side=False, exclude_types=[[0, 1]])
    coord, atype, box = make_random_frame(seed=5, natoms=12)
    with _FirstOpCalls() as mode:
        out = model(**_frame_inputs(model, coord, atype, box), do_force=True, do_virial=True, create_graph=True)
        (out["energy"].sum() + out["force"].square().sum() + out["virial"].square().sum()).backward()
    return mode.calls


def test_every_op_runs_in_a_training_step(op_calls):
    assert set(op_calls) == {op.name for op in ops._OPS}
    assert all(hasattr(torch.ops.dpfit, name) for name in op_calls)


@pytest.mark.parametrize("name", sorted(op.name for op in ops._OPS))
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


class _PassThrough(TorchDispatchMode):
    """Every op as it is, the dpfit ops' names noted."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dpfit":
            self.seen.add(func._opname)
        return func(*args, **(kwargs or {}))


def test_dispatcher_path_equals_eager_shortcut(kernels, tiny_model, random_frame):
    """In eager mode on plain CPU tensors an op call goes to its autograd kernel directly; through the
    dispatcher (forced here by a dispatch mode) a training step's outputs and gradients are the same,
    bit for bit, and the graph holds the same nodes."""
    model = tiny_model(type_one_side=False)
    coord, atype, box = random_frame(seed=3, natoms=10)
    inputs = _frame_inputs(model, coord, atype, box)
    results = []
    mode = _PassThrough()
    for dispatcher in (False, True):
        model.zero_grad()
        with mode if dispatcher else contextlib.nullcontext():
            out = model(**inputs, do_force=True, do_virial=True, create_graph=True)
            nodes = _graph_nodes(out["force"])
            (out["energy"].sum() + out["force"].square().sum() + out["virial"].square().sum()).backward()
        results.append(([v.detach() for v in out.values()], [p.grad.clone() for p in model.parameters()], nodes))
    (outs, grads, nodes), (outs_d, grads_d, nodes_d) = results
    assert all(torch.equal(a, b) for a, b in zip(outs + grads, outs_d + grads_d))
    assert nodes == nodes_d and ops.backward_node("slot_gt") in nodes
    assert mode.seen == {op.name for op in ops._OPS}  # (every op went through the dispatcher)


def test_ops_under_torch_compile_and_fx(kernels):
    """torch.compile (full graph, AOT autograd) and make_fx trace the ops as graph nodes, through the
    same Python entry points the model calls; values and gradients as in eager mode."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(g, w):
        return ops.descriptor_gram(g, 2).sum() + ops.descriptor_vjp(g, w).square().sum()

    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    want = f(g, w), *torch.autograd.grad(f(g, w), (g, w))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(g, w), *torch.autograd.grad(compiled(g, w), (g, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    graph = make_fx(lambda g, w: ops.descriptor_vjp(g, w))(g.detach(), w.detach()).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch.ops.dpfit.descriptor_vjp.default]


def test_not_differentiable_op_says_so(kernels):
    index = torch.tensor([[0, 1], [1, 0]])
    order, ptr = ops.slots_of_rows(index, 2)
    coef = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    rows = ops.slot_rows(coef, torch.randn(2, 4, 3, dtype=torch.float64), order, ptr, 2, 2, None)
    with pytest.raises(RuntimeError, match="dpfit::slot_rows is not differentiable"):
        rows.sum().backward()


def _frame_inputs(model, coord, atype, box) -> dict:
    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel)
    return {"coord": torch.from_numpy(coord[None].copy()), "atype": torch.from_numpy(atype[None].copy()),
            "nlist": torch.from_numpy(nl.nlist[None].copy()), "box": torch.from_numpy(box[None].copy()),
            "shift": torch.from_numpy(nl.shift[None].copy())}


def test_ase_calculator_with_kernels(kernels, tiny_model, random_frame):
    """DPCalculator(kernels=...) sets the model's kernels option; energies, forces and stress as without."""
    from ase import Atoms

    from dpfit.calculators.ase import DPCalculator

    model = tiny_model(sel=[24, 24])
    model.type_map = ["Cu", "Ni"]
    coord, atype, box = random_frame(seed=9, natoms=10)
    results = {}
    set_compiled_kernels(None)  # the model's option decides
    try:
        for mode in ("off", "on"):
            atoms = Atoms(symbols=[model.type_map[t] for t in atype], positions=coord, cell=box, pbc=True)
            atoms.calc = DPCalculator(model, kernels=mode)
            assert atoms.calc.model.kernels == mode and atoms.calc.model.fitting.nets[0].kernels == mode
            with torch.enable_grad():  # (the kernels' autograd nodes show they ran)
                out = model(**_frame_inputs(model, coord, atype, box), create_graph=True)
            assert (ops.backward_node("fitting") in _graph_nodes(out["force"])) == (mode == "on")
            results[mode] = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    finally:
        set_compiled_kernels("on")
    for a, b in zip(results["on"], results["off"]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_kernel_skipped_where_it_does_not_apply(kernels):
    """A net whose input is wider than one channel (the fitting net) keeps the PyTorch path."""
    net = ResidualMLP(3, [4, 8], False, generator=torch.Generator().manual_seed(4))
    assert net._compiled_kernel(torch.zeros(2, 3, dtype=torch.float64)) is None
    net1 = ResidualMLP(1, [4, 8], False, generator=torch.Generator().manual_seed(4))
    assert net1._compiled_kernel(torch.zeros(2, 1, dtype=torch.float64)) is kernels


def test_mode_is_validated(tiny_model):
    before = compiled_kernels_mode()
    with pytest.raises(ValueError, match="kernels='fast'"):
        set_compiled_kernels("fast")
    with pytest.raises(ValueError, match="kernels='fast'"):
        DeepPotentialModule(model={}, loss=None, schedule=None, kernels="fast")
    with pytest.raises(ValueError, match="model.kernels='fast'"):
        EnergyModel.from_config({**tiny_model().config, "kernels": "fast"})
    assert compiled_kernels_mode() == before


def test_failed_build_falls_back_or_raises(monkeypatch, caplog):
    """``auto``: a failed build leaves the PyTorch path with a warning naming the cause; ``on`` raises."""

    def broken():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(kernel_build, "_build", broken)
    monkeypatch.setattr(kernel_build, "_extension", None)
    monkeypatch.setattr(kernel_build, "_failure", None)
    monkeypatch.setattr(kernel_build, "_warned", False)
    monkeypatch.setattr(kernel_build, "_override", None)
    with caplog.at_level("WARNING", logger="dpfit.model.kernels.build"):
        assert compiled_kernels("auto") is None
        assert compiled_kernels("auto") is None
    assert caplog.text.count("no C++ compiler found") == 1  # warned once
    assert compiled_kernels("off") is None
    with pytest.raises(RuntimeError, match=r"could not be built \(OSError: no C\+\+ compiler found\)"):
        compiled_kernels("on")


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_module_kernels_is_the_model_option(tiny_model, mode):
    """train.yaml's ``kernels`` (when set) overrides ``model.kernels``; the option is stored in the
    checkpoint's model config and set on every net of the model."""
    from dpfit.io.checkpoint import MODEL_CONFIG_KEY
    from dpfit.training.loss import EnergyLoss
    from dpfit.training.schedule import ExponentialDecay

    config = {**tiny_model().config, "kernels": "on"}
    module = DeepPotentialModule(model=config, loss=EnergyLoss(), schedule=ExponentialDecay(), kernels=mode)
    assert module.model.kernels == mode and module.hparams[MODEL_CONFIG_KEY]["kernels"] == mode
    assert {m.kernels for m in module.model.modules() if isinstance(m, ResidualMLP)} == {mode}
    module = DeepPotentialModule(model=config, loss=EnergyLoss(), schedule=ExponentialDecay())
    assert module.model.kernels == "on"


def test_build_says_so_first_and_cache_is_reused(tmp_path, monkeypatch, caplog):
    """The first build logs a message with the expected duration before it starts; the folder is keyed
    by the sources (not by paths of the environment), and a finished build is imported directly."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    events = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        events.append(("load", [r.getMessage() for r in caplog.records]))
        (Path(build_directory) / f"{name}.so").write_text("")
        return "module"

    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(kernel_build, "_import", lambda name, library: events.append(("import", library)) or "cached")
    with caplog.at_level("WARNING", logger="dpfit.model.kernels.build"):
        assert kernel_build._build() == "module"
        assert events[0][0] == "load" and any("building the compiled CPU kernels" in m and "minutes" in m
                                              for m in events[0][1])
        assert kernel_build._build() == "cached"
    (folder,) = tmp_path.iterdir()
    assert events[1] == ("import", next(folder.glob("*.so")))
    (folder / "complete").unlink()  # an unfinished build whose process was killed: the lock file is named
    (folder / "lock").write_text("")
    with caplog.at_level("WARNING", logger="dpfit.model.kernels.build"):
        assert kernel_build._build() == "module"
    assert f"delete {folder / 'lock'}" in caplog.text
    key = kernel_build._cache_dir("x", [])
    monkeypatch.setattr(kernel_build.sys, "prefix", "/another/venv")  # another environment: the same folder
    assert kernel_build._cache_dir("x", []) == key
    monkeypatch.setattr(kernel_build, "SOURCES", kernel_build.SOURCES[:-1])  # other sources: another folder
    assert kernel_build._cache_dir("x", []) != key


def test_environment_variable_overrides_every_model():
    """DPFIT_KERNELS=off wins over a model's kernels=on (no build, the PyTorch path); a bad value is named."""
    import subprocess
    import sys

    code = ("from dpfit.model.kernels import compiled_kernels, compiled_kernels_mode; "
            "print(compiled_kernels_mode(), compiled_kernels('on'))")
    env = {**os.environ, "DPFIT_KERNELS": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["off", "None"], out.stderr
    env["DPFIT_KERNELS"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "DPFIT_KERNELS='fast': choose one of off, auto, on" in out.stderr
