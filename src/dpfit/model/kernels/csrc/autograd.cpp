// The autograd kernels of the dpfit ops (dispatch key Autograd), registered by ops.cpp: the backward
// formulas of the ops the model differentiates, written with the other ops (called through the
// dispatcher, so that a backward that builds a graph records them), and an error for the others
// (backward kernels and index bookkeeping: the kernels are differentiated once). In C++, so that a call
// costs a few microseconds (no Python between the dispatcher and the kernel) and a C++ host can
// differentiate through the ops too.
//
// Where nothing is to be recorded (grad mode off, or no input requires grad) a kernel calls the op
// below autograd directly. Otherwise a torch::autograd::Function records one node; its backward
// returns a gradient (or an undefined tensor) per forward argument, a list argument counting once per
// tensor, and ctx->needs_input_grad(i) counts the tensor inputs only.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dpfit {

using at::Tensor;
using at::TensorList;
using c10::SymInt;
using c10::SymIntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Bools = c10::List<bool>;
using NetOut = std::tuple<Tensor, Tensor, std::vector<Tensor>>;
using Pair = std::tuple<Tensor, Tensor>;
using OptTensor = std::optional<Tensor>;

namespace {

template <typename F>
c10::TypedOperatorHandle<F> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// the ops, through the dispatcher: op::<name>().call(...)
namespace op {
#define DPFIT_OP(name, signature)                                \
  const c10::TypedOperatorHandle<signature>& name() {            \
    static const auto handle_ = handle<signature>("dpfit::" #name); \
    return handle_;                                              \
  }
DPFIT_OP(value_and_tangent, NetOut(const Tensor&, TensorList, SymIntArrayRef, const Bools&, bool))
DPFIT_OP(value_and_tangent_backward, std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, TensorList,
                                                         TensorList, SymIntArrayRef, const Bools&, bool))
DPFIT_OP(fitting, NetOut(const Tensor&, TensorList, SymIntArrayRef, const Bools&, bool))
DPFIT_OP(fitting_backward, std::vector<Tensor>(const Tensor&, const OptTensor&, const OptTensor&, TensorList, TensorList,
                                               SymIntArrayRef, const Bools&, bool))
DPFIT_OP(env_jacobian, Tensor(const Tensor&, const Tensor&, bool))
DPFIT_OP(slot_gt, Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&))
DPFIT_OP(slot_rows, Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, SymInt, SymInt, const OptTensor&))
DPFIT_OP(slot_env, Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const OptTensor&))
DPFIT_OP(slot_rows_value_and_tangent, Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, SymInt, SymInt))
DPFIT_OP(slot_env_gbar, Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&))
DPFIT_OP(descriptor_gram, Tensor(const Tensor&, SymInt))
DPFIT_OP(descriptor_vjp, Tensor(const Tensor&, const Tensor&))
DPFIT_OP(descriptor_cross_gram, Tensor(const Tensor&, const Tensor&, SymInt, bool))
#undef DPFIT_OP
}  // namespace op

// whether autograd records a call on these tensors
bool recording(std::initializer_list<const Tensor*> tensors, TensorList list = {}) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  for (const Tensor& t : list)
    if (t.requires_grad()) return true;
  return false;
}

Tensor undefined_if(bool cond, Tensor t) { return cond ? Tensor() : std::move(t); }
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A kernel backward's (dW, db, didt) per layer, flattened like the parameters (no didt where a layer
// has none).
void append_layer_grads(variable_list& out, const Bools& has_idt, const std::vector<Tensor>& per_layer,
                        size_t first) {
  for (size_t k = 0; k < has_idt.size(); ++k) {
    out.push_back(per_layer[first + 3 * k]);
    out.push_back(per_layer[first + 3 * k + 1]);
    if (has_idt[k]) out.push_back(per_layer[first + 3 * k + 2]);
  }
}

// ------------------------------------------------------------------------------------------------
// the nets: inputs (x, params, kinds, has_idt, keep); outputs (value, gradient or tangent, kept
// activations (no gradient)); saved: x, the activations, the parameters

