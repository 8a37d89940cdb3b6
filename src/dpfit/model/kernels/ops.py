"""The compiled CPU kernels as registered ``torch.library`` custom ops, ``torch.ops.dpfit.<name>``.

Each op runs one function of the extension (:mod:`dpfit.model.kernels.build`), which it looks up
itself (:func:`extension`): the ops are called only where the kernels are in use, so it is loaded by
then. Every op has a fake implementation (output shapes and dtypes, for ``torch.compile``, ``torch.fx``
and ``torch.export``); where an output's size depends on the data (``block_rows``) it is a dynamic size.
The ops the model differentiates carry their backward (``register_autograd``), written with the other
ops; asking a gradient of the others (backward kernels, index bookkeeping) is an error (the kernels are
differentiated once, as before).

Ops (all CPU, float32/64 unless said):

- embedding nets: ``value_and_tangent`` (autograd), ``value_and_tangent_backward``
- fitting nets: ``fitting`` (autograd), ``fitting_backward``
- environment: ``env_geometry``, ``env_jacobian`` (autograd), ``reverse_slots`` (int64)
- embedding rows: ``block_rows``, ``slots_of_rows`` (int64)
- slot contractions: ``slot_gt`` (autograd), ``slot_rows``, ``slot_env`` (autograd),
  ``slot_rows_value_and_tangent``, ``slot_env_gbar``
- descriptor products: ``descriptor_gram`` (autograd), ``descriptor_vjp`` (autograd), ``descriptor_cross_gram``

The forward ops that keep activations for their backward (``value_and_tangent``, ``fitting``) return
them as extra outputs when ``keep`` is set (custom ops cannot hold hidden state); those outputs carry no
gradient.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from dpfit.model.kernels import build

#: rows per block of the embedding kernel: two layers of 100 channels at 128 rows fit in a core's L2 cache
BLOCK_ROWS = 128


def extension() -> ModuleType:
    """The loaded extension module (built on first use, as ``kernels=on``)."""
    ext = build._extension
    return ext if ext is not None else build._load("on")


_LIB = torch.library.Library("dpfit", "DEF")
_OPS: list[_Op] = []
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
#: the dispatch keys below autograd of plain CPU tensors (no fake or functional tensor, no dispatch mode)
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_PLAIN_CPU = _CPU_KEYS.raw_repr()
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class _Op:
    """The op ``dpfit::<name>`` of an implementation (its schema inferred from the annotations, as
    ``torch.library.custom_op`` does), defined with ``torch.library.Library`` and registered for CPU
    tensors; ``register_fake`` and ``register_autograd`` as a ``custom_op``'s (the same contracts).
    Calling it calls ``torch.ops.dpfit.<name>``, except in plain eager mode (below).

    Not ``custom_op`` itself, for the cost per call (~35 per training step, each between kernels that
    have just swept the caches, where the Python around them runs several times slower than in a
    loop): custom_op guards each call against torch.compile and checks aliases, and its autograd kernel
    (``torch.library.register_autograd``'s) flattens list arguments with pytree, fills in defaults and
    redispatches through the dispatcher, which converts every argument and result to C++ and back. In
    a loop, a small op cost 28 us without a gradient to record and 77 us recording with custom_op, 12
    and 46 us with register_autograd on a Library op, 9 and 26 us with the kernel here; in a water
    training step the dispatcher's conversions alone cost 25-90 us per call.

    So called in eager mode on plain CPU tensors (no torch.compile or other tracing, dispatch or
    torch-function mode, functorch transform or profiler), the call goes where the dispatcher would
    send it, without it: to the autograd kernel when a gradient is to be recorded, else to the CPU
    kernel. Anything else goes through ``torch.ops.dpfit.<name>``.
    """

    def __init__(self, fn):
        self.name = fn.__name__
        self.qualname = f"dpfit::{self.name}"
        schema = torch.library.infer_schema(fn, mutates_args=())
        _LIB.define(self.name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        _LIB.impl(self.name, fn, "CPU")
        self.impl = fn
        self.default = getattr(torch.ops.dpfit, self.name).default
        self.__doc__ = fn.__doc__
        self.differentiable = False
        self.kernel = None  # the autograd kernel
        arguments = self.default._schema.arguments
        self.tensors = [i for i, a in enumerate(arguments) if str(a.type) in ("Tensor", "Optional[Tensor]")]
        self.tensor_lists = [i for i, a in enumerate(arguments) if str(a.type) == "List[Tensor]"]
        _OPS.append(self)

    def __call__(self, *args):
        if self.kernel is not None and self._plain_eager(args):
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                return self.kernel(_CPU_KEYS, *args)
            return self.impl(*args)  # (nothing to record: the CPU kernel, as the autograd kernel would)
        return self.default(*args)

    def _plain_eager(self, args) -> bool:
        """Whether the dispatcher would send this call to the autograd kernel and then the CPU kernel
        with nothing in between: no tracing, mode, transform or profiler, every tensor a plain CPU one."""
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._autograd._profiler_enabled()):
            return False
        for i in self.tensors:
            t = args[i]
            if t is not None and not (type(t) in _PLAIN_TYPES and t.is_cpu):
                return False
        for i in self.tensor_lists:
            for t in args[i]:
                if not (type(t) in _PLAIN_TYPES and t.is_cpu):
                    return False
        return True

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward, setup_context=None) -> None:
        """The op's autograd kernel, as ``torch.library.register_autograd(backward, setup_context=...)``:
        ``setup_context(ctx, inputs, output)`` after the forward, ``backward(ctx, *grads)`` returning a
        gradient (or None) per input, a list for a list of tensors; ``ctx.needs_input_grad`` likewise."""
        self.kernel = _autograd_kernel(self.default, self.impl, backward, setup_context)
        _LIB.impl(self.name, self.kernel, "Autograd", with_keyset=True)
        self.differentiable = True


def _autograd_kernel(op, impl, backward, setup_context):
    """An autograd kernel for ``op``: without a gradient to record, the kernel below autograd; else an
    autograd.Function whose forward redispatches below autograd (as torch.library's: fake and functional
    tensors pass through, so torch.compile traces it) with the lists of tensors among the arguments
    and results flattened for it. Below autograd, plain CPU tensors go to the CPU kernel ``impl``
    directly (what the dispatcher would call, without boxing the arguments once more)."""
    arguments = op._schema.arguments
    lists = [i for i, a in enumerate(arguments) if str(a.type) == "List[Tensor]"]
    list_out = [i for i, r in enumerate(op._schema.returns) if str(r.type) == "List[Tensor]"]
    n_args = len(arguments)

    def forward(ctx, keyset, sizes, *flat):
        args = list(flat)
        for i in lists:  # sizes[i]: the length of list argument i
            args[i:i + sizes[i]] = [args[i:i + sizes[i]]]
        out = below(keyset, args)
        if setup_context is not None:
            setup_context(ctx, args, out)
        ctx.sizes = sizes
        if not list_out:
            return out
        flat_out = list(out)
        for i in reversed(list_out):
            sizes.append(len(flat_out[i]))  # the kernel below reads these back
            flat_out[i:i + 1] = flat_out[i]
        return tuple(flat_out)

    def backward_flat(ctx, *grads):
        sizes = ctx.sizes
        if list_out:
            grads = list(grads)
            for i, n in zip(list_out, reversed(sizes[n_args:])):
                grads[i:i + n] = [grads[i:i + n]]
        needs = list(ctx.needs_input_grad[2:])
        for i in lists:
            needs[i:i + sizes[i]] = [needs[i:i + sizes[i]]]
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(needs)
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = flat_needs
        flat = [None, None]
        for i, grad in enumerate(result):
            if i in lists:
                flat += [None] * sizes[i] if grad is None else grad
            else:
                flat.append(grad)
        return tuple(flat)

    node = type(f"dpfit_{op._opname}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_flat)})

    def below(keyset, args):
        keyset = keyset & _AFTER_AUTOGRAD
        with torch._C._AutoDispatchBelowAutograd():
            if keyset.raw_repr() == _PLAIN_CPU:
                return impl(*args)
            return op.redispatch(keyset, *args)

    def kernel(keyset, *args):
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            return below(keyset, args)
        sizes = [len(a) if i in lists else 1 for i, a in enumerate(args)]
        if not lists:
            out = node.apply(keyset, sizes, *args)
        else:
            flat = []
            for i, a in enumerate(args):
                flat += a if i in lists else [a]
            out = node.apply(keyset, sizes, *flat)
        if not list_out:
            return out
        out = list(out)
        for i, n in zip(list_out, reversed(sizes[n_args:])):
            out[i:i + n] = [out[i:i + n]]
        return tuple(out)

    return kernel


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"dpfit::{name} is not differentiable (a backward kernel or index bookkeeping)")

    return backward


def _layers(has_idt: list[bool], params: list[Tensor], empty: Tensor):
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


def layer_grads(has_idt: list[bool], per_layer: list[Tensor]) -> list[Tensor]:
    """A kernel backward's (dW, db, didt) per layer, flattened like the parameters (no didt where a
    layer has no idt)."""
    grads: list[Tensor] = []
    for k, with_idt in enumerate(has_idt):
        grads += per_layer[3 * k: 3 * k + (3 if with_idt else 2)]
    return grads


# ------------------------------------------------------------------------------------------------
# embedding nets (embedding_net.cpp)


@_Op
def value_and_tangent(s: Tensor, params: list[Tensor], kinds: list[int], has_idt: list[bool],
                      keep: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(g, dg/ds)`` (rows, M) of a tanh embedding net on s (rows, 1); ``params`` matrix, bias (, idt)
    per layer. With ``keep`` also each layer's activations h, then u (the backward's input)."""
    matrices, biases, idts = _layers(has_idt, params, s.new_empty(0))
    g, t, *kept = extension().value_and_tangent(s.contiguous(), matrices, biases, idts, kinds, BLOCK_ROWS, keep)
    return g, t, kept


