"""The Python parts of the dpfit op library (``csrc/ops.cpp``): each op's fake implementation (output
shapes and dtypes, for ``torch.compile``, ``torch.fx`` and ``torch.export``; where an output's size
depends on the data, ``block_rows``, it is a dynamic size) and the backward formulas of the ops the model
differentiates (``torch.library.register_autograd``), written with the other ops. Asking a gradient of
the other ops (backward kernels, index bookkeeping) is an error: the kernels are differentiated once.

:func:`register` runs once the library is loaded (:func:`dpfit.model.kernels.library.load_library`); the
library names this module (``set_python_module``), so torch imports it when it needs a fake
implementation in a process that loaded the library by itself.

Ops (CPU, float32/64 unless said):

- embedding nets: ``value_and_tangent`` (autograd), ``value_and_tangent_backward``
- fitting nets: ``fitting`` (autograd), ``fitting_backward``
- environment: ``env_geometry``, ``env_jacobian`` (autograd), ``reverse_slots`` (int64)
- embedding rows: ``block_rows``, ``slots_of_rows`` (int64)
- slot contractions: ``slot_gt`` (autograd), ``slot_rows``, ``slot_env`` (autograd),
  ``slot_rows_value_and_tangent``, ``slot_env_gbar``
- descriptor products: ``descriptor_gram`` (autograd), ``descriptor_vjp`` (autograd), ``descriptor_cross_gram``

The forward ops that keep activations for their backward (``value_and_tangent``, ``fitting``) return
them as extra outputs when ``keep`` is set (an op holds no hidden state); those outputs carry no
gradient. ``slot_gt`` also returns a handle on its rows' gradient (zeros shaped like G, stride 0): an op
that reads G later and passes the handle (``slot_env``) sends its gradient for G there, and slot_gt's
backward adds its own to it in one pass over the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the ops of the library, in the order of csrc/ops.cpp
OPS = ("value_and_tangent", "value_and_tangent_backward", "fitting", "fitting_backward", "env_geometry",
       "env_jacobian", "reverse_slots", "block_rows", "slots_of_rows", "slot_gt", "slot_rows", "slot_env",
       "slot_rows_value_and_tangent", "slot_env_gbar", "descriptor_gram", "descriptor_vjp", "descriptor_cross_gram")
#: the ops with a backward formula; the others raise when a gradient is asked of them
DIFFERENTIABLE = ("value_and_tangent", "fitting", "env_jacobian", "slot_gt", "slot_env", "descriptor_gram",
                  "descriptor_vjp")

_registered = False


def backward_node(name: str) -> str:
    """The class name of the autograd node that op ``dpfit::<name>`` records (e.g. to check that a
    kernel ran: ``backward_node("fitting") in {type(fn).__name__ for fn in graph}``)."""
    return f"GeneratedBackwardFor_dpfit_{name}_defaultBackward"


def _layers(has_idt, params, empty):
    """(matrices, biases, idts) per layer from the flat parameters (matrix, bias (, idt) per layer; an
    empty tensor for a layer without idt)."""
    matrices, biases, idts = [], [], []
    p = 0
    for with_idt in has_idt:
        matrices.append(params[p])
        biases.append(params[p + 1])
        idts.append(params[p + 2] if with_idt else empty)
        p += 3 if with_idt else 2
    return matrices, biases, idts


def _fit_layers(has_idt, params, empty):
    """(matrices, biases, idts): per tanh layer matrix, bias (, idt), then the output layer's matrix and bias."""
    matrices, biases, idts = _layers(has_idt, params[:-2], empty)
    return matrices + [params[-2]], biases + [params[-1]], idts


def layer_grads(has_idt, per_layer: list[Tensor]) -> list[Tensor]:
    """A kernel backward's (dW, db, didt) per layer, flattened like the parameters (no didt where a
    layer has no idt)."""
    grads: list[Tensor] = []
    for k, with_idt in enumerate(has_idt):
        grads += per_layer[3 * k: 3 * k + (3 if with_idt else 2)]
    return grads


# ------------------------------------------------------------------------------------------------
# fake implementations


def _value_and_tangent_fake(s, params, kinds, has_idt, keep):
    matrices = _layers(has_idt, params, s)[0]
    rows = s.shape[0]
    kept = [s.new_empty(rows, w.shape[1]) for _ in range(2) for w in matrices] if keep else []
    width = matrices[-1].shape[1]
    return s.new_empty(rows, width), s.new_empty(rows, width), kept


def _value_and_tangent_backward_fake(s, grad_g, grad_t, kept, params, kinds, has_idt, need_s):
    empty = s.new_empty(0)
    out = [s.new_empty(s.shape) if need_s else empty]
    for layer in zip(*_layers(has_idt, params, empty)):
        out += [p.new_empty(p.shape) for p in layer]
    return out


def _fitting_fake(x, params, kinds, has_idt, keep):
    matrices = _fit_layers(has_idt, params, x)[0][:-1]
    rows = x.shape[0]
    kept = [x.new_empty(rows, w.shape[1]) for _ in range(4) for w in matrices] if keep else []
    return x.new_empty(rows, 1), x.new_empty(x.shape), kept