void save_net(AutogradContext* ctx, const Tensor& x, TensorList params, SymIntArrayRef kinds, const Bools& has_idt,
              const std::vector<Tensor>& kept) {
  ctx->saved_data["kinds"] = c10::IValue(C10_AS_INTARRAYREF_SLOW(kinds).vec());
  ctx->saved_data["has_idt"] = has_idt;
  ctx->saved_data["n_kept"] = static_cast<int64_t>(kept.size());
  variable_list saved{x};
  saved.insert(saved.end(), kept.begin(), kept.end());
  saved.insert(saved.end(), params.begin(), params.end());
  ctx->mark_non_differentiable(kept);
  ctx->set_materialize_grads(false);  // a missing gradient (undefined) is zero to the kernel
  ctx->save_for_backward(std::move(saved));
}

// what save_net kept, read back in a backward
struct SavedNet {
  Tensor x;
  std::vector<Tensor> kept, params;
  std::vector<int64_t> kinds;
  Bools has_idt;
};

SavedNet saved_net(AutogradContext* ctx) {
  const variable_list saved = ctx->get_saved_variables();
  const size_t n = ctx->saved_data["n_kept"].toInt();
  return {saved[0], std::vector<Tensor>(saved.begin() + 1, saved.begin() + 1 + n),
          std::vector<Tensor>(saved.begin() + 1 + n, saved.end()), ctx->saved_data["kinds"].toIntVector(),
          ctx->saved_data["has_idt"].toBoolList()};
}

variable_list net_outputs(const NetOut& out) {
  variable_list flat{std::get<0>(out), std::get<1>(out)};
  flat.insert(flat.end(), std::get<2>(out).begin(), std::get<2>(out).end());
  return flat;
}

NetOut net_result(const variable_list& flat) {
  return {flat[0], flat[1], std::vector<Tensor>(flat.begin() + 2, flat.end())};
}

}  // namespace

// The autograd nodes, named after their ops (the node's name: torch::autograd::CppNode<dpfit::<op>>).

struct value_and_tangent : public torch::autograd::Function<value_and_tangent> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s, TensorList params, SymIntArrayRef kinds,
                               const Bools& has_idt, bool keep) {
    at::AutoDispatchBelowADInplaceOrView guard;
    NetOut out = op::value_and_tangent().call(s, params, kinds, has_idt, keep);
    save_net(ctx, s, params, kinds, has_idt, std::get<2>(out));
    return net_outputs(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedNet net = saved_net(ctx);
    const Tensor& like = net.kept[net.kept.size() / 2 - 1];  // the last layer's h: (rows, M)
    const Tensor grad_g = grads[0].defined() ? grads[0] : at::zeros_like(like);
    const Tensor grad_t = grads[1].defined() ? grads[1] : at::zeros_like(like);
    const bool need_s = ctx->needs_input_grad(0);
    const std::vector<Tensor> per_layer = op::value_and_tangent_backward().call(
        net.x, grad_g, grad_t, net.kept, net.params, c10::fromIntArrayRefSlow(net.kinds), net.has_idt, need_s);
    variable_list out{need_s ? per_layer[0] : Tensor()};
    append_layer_grads(out, net.has_idt, per_layer, 1);
    out.resize(out.size() + 3);  // kinds, has_idt, keep
    return out;
  }
};

NetOut value_and_tangent_autograd(const Tensor& s, TensorList params, SymIntArrayRef kinds, const Bools& has_idt,
                                  bool keep) {
  if (!recording({&s}, params)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::value_and_tangent().call(s, params, kinds, has_idt, keep);
  }
  TORCH_CHECK(keep, "dpfit::value_and_tangent: keep=False while autograd records");
  return net_result(value_and_tangent::apply(s, params, kinds, has_idt, keep));
}

struct fitting : public torch::autograd::Function<fitting> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList params, SymIntArrayRef kinds,
                               const Bools& has_idt, bool keep) {
    at::AutoDispatchBelowADInplaceOrView guard;
    NetOut out = op::fitting().call(x, params, kinds, has_idt, keep);
    save_net(ctx, x, params, kinds, has_idt, std::get<2>(out));
    return net_outputs(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedNet net = saved_net(ctx);
    const bool need_x = ctx->needs_input_grad(0);
    const std::vector<Tensor> per_layer = op::fitting_backward().call(
        net.x, optional(grads[0]), optional(grads[1]), net.kept, net.params, c10::fromIntArrayRefSlow(net.kinds),
        net.has_idt, need_x);
    variable_list out{need_x ? per_layer[0] : Tensor()};
    append_layer_grads(out, net.has_idt, per_layer, 1);
    out.push_back(per_layer[per_layer.size() - 2]);  // the output layer's dW, db
    out.push_back(per_layer[per_layer.size() - 1]);
    out.resize(out.size() + 3);  // kinds, has_idt, keep
    return out;
  }
};