@value_and_tangent.register_fake
def _(s, params, kinds, has_idt, keep):
    matrices = _layers(has_idt, params, s)[0]
    rows = s.shape[0]
    kept = [s.new_empty(rows, w.shape[1]) for _ in range(2) for w in matrices] if keep else []
    width = matrices[-1].shape[1]
    return s.new_empty(rows, width), s.new_empty(rows, width), kept


@_Op
def value_and_tangent_backward(s: Tensor, grad_g: Tensor, grad_t: Tensor, kept: list[Tensor], params: list[Tensor],
                               kinds: list[int], has_idt: list[bool], need_s: bool) -> list[Tensor]:
    """The gradients of ``value_and_tangent`` from its kept activations: s's (empty unless ``need_s``),
    then dW, db, didt (empty where none) per layer."""
    n = len(kinds)
    matrices, biases, idts = _layers(has_idt, params, s.new_empty(0))
    return extension().value_and_tangent_backward(s.contiguous(), grad_g.contiguous(), grad_t.contiguous(), kept[:n],
                                                  kept[n:], matrices, biases, idts, kinds, BLOCK_ROWS, need_s)


@value_and_tangent_backward.register_fake
def _(s, grad_g, grad_t, kept, params, kinds, has_idt, need_s):
    empty = s.new_empty(0)
    out = [s.new_empty(s.shape) if need_s else empty]
    for layer in zip(*_layers(has_idt, params, empty)):
        out += [p.new_empty(p.shape) for p in layer]
    return out


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
    grad_s, *per_layer = value_and_tangent_backward(s, grad_g, grad_t, kept, params, ctx.kinds, ctx.has_idt, need_s)
    return grad_s if need_s else None, layer_grads(ctx.has_idt, per_layer), None, None, None