def _fitting_backward_fake(x, grad_e, grad_g, kept, params, kinds, has_idt, need_x):
    empty = x.new_empty(0)
    matrices, biases, idts = _fit_layers(has_idt, params, empty)
    out = [x.new_empty(x.shape) if need_x else empty]
    for layer in zip(matrices, biases, idts):
        out += [p.new_empty(p.shape) for p in layer]
    return out + [p.new_empty(p.shape) for p in params[-2:]]


def _env_geometry_fake(coord, nlist, shift, box, atype, davg, dstd, keep, slot_type, rcut_smth, rcut, far):
    # coord (nf, nall, 3) with nall >= nloc (LAMMPS-style extended atoms); one output row per slot of nlist
    torch._check(coord.shape[1] >= nlist.shape[1])
    shape = tuple(nlist.shape)
    return coord.new_empty(*shape, 3), coord.new_empty(*shape, 4), coord.new_empty(*shape, 3, 4)


def _env_jacobian_fake(jac, v, transpose):
    return v.new_empty(*jac.shape[:-2], 4 if transpose else 3)


def _reverse_slots_fake(nlist, shift, atype, sections):
    # nlist may index nall >= nloc atoms (atype (nf, nall)); one flat slot (or -1) per slot of nlist
    torch._check(atype.shape[1] >= nlist.shape[1])
    return nlist.new_empty(nlist.shape)


def _block_rows_fake(s, mask, atype, partner, lo, kept, centers, pad):
    ctx = torch.library.get_ctx()
    return [atype.new_empty(s.shape[0], kept)] + [s.new_empty(ctx.new_dynamic_size(), 1) for _ in centers]


def _slots_of_rows_fake(index, n_rows):
    return index.new_empty(index.numel()), index.new_empty(n_rows + 1)


def _slot_gt_fake(g, index, r, order, ptr):
    return g.new_empty(index.shape[0], 4, g.shape[1]), g.new_zeros(()).expand(g.shape)


def _slot_rows_fake(coef, per_atom, order, ptr, n_rows, k, base):
    return per_atom.new_empty(n_rows, per_atom.shape[2])


def _slot_env_fake(g, t, index, valid, gbar, order, ptr, rows_grad):
    return g.new_empty(*index.shape, 4), g.new_empty(*index.shape, 4)


def _slot_rows_value_and_tangent_fake(coef_a, coef_b, per_atom, order, ptr, valid, n_rows, k):
    return per_atom.new_empty(n_rows, per_atom.shape[2]), per_atom.new_empty(n_rows, per_atom.shape[2])


def _slot_env_gbar_fake(g, t, index, valid, grad_part, grad_tds):
    return g.new_empty(index.shape[0], 4, g.shape[1])


def _descriptor_gram_fake(g, a):
    return g.new_empty(g.shape[0], g.shape[2], a)


def _descriptor_vjp_fake(g, w):
    return g.new_empty(g.shape)


def _descriptor_cross_gram_fake(x, y, a, symmetric):
    return x.new_empty(x.shape[0], x.shape[2], a)


# ------------------------------------------------------------------------------------------------
# backward formulas: setup_context(ctx, inputs, output) after the forward, backward(ctx, *grads) a
# gradient (or None) per input, a list for a list of tensors (torch.library.register_autograd)


def _kept_activations_setup(name: str):
    """The ``setup_context`` of a net op (``value_and_tangent``, ``fitting``): inputs (x, params, kinds,
    has_idt, keep), outputs (value, gradient or tangent, kept activations); saves x, the activations and
    the parameters."""

    def setup(ctx, inputs, output):
        x, params, kinds, has_idt, keep = inputs
        if not keep:
            raise RuntimeError(f"dpfit::{name}: keep=False while autograd records")
        kept = output[2]
        ctx.kinds, ctx.has_idt = kinds, has_idt
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # a missing gradient (None) is zero to the kernel
        ctx.save_for_backward(x, *kept, *params)

    return setup