NetOut fitting_autograd(const Tensor& x, TensorList params, SymIntArrayRef kinds, const Bools& has_idt, bool keep) {
  if (!recording({&x}, params)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::fitting().call(x, params, kinds, has_idt, keep);
  }
  TORCH_CHECK(keep, "dpfit::fitting: keep=False while autograd records");
  return net_result(fitting::apply(x, params, kinds, has_idt, keep));
}

// ------------------------------------------------------------------------------------------------
// env_jacobian: the gradient goes to v only (J is a constant of the coordinates)

struct env_jacobian : public torch::autograd::Function<env_jacobian> {
  static Tensor forward(AutogradContext* ctx, const Tensor& jac, const Tensor& v, bool transpose) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["transpose"] = transpose;
    ctx->save_for_backward({jac});
    return op::env_jacobian().call(jac, v, transpose);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor jac = ctx->get_saved_variables()[0];
    const bool transpose = ctx->saved_data["transpose"].toBool();
    Tensor grad_v = ctx->needs_input_grad(1) ? op::env_jacobian().call(jac, grads[0], !transpose) : Tensor();
    return {Tensor(), grad_v, Tensor()};
  }
};

Tensor env_jacobian_autograd(const Tensor& jac, const Tensor& v, bool transpose) {
  if (!recording({&jac, &v})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::env_jacobian().call(jac, v, transpose);
  }
  return env_jacobian::apply(jac, v, transpose);
}

// ------------------------------------------------------------------------------------------------
// slot_gt and slot_env: slot_gt's second output is a handle on its rows' gradient; slot_env sends its
// gradient for G there when given the handle (rows_grad), and slot_gt's backward adds its own to it

struct slot_gt : public torch::autograd::Function<slot_gt> {
  static variable_list forward(AutogradContext* ctx, const Tensor& g, const Tensor& index, const Tensor& r,
                               const Tensor& order, const Tensor& ptr) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["n_rows"] = g.sym_size(0);
    ctx->saved_data["k"] = index.sym_size(1);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({r, order, ptr});
    auto [out, handle] = op::slot_gt().call(g, index, r, order, ptr);
    return {out, handle};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!ctx->needs_input_grad(0)) return out;
    if (!grads[0].defined()) {
      out[0] = grads[1];
      return out;
    }
    const variable_list saved = ctx->get_saved_variables();
    out[0] = op::slot_rows().call(saved[0], grads[0], saved[1], saved[2], ctx->saved_data["n_rows"].toSymInt(),
                              ctx->saved_data["k"].toSymInt(), optional(grads[1]));
    return out;
  }
};

Pair slot_gt_autograd(const Tensor& g, const Tensor& index, const Tensor& r, const Tensor& order, const Tensor& ptr) {
  if (!recording({&g, &index, &r, &order, &ptr})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::slot_gt().call(g, index, r, order, ptr);
  }
  const variable_list out = slot_gt::apply(g, index, r, order, ptr);
  return {out[0], out[1]};
}