value_and_tangent.register_autograd(_value_and_tangent_grad, setup_context=_kept_activations_setup("value_and_tangent"))


# ------------------------------------------------------------------------------------------------
# fitting nets (fitting_net.cpp)


def _fit_layers(has_idt: list[bool], params: list[Tensor], empty: Tensor):
    """(matrices, biases, idts): per tanh layer matrix, bias (, idt), then the output layer's matrix
    and bias."""
    matrices, biases, idts = _layers(has_idt, params[:-2], empty)
    return matrices + [params[-2]], biases + [params[-1]], idts


@_Op
def fitting(x: Tensor, params: list[Tensor], kinds: list[int], has_idt: list[bool],
            keep: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Energies e (rows, 1) of a fitting net (tanh layers, then a linear output of width 1) on x
    (rows, in) and de/dx (rows, in). With ``keep`` also x_1 .. x_L, h, gz and g of each tanh layer."""
    matrices, biases, idts = _fit_layers(has_idt, params, x.new_empty(0))
    energy, grad, *kept = extension().fitting_forward(x.contiguous(), matrices, biases, idts, kinds, keep)
    if x.shape[0] <= 1:  # (then the last layer's kept g is a view of the output matrix: a custom op
        kept = [k.clone() for k in kept]  # returns no alias of its inputs)
    return energy, grad, kept


@fitting.register_fake
def _(x, params, kinds, has_idt, keep):
    matrices = _fit_layers(has_idt, params, x)[0][:-1]
    rows = x.shape[0]
    kept = [x.new_empty(rows, w.shape[1]) for _ in range(4) for w in matrices] if keep else []
    return x.new_empty(rows, 1), x.new_empty(x.shape), kept


@_Op
def fitting_backward(x: Tensor, grad_e: Tensor | None, grad_g: Tensor | None, kept: list[Tensor],
                     params: list[Tensor], kinds: list[int], has_idt: list[bool], need_x: bool) -> list[Tensor]:
    """The gradients of ``fitting`` from its kept activations (a missing output gradient is zero): x's
    (empty unless ``need_x``), dW, db, didt (empty where none) per tanh layer, the output layer's dW, db."""
    matrices, biases, idts = _fit_layers(has_idt, params, x.new_empty(0))
    return extension().fitting_backward(x.contiguous(), grad_e, grad_g, matrices, biases, idts, kinds, kept, need_x)


@fitting_backward.register_fake
def _(x, grad_e, grad_g, kept, params, kinds, has_idt, need_x):
    empty = x.new_empty(0)
    matrices, biases, idts = _fit_layers(has_idt, params, empty)
    out = [x.new_empty(x.shape) if need_x else empty]
    for layer in zip(matrices, biases, idts):
        out += [p.new_empty(p.shape) for p in layer]
    return out + [p.new_empty(p.shape) for p in params[-2:]]




def _fitting_grad(ctx, grad_e, grad_g, _grad_kept):
    x, *rest = ctx.saved_tensors
    n = 4 * len(ctx.kinds)
    kept, params = rest[:n], rest[n:]
    need_x = ctx.needs_input_grad[0]
    grad_x, *per_layer = fitting_backward(x, grad_e, grad_g, kept, params, ctx.kinds, ctx.has_idt, need_x)
    grads = layer_grads(ctx.has_idt, per_layer[:-2]) + per_layer[-2:]
    return grad_x if need_x else None, grads, None, None, None


fitting.register_autograd(_fitting_grad, setup_context=_kept_activations_setup("fitting"))


# ------------------------------------------------------------------------------------------------
# environment (environment.cpp)


@_Op
def env_geometry(coord: Tensor, nlist: Tensor, shift: Tensor | None, box: Tensor | None, atype: Tensor,
                 davg: Tensor, dstd: Tensor, keep: Tensor | None, slot_type: Tensor, rcut_smth: float, rcut: float,
                 far: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pair vectors diff (nf, nloc, nnei, 3), R~ (.., 4) and its Jacobian (.., 3, 4) with dE/dd = J dE/dR~
    on occupied slots and 0 on padding. int64 nlist, shift (nf, nloc, nnei, 3), atype, slot_type; shift
    and box both given (periodic) or both None; keep (ntypes, ntypes): excluded type pairs 0, or None."""
    periodic = shift is not None and box is not None
    empty = coord.new_empty(0)
    return tuple(extension().env_geometry(
        coord.contiguous(), nlist.contiguous(), shift.contiguous() if periodic else nlist.new_empty(0),
        box.contiguous() if periodic else empty, atype.contiguous(), davg.contiguous(), dstd.contiguous(),
        empty if keep is None else keep.contiguous(), slot_type.contiguous(), rcut_smth, rcut, far))


@env_geometry.register_fake
def _(coord, nlist, shift, box, atype, davg, dstd, keep, slot_type, rcut_smth, rcut, far):
    shape = tuple(nlist.shape)
    return coord.new_empty(*shape, 3), coord.new_empty(*shape, 4), coord.new_empty(*shape, 3, 4)


@_Op
def env_jacobian(jac: Tensor, v: Tensor, transpose: bool) -> Tensor:
    """``J v`` per slot: (.., 3) from jac (.., 3, 4) and v (.., 4); ``transpose``: ``J^T v``, (.., 4) from
    v (.., 3). The gradient goes to v only (J is a constant of the coordinates)."""
    return extension().env_jacobian_apply(jac.contiguous(), v.contiguous(), transpose)


@env_jacobian.register_fake
def _(jac, v, transpose):
    return v.new_empty(*jac.shape[:-2], 4 if transpose else 3)


def _env_jacobian_setup(ctx, inputs, output):
    ctx.transpose = inputs[2]
    ctx.save_for_backward(inputs[0])


def _env_jacobian_grad(ctx, grad):
    (jac,) = ctx.saved_tensors
    grad_v = env_jacobian(jac, grad, not ctx.transpose) if ctx.needs_input_grad[1] else None
    return None, grad_v, None


env_jacobian.register_autograd(_env_jacobian_grad, setup_context=_env_jacobian_setup)


@_Op
def reverse_slots(nlist: Tensor, shift: Tensor | None, atype: Tensor, sections: list[int]) -> Tensor:
    """Flat slot of each slot's reverse pair (nf, nloc, nnei), or -1 (as :func:`dpfit.model.index_facts.reverse_slots`).
    int64 nlist, shift (nf, nloc, nnei, 3) or None, atype; ``sections``: slot ranges per neighbor type."""
    return extension().reverse_slots(nlist.contiguous(), nlist.new_empty(0) if shift is None else shift.contiguous(),
                                     atype.contiguous(), sections)


@reverse_slots.register_fake
def _(nlist, shift, atype, sections):
    return nlist.new_empty(nlist.shape)


# ------------------------------------------------------------------------------------------------
# embedding rows and slot contractions (slot_contraction.cpp)


@_Op
def block_rows(s: Tensor, mask: Tensor, atype: Tensor, partner: Tensor | None, lo: int, kept: int,
               centers: list[int], pad: Tensor) -> list[Tensor]:
    """A neighbor-type block's row index (N, kept) int64, then each net's input rows (R_k, 1) (R_k
    depends on the data); see ``block_rows`` in slot_contraction.cpp."""
    return extension().block_rows(s.contiguous(), mask.contiguous(), atype.contiguous(),
                                  atype.new_empty(0) if partner is None else partner.contiguous(), lo, kept, centers,
                                  pad.contiguous())


@block_rows.register_fake
def _(s, mask, atype, partner, lo, kept, centers, pad):
    ctx = torch.library.get_ctx()
    return [atype.new_empty(s.shape[0], kept)] + [s.new_empty(ctx.new_dynamic_size(), 1) for _ in centers]


@_Op
def slots_of_rows(index: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """CSR of rows -> flat slots of ``index`` (int64, values < n_rows): order (index.numel()), ptr (n_rows + 1)."""
    order, ptr = extension().slots_of_rows(index.contiguous(), n_rows)
    return order, ptr


@slots_of_rows.register_fake
def _(index, n_rows):
    return index.new_empty(index.numel()), index.new_empty(n_rows + 1)


@_Op
def slot_gt(g: Tensor, index: Tensor, r: Tensor, order: Tensor, ptr: Tensor) -> tuple[Tensor, Tensor]:
    """``out[n] = sum_j R[n, j]^T G[index[n, j]]`` (N, 4, M) from the rows G (R, M); r (N, k, 4) carries
    no gradient; (order, ptr): ``slots_of_rows(index, R)``.

    Also returns a handle on the rows' gradient: zeros shaped like G (stride 0, no memory). An op that
    reads G later and passes this handle (``slot_env``) sends its gradient for G there, and this op's
    backward adds its own to it in one pass over the rows (as the kernel's ``base``), instead of autograd
    adding two (R, M) arrays."""
    out = extension().slot_gt(g.contiguous(), index.contiguous(), r.contiguous())
    return out, g.new_zeros(()).expand(g.shape)


@slot_gt.register_fake
def _(g, index, r, order, ptr):
    return g.new_empty(index.shape[0], 4, g.shape[1]), g.new_zeros(()).expand(g.shape)


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
    return slot_rows(r, grad, order, ptr, ctx.n_rows, ctx.k, grad_rows), None, None, None, None


slot_gt.register_autograd(_slot_gt_grad, setup_context=_slot_gt_setup)


@_Op
def slot_rows(coef: Tensor, per_atom: Tensor, order: Tensor, ptr: Tensor, n_rows: int, k: int,
              base: Tensor | None) -> Tensor:
    """(R, M): base (or zeros) plus each row's sum over its slots s of ``sum_c coef[s, c] per_atom[n(s), c]``;
    coef (N, k, 4), per_atom (N, 4, M)."""
    return extension().slot_rows(coef.contiguous(), per_atom.contiguous(), order.contiguous(), ptr.contiguous(),
                                 n_rows, k, base)


@slot_rows.register_fake
def _(coef, per_atom, order, ptr, n_rows, k, base):
    return per_atom.new_empty(n_rows, per_atom.shape[2])


@_Op
def slot_env(g: Tensor, t: Tensor, index: Tensor, valid: Tensor, gbar: Tensor, order: Tensor, ptr: Tensor,
             rows_grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """``part[n, j, c] = G[index[n, j]] . gbar[n, c]`` and ``tds`` likewise with T (N, k, 4 each); gbar
    (N, 4, M); zeros on the slots where ``valid`` (N, k) is false (their gradients are not read).
    ``rows_grad``: ``slot_gt``'s handle on G's gradient, which then receives G's gradient (G none)."""
    part, tds = extension().slot_env(g.contiguous(), t.contiguous(), index.contiguous(), valid.contiguous(),
                                     gbar.contiguous())
    return part, tds


@slot_env.register_fake
def _(g, t, index, valid, gbar, order, ptr, rows_grad):
    return g.new_empty(*index.shape, 4), g.new_empty(*index.shape, 4)


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
        grad_g, grad_t = slot_rows_value_and_tangent(grad_part, grad_tds, gbar, order, ptr, valid, ctx.n_rows, ctx.k)
    if need[4]:
        grad_gbar = slot_env_gbar(g, t, index, valid, grad_part, grad_tds)
    grad_g = grad_g if need_g else None
    return (None if ctx.to_handle else grad_g, grad_t if need[1] else None, None, None, grad_gbar, None, None,
            grad_g if ctx.to_handle else None)


slot_env.register_autograd(_slot_env_grad, setup_context=_slot_env_setup)


@_Op
def slot_rows_value_and_tangent(coef_a: Tensor, coef_b: Tensor, per_atom: Tensor, order: Tensor, ptr: Tensor,
                                valid: Tensor, n_rows: int, k: int) -> tuple[Tensor, Tensor]:
    """``slot_rows`` for two coefficient sets (N, k, 4) sharing per_atom, over the valid slots: the
    rows' gradients of G and T under ``slot_env``."""
    grad_a, grad_b = extension().slot_rows_value_and_tangent(
        coef_a.contiguous(), coef_b.contiguous(), per_atom.contiguous(), order.contiguous(), ptr.contiguous(),
        valid.contiguous(), n_rows, k)
    return grad_a, grad_b


@slot_rows_value_and_tangent.register_fake
def _(coef_a, coef_b, per_atom, order, ptr, valid, n_rows, k):
    return per_atom.new_empty(n_rows, per_atom.shape[2]), per_atom.new_empty(n_rows, per_atom.shape[2])


@_Op
def slot_env_gbar(g: Tensor, t: Tensor, index: Tensor, valid: Tensor, grad_part: Tensor, grad_tds: Tensor) -> Tensor:
    """The gradient of ``slot_env`` for gbar (N, 4, M)."""
    return extension().slot_env_gbar(g.contiguous(), t.contiguous(), index.contiguous(), valid.contiguous(),
                                     grad_part.contiguous(), grad_tds.contiguous())


@slot_env_gbar.register_fake
def _(g, t, index, valid, grad_part, grad_tds):
    return g.new_empty(index.shape[0], 4, g.shape[1])


# ------------------------------------------------------------------------------------------------
# descriptor products (descriptor_product.cpp)


@_Op
def descriptor_gram(g: Tensor, a: int) -> Tensor:
    """``D[n] = G[n]^T G[n][:, :a]`` (N, M, a) from G (N, 4, M)."""
    g = g.contiguous()
    return extension().descriptor_gram(g, g, a, False)


@descriptor_gram.register_fake
def _(g, a):
    return g.new_empty(g.shape[0], g.shape[2], a)


def _descriptor_gram_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0])


def _descriptor_gram_grad(ctx, grad):
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None
    (g,) = ctx.saved_tensors
    return descriptor_vjp(g, grad), None


descriptor_gram.register_autograd(_descriptor_gram_grad, setup_context=_descriptor_gram_setup)


@_Op
def descriptor_vjp(g: Tensor, w: Tensor) -> Tensor:
    """``V[n] = G[n][:, :a] W[n]^T + pad(G[n] W[n])`` (N, 4, M): the gradient of D for G under the
    cotangent W (N, M, a). Bilinear: its gradients are ``V(C, W)`` for G and the symmetric gram of
    (C, G) for W."""
    return extension().descriptor_vjp(g.contiguous(), w.contiguous())


@descriptor_vjp.register_fake
def _(g, w):
    return g.new_empty(g.shape)


def _descriptor_vjp_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _descriptor_vjp_grad(ctx, grad):
    if grad is None:
        return None, None
    g, w = ctx.saved_tensors
    grad_g = descriptor_vjp(grad, w) if ctx.needs_input_grad[0] else None
    grad_w = descriptor_cross_gram(grad, g, w.shape[2], True) if ctx.needs_input_grad[1] else None
    return grad_g, grad_w


descriptor_vjp.register_autograd(_descriptor_vjp_grad, setup_context=_descriptor_vjp_setup)


@_Op
def descriptor_cross_gram(x: Tensor, y: Tensor, a: int, symmetric: bool) -> Tensor:
    """``sum_c x[n, c, i] y[n, c, j]`` (N, M, a), j < a (``symmetric``: plus the same with x, y swapped),
    from x, y (N, 4, M)."""
    return extension().descriptor_gram(x.contiguous(), y.contiguous(), a, symmetric)


@descriptor_cross_gram.register_fake
def _(x, y, a, symmetric):
    return x.new_empty(x.shape[0], x.shape[2], a)


def backward_node(name: str) -> str:
    """The class name of the autograd node that op ``dpfit::<name>`` records (e.g. to check that a
    kernel ran: ``backward_node("fitting") in {type(fn).__name__ for fn in graph}``)."""
    return f"dpfit_{name}Backward"


def _register_the_rest() -> None:
    """The ops without a backward: an error if a gradient is asked of them (not a silent zero)."""
    for op in _OPS:
        if not op.differentiable:
            op.register_autograd(_not_differentiable(op.name))
            op.differentiable = False


_register_the_rest()