def _value_and_tangent_grad(ctx, grad_g, grad_t, _grad_kept):
    s, *rest = ctx.saved_tensors
    n = 2 * len(ctx.kinds)
    kept, params = rest[:n], rest[n:]
    like = kept[n // 2 - 1]  # the last layer's h: (rows, M)
    grad_g = torch.zeros_like(like) if grad_g is None else grad_g
    grad_t = torch.zeros_like(like) if grad_t is None else grad_t
    need_s = ctx.needs_input_grad[0]
    grad_s, *per_layer = torch.ops.dpfit.value_and_tangent_backward(s, grad_g, grad_t, kept, params, ctx.kinds,
                                                                    ctx.has_idt, need_s)
    return grad_s if need_s else None, layer_grads(ctx.has_idt, per_layer), None, None, None


def _fitting_grad(ctx, grad_e, grad_g, _grad_kept):
    x, *rest = ctx.saved_tensors
    n = 4 * len(ctx.kinds)
    kept, params = rest[:n], rest[n:]
    need_x = ctx.needs_input_grad[0]
    grad_x, *per_layer = torch.ops.dpfit.fitting_backward(x, grad_e, grad_g, kept, params, ctx.kinds, ctx.has_idt,
                                                          need_x)
    grads = layer_grads(ctx.has_idt, per_layer[:-2]) + per_layer[-2:]
    return grad_x if need_x else None, grads, None, None, None


def _env_jacobian_setup(ctx, inputs, output):
    ctx.transpose = inputs[2]
    ctx.save_for_backward(inputs[0])


def _env_jacobian_grad(ctx, grad):
    (jac,) = ctx.saved_tensors
    grad_v = torch.ops.dpfit.env_jacobian(jac, grad, not ctx.transpose) if ctx.needs_input_grad[1] else None
    return None, grad_v, None


def _slot_gt_setup(ctx, inputs, output):
    g, index, r, order, ptr = inputs
    ctx.n_rows, ctx.k = g.shape[0], index.shape[1]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(r, order, ptr)


def _slot_gt_grad(ctx, grad, grad_rows):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if grad is None:
        return grad_rows, None, None, None, None
    r, order, ptr = ctx.saved_tensors
    return torch.ops.dpfit.slot_rows(r, grad, order, ptr, ctx.n_rows, ctx.k, grad_rows), None, None, None, None


def _slot_env_setup(ctx, inputs, output):
    g, t, index, valid, gbar, order, ptr, rows_grad = inputs
    ctx.n_rows, ctx.k, ctx.to_handle = g.shape[0], index.shape[1], rows_grad is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g, t, index, valid, gbar, order, ptr)


def _slot_env_grad(ctx, grad_part, grad_tds):
    g, t, index, valid, gbar, order, ptr = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_part is None and grad_tds is None:
        return None, None, None, None, None, None, None, None
    grad_part = g.new_zeros(index.shape + (4,)) if grad_part is None else grad_part
    grad_tds = g.new_zeros(index.shape + (4,)) if grad_tds is None else grad_tds
    # G's gradient goes to the handle when there is one (and G gets none), else to G
    need_g = need[7] if ctx.to_handle else need[0]
    grad_g = grad_t = grad_gbar = None
    if need_g or need[1]:
        grad_g, grad_t = torch.ops.dpfit.slot_rows_value_and_tangent(grad_part, grad_tds, gbar, order, ptr, valid,
                                                                     ctx.n_rows, ctx.k)
    if need[4]:
        grad_gbar = torch.ops.dpfit.slot_env_gbar(g, t, index, valid, grad_part, grad_tds)
    grad_g = grad_g if need_g else None
    return (None if ctx.to_handle else grad_g, grad_t if need[1] else None, None, None, grad_gbar, None, None,
            grad_g if ctx.to_handle else None)


def _descriptor_gram_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0])


def _descriptor_gram_grad(ctx, grad):
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None
    (g,) = ctx.saved_tensors
    return torch.ops.dpfit.descriptor_vjp(g, grad), None


def _descriptor_vjp_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _descriptor_vjp_grad(ctx, grad):
    if grad is None:
        return None, None
    g, w = ctx.saved_tensors
    grad_g = torch.ops.dpfit.descriptor_vjp(grad, w) if ctx.needs_input_grad[0] else None
    grad_w = torch.ops.dpfit.descriptor_cross_gram(grad, g, w.shape[2], True) if ctx.needs_input_grad[1] else None
    return grad_g, grad_w


_AUTOGRAD = {
    "value_and_tangent": (_value_and_tangent_grad, _kept_activations_setup("value_and_tangent")),
    "fitting": (_fitting_grad, _kept_activations_setup("fitting")),
    "env_jacobian": (_env_jacobian_grad, _env_jacobian_setup),
    "slot_gt": (_slot_gt_grad, _slot_gt_setup),
    "slot_env": (_slot_env_grad, _slot_env_setup),
    "descriptor_gram": (_descriptor_gram_grad, _descriptor_gram_setup),
    "descriptor_vjp": (_descriptor_vjp_grad, _descriptor_vjp_setup),
}


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"dpfit::{name} is not differentiable (a backward kernel or index bookkeeping)")

    return backward


def register() -> None:
    """Registers the fake implementations and backward formulas of every op (once per process); the
    library (``torch.ops.dpfit``) must be loaded."""
    global _registered
    if _registered:
        return
    fakes = globals()
    for name in OPS:
        qualname = f"dpfit::{name}"
        torch.library.register_fake(qualname, fakes[f"_{name}_fake"])
        backward, setup = _AUTOGRAD.get(name, (_not_differentiable(name), None))
        torch.library.register_autograd(qualname, backward, setup_context=setup)
    _registered = True


def _library_loaded() -> bool:
    from dpfit.model.kernels.library import ops_defined

    return ops_defined()


if _library_loaded():  # imported by torch for a fake implementation (the library names this module)
    register()