struct slot_env : public torch::autograd::Function<slot_env> {
  static variable_list forward(AutogradContext* ctx, const Tensor& g, const Tensor& t, const Tensor& index,
                               const Tensor& valid, const Tensor& gbar, const Tensor& order, const Tensor& ptr,
                               const OptTensor& rows_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["n_rows"] = g.sym_size(0);
    ctx->saved_data["k"] = index.sym_size(1);
    ctx->saved_data["to_handle"] = rows_grad.has_value() && rows_grad->defined();
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({g, t, index, valid, gbar, order, ptr});
    auto [part, tds] = op::slot_env().call(g, t, index, valid, gbar, order, ptr, rows_grad);
    return {part, tds};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &t = saved[1], &index = saved[2], &valid = saved[3], &gbar = saved[4];
    const Tensor &order = saved[5], &ptr = saved[6];
    const bool to_handle = ctx->saved_data["to_handle"].toBool();
    std::vector<SymInt> shape(index.sym_sizes().begin(), index.sym_sizes().end());
    shape.emplace_back(4);
    const Tensor grad_part = grads[0].defined() ? grads[0] : at::zeros_symint(shape, g.options());
    const Tensor grad_tds = grads[1].defined() ? grads[1] : at::zeros_symint(shape, g.options());
    // G's gradient goes to the handle when there is one (and G gets none), else to G
    const bool need_g = to_handle ? ctx->needs_input_grad(7) : ctx->needs_input_grad(0);
    const bool need_t = ctx->needs_input_grad(1);
    if (need_g || need_t) {
      auto [grad_g, grad_t] = op::slot_rows_value_and_tangent().call(grad_part, grad_tds, gbar, order, ptr, valid,
                                                                 ctx->saved_data["n_rows"].toSymInt(),
                                                                 ctx->saved_data["k"].toSymInt());
      out[to_handle ? 7 : 0] = undefined_if(!need_g, grad_g);
      out[1] = undefined_if(!need_t, grad_t);
    }
    if (ctx->needs_input_grad(4)) out[4] = op::slot_env_gbar().call(g, t, index, valid, grad_part, grad_tds);
    return out;
  }
};

Pair slot_env_autograd(const Tensor& g, const Tensor& t, const Tensor& index, const Tensor& valid, const Tensor& gbar,
                       const Tensor& order, const Tensor& ptr, const OptTensor& rows_grad) {
  const Tensor none;
  if (!recording({&g, &t, &index, &valid, &gbar, &order, &ptr, rows_grad.has_value() ? &*rows_grad : &none})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::slot_env().call(g, t, index, valid, gbar, order, ptr, rows_grad);
  }
  const variable_list out = slot_env::apply(g, t, index, valid, gbar, order, ptr, rows_grad);
  return {out[0], out[1]};
}

// ------------------------------------------------------------------------------------------------
// descriptor products: gram's gradient is the vjp; the vjp is bilinear, its gradients are vjp(C, W)
// for G and the symmetric cross gram of (C, G) for W

struct descriptor_gram : public torch::autograd::Function<descriptor_gram> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, SymInt a) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({g});
    return op::descriptor_gram().call(g, std::move(a));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor()};
    return {op::descriptor_vjp().call(ctx->get_saved_variables()[0], grads[0]), Tensor()};
  }
};

Tensor descriptor_gram_autograd(const Tensor& g, SymInt a) {
  if (!recording({&g})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::descriptor_gram().call(g, std::move(a));
  }
  return descriptor_gram::apply(g, std::move(a));
}

struct descriptor_vjp : public torch::autograd::Function<descriptor_vjp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({g, w});
    return op::descriptor_vjp().call(g, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &w = saved[1];
    Tensor grad_g = ctx->needs_input_grad(0) ? op::descriptor_vjp().call(grads[0], w) : Tensor();
    Tensor grad_w = ctx->needs_input_grad(1) ? op::descriptor_cross_gram().call(grads[0], g, w.sym_size(2), true) : Tensor();
    return {grad_g, grad_w};
  }
};

Tensor descriptor_vjp_autograd(const Tensor& g, const Tensor& w) {
  if (!recording({&g, &w})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op::descriptor_vjp().call(g, w);
  }
  return descriptor_vjp::apply(g, w);
}

void register_autograd(torch::Library& m) {
  m.impl("value_and_tangent", TORCH_FN(value_and_tangent_autograd));
  m.impl("fitting", TORCH_FN(fitting_autograd));
  m.impl("env_jacobian", TORCH_FN(env_jacobian_autograd));
  m.impl("slot_gt", TORCH_FN(slot_gt_autograd));
  m.impl("slot_env", TORCH_FN(slot_env_autograd));
  m.impl("descriptor_gram", TORCH_FN(descriptor_gram_autograd));
  m.impl("descriptor_vjp", TORCH_FN(descriptor_vjp_autograd));
  // the others: asking a gradient of them is an error ("derivative for dpfit::<name> is not implemented")
  for (const char* name : {"value_and_tangent_backward", "fitting_backward", "env_geometry", "reverse_slots",
                           "block_rows", "slots_of_rows", "slot_rows", "slot_rows_value_and_tangent", "slot_env_gbar",
                           "descriptor_cross_gram", "tabulated_value_and_tangent"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace dpfit
