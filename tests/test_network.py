"""Dense networks and model autograd Functions: the embedding nets' value + tangent, the fitting
nets' written-out input gradient, the padded-layout row gather and the tall-thin batched product,
against autograd."""

from __future__ import annotations

import pytest
import torch

from dpfit.model.batched_product import TallThinProduct, tall_thin_bmm
from dpfit.model.network import ResidualMLP, row_product
from dpfit.model.tangent_function import ValueAndTangent

NETS = {"deepmd_25_50_100": ([25, 50, 100], False), "resnet_dt": ([6, 12, 12], True),
        "first_layer_residual": ([2, 4, 3], True), "first_layer_equal": ([1, 1], False)}


def _plain_value_and_tangent(net: ResidualMLP, s: torch.Tensor):
    net.fused_tangent = False
    try:
        return net.value_and_tangent(s)
    finally:
        net.fused_tangent = True


def _params(net: ResidualMLP) -> list[torch.Tensor]:
    return [p for layer in net.layers for p in (layer.matrix, layer.bias, layer.idt) if p is not None]


@pytest.mark.parametrize("name", list(NETS), ids=list(NETS))
def test_fused_value_and_tangent_equals_plain_path(name):
    neuron, resnet_dt = NETS[name]
    net = ResidualMLP(1, neuron, resnet_dt, generator=torch.Generator().manual_seed(0))
    assert net.fused_tangent
    s = torch.linspace(-1.5, 2.0, 37, dtype=torch.float64).unsqueeze(-1).requires_grad_(True)
    g, t = net.value_and_tangent(s)
    g_ref, t_ref = _plain_value_and_tangent(net, s)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(t, t_ref, rtol=0, atol=1e-14)
    # a loss using both outputs: identical gradients for every parameter and for s
    w1, w2 = torch.randn_like(g), torch.randn_like(t)
    inputs = [s, *_params(net)]
    grads = torch.autograd.grad((g * w1).sum() + ((t * w2) ** 2).sum(), inputs)
    ref = torch.autograd.grad((g_ref * w1).sum() + ((t_ref * w2) ** 2).sum(), inputs)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_value_and_tangent_gradcheck():
    net = ResidualMLP(1, [3, 6], True, generator=torch.Generator().manual_seed(1))
    s = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    params = _params(net)
    kinds = tuple(layer.kind for layer in net.layers)
    has_idt = tuple(layer.idt is not None for layer in net.layers)
    assert torch.autograd.gradcheck(lambda s, *p: ValueAndTangent.apply(kinds, has_idt, s, *p), (s, *params))


def test_fused_path_only_while_autograd_records():
    net = ResidualMLP(1, [4, 8], False, generator=torch.Generator().manual_seed(2))
    s = torch.randn(6, 1, dtype=torch.float64)
    g, _ = net.value_and_tangent(s)
    assert g.grad_fn is not None and "ValueAndTangent" in type(g.grad_fn).__name__
    with torch.no_grad():
        g0, _ = net.value_and_tangent(s)
    torch.testing.assert_close(g0, g.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("resnet_dt", [False, True])
def test_fitting_input_gradient_equals_autograd(resnet_dt):
    net = ResidualMLP(20, [10, 20, 20], resnet_dt, out_dim=1, generator=torch.Generator().manual_seed(3))
    x = torch.randn(7, 20, dtype=torch.float64, requires_grad=True)
    value, grad = net.value_and_input_grad(x, torch.ones(1, dtype=torch.float64))
    (ref,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(value, net(x), rtol=0, atol=0)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-14)


def test_gather_rows_gradient_equals_plain_gather():
    """The padded-layout gather's backward (inverse map + table sums) equals autograd's scatter, also
    when differentiated twice."""
    from dpfit.model.row_gather import GatherRows

    gen = torch.Generator().manual_seed(4)
    n, width, table = 6, 5, 3
    occupied = torch.rand(n, width, generator=gen) < 0.6
    flat = occupied.reshape(-1)
    inverse = torch.nonzero(flat).squeeze(-1)
    n_own = inverse.numel()
    index = torch.where(occupied, (torch.cumsum(flat, 0) - 1).reshape(n, width),
                        n_own + torch.randint(0, table, (n, width), generator=gen))
    pad_slots = torch.nonzero(~flat).squeeze(-1)
    pad_rows = index.reshape(-1)[pad_slots]
    source = torch.randn(n_own + table, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n, width, 4, dtype=torch.float64)
    out = GatherRows.apply(source, index, inverse, pad_slots, pad_rows)
    ref = torch.nn.functional.embedding(index, source)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    (g,) = torch.autograd.grad((out * weight).sum(), source)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), source)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-14)
    # second derivative through the backward (create_graph)
    out = GatherRows.apply(source, index, inverse, pad_slots, pad_rows)
    (g,) = torch.autograd.grad((out**3).sum(), source, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), source)
    ref = torch.nn.functional.embedding(index, source)
    (g_ref,) = torch.autograd.grad((ref**3).sum(), source, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), source)
    torch.testing.assert_close(gg, gg_ref, rtol=0, atol=1e-12)


def test_tall_thin_product_gradients():
    """Same values as bmm, and gradients (first and second order) equal to autograd's."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.testing.assert_close(tall_thin_bmm(a, b), torch.bmm(a, b), rtol=0, atol=0)
    assert tall_thin_bmm(a, b).grad_fn.name() == "TallThinProductBackward"
    assert torch.autograd.gradcheck(TallThinProduct.apply, (a, b))
    assert torch.autograd.gradgradcheck(TallThinProduct.apply, (a, b))
    with torch.no_grad():  # inference: the plain product, no graph
        assert tall_thin_bmm(a, b).grad_fn is None


@pytest.mark.parametrize("rows", [0, 1, 2, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_product_is_addmm(rows, with_bias):
    """The products the nets run as two row halves (a batched product, the BLAS inside libtorch) give addmm's
    numbers and gradients, for even and odd row counts, eager and TorchScript."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    want = torch.addmm(b, x, w, beta=2.0, alpha=0.5) if with_bias else torch.mm(x, w) * 0.5
    scripted = torch.jit.script(row_product)
    for product in (row_product, scripted):
        got = product(x, w, b, 2.0, 0.5)
        assert got.shape == (rows, 3)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    if rows:
        inputs = (x, w, b) if with_bias else (x, w)
        for product in (row_product, scripted):
            assert torch.autograd.gradcheck(lambda *a, f=product: f(a[0], a[1], a[2] if with_bias else None, 2.0, 0.5),
                                            inputs)
