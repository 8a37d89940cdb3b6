"""The Python part of the dpfit op library (``csrc/ops.cpp``): each op's fake implementation (output
shapes and dtypes, for ``torch.compile``, ``torch.fx`` and ``torch.export``; where an output's size
depends on the data, ``block_rows``, it is a dynamic size). The backward formulas are in the library
(``csrc/autograd.cpp``).

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
- tabulated embedding nets (compressed models, inference only): ``tabulated_value_and_tangent``

The forward ops that keep activations for their backward (``value_and_tangent``, ``fitting``) return
them as extra outputs when ``keep`` is set (an op holds no hidden state); those outputs carry no
gradient. ``slot_gt`` also returns a handle on its rows' gradient (zeros shaped like G, stride 0): an op
that reads G later and passes the handle (``slot_env``) sends its gradient for G there, and slot_gt's
backward adds its own to it in one pass over the rows. Asking a gradient of an op without one is an
error ("derivative for dpfit::<name> is not implemented").
"""

from __future__ import annotations

import torch

#: the ops of the library, in the order of csrc/ops.cpp
OPS = ("value_and_tangent", "value_and_tangent_backward", "fitting", "fitting_backward", "env_geometry",
       "env_jacobian", "reverse_slots", "block_rows", "slots_of_rows", "slot_gt", "slot_rows", "slot_env",
       "slot_rows_value_and_tangent", "slot_env_gbar", "descriptor_gram", "descriptor_vjp", "descriptor_cross_gram")
#: the ops of inference only (compressed models: :mod:`dpfit.model.tabulation`), never in a training step
INFERENCE_OPS = ("tabulated_value_and_tangent",)
#: the ops with a backward formula (csrc/autograd.cpp); the others raise when a gradient is asked of them
DIFFERENTIABLE = ("value_and_tangent", "fitting", "env_jacobian", "slot_gt", "slot_env", "descriptor_gram",
                  "descriptor_vjp")

_registered = False


def backward_node(name: str) -> str:
    """The name of the autograd node that op ``dpfit::<name>`` records (e.g. to check that a kernel
    ran: ``backward_node("fitting") in {fn.name() for fn in graph}``)."""
    return f"torch::autograd::CppNode<dpfit::{name}>"


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


def _tabulated_value_and_tangent_fake(s, table, lo, step, n_fine, step_coarse):
    return s.new_empty(s.shape[0], table.shape[2]), s.new_empty(s.shape[0], table.shape[2])


def register() -> None:
    """Registers the fake implementation of every op (once per process); the library
    (``torch.ops.dpfit``) must be loaded."""
    global _registered
    if _registered:
        return
    fakes = globals()
    for name in OPS + INFERENCE_OPS:
        torch.library.register_fake(f"dpfit::{name}", fakes[f"_{name}_fake"])
    _registered = True


def _library_loaded() -> bool:
    from dpfit.model.kernels.library import ops_defined

    return ops_defined()


if _library_loaded():  # imported by torch for a fake implementation (the library names this module)
    register()
