// The dpfit op library: the schemas of the ops torch.ops.dpfit.<name> (TORCH_LIBRARY), their CPU
// implementations (small adapters from each schema to the kernels of kernels.h) and their autograd
// kernels (autograd.cpp), registered here (TORCH_LIBRARY_IMPL). No Python: a C++ host (LAMMPS, a
// libtorch program) loads the built library with dlopen, or Python with torch.ops.load_library; the fake
// implementations (torch.compile, torch.fx) are registered from Python
// (dpfit.model.kernels.registration), which the library names with set_python_module.
//
// Ops (CPU, float32/64; int64 indices):
//   embedding nets:       value_and_tangent (autograd), value_and_tangent_backward
//   fitting nets:         fitting (autograd), fitting_backward
//   environment:          env_geometry, env_jacobian (autograd), reverse_slots
//   embedding rows:       block_rows, slots_of_rows
//   slot contractions:    slot_gt (autograd), slot_rows, slot_env (autograd), slot_rows_value_and_tangent,
//                         slot_env_gbar
//   descriptor products:  descriptor_gram (autograd), descriptor_vjp (autograd), descriptor_cross_gram
//   tabulated embedding:  tabulated_value_and_tangent (inference only: compressed models)
#include <ATen/Version.h>
#include <torch/library.h>
#include <torch/version.h>

#include <iostream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace dpfit {
void register_autograd(torch::Library& m);  // autograd.cpp
}

namespace {

using at::Tensor;
using at::TensorList;

// rows per block of the embedding kernel: two layers of 100 channels at 128 rows fit in a core's L2 cache
constexpr int64_t kBlockRows = 128;

// Empty when the torch that loaded this library is the one it was built for (major.minor), else the error
// saying so: a C++ ABI mismatch, which may load and then compute garbage or crash.
const std::string& torch_mismatch() {
  static const std::string message = [] {
    const std::string built = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
    const std::string config = at::show_config();
    const std::string key = "TORCH_VERSION=";
    const auto at = config.find(key);
    if (at == std::string::npos) return std::string();
    const std::string running = config.substr(at + key.size(), config.find_first_of(", \n", at) - at - key.size());
    const auto minor_end = running.find('.', running.find('.') + 1);
    if (running.substr(0, minor_end) == built) return std::string();
    return "libdpfit_ops.so was built for torch " + built + " but this process runs torch " + running +
           ": rebuild it against this torch (scripts/build_ops_library.sh, docs/lammps.md)";
  }();
  return message;
}

std::vector<int64_t> to_vector(at::IntArrayRef values) { return {values.begin(), values.end()}; }

// (matrices, biases, idts) per layer from the flat parameters (matrix, bias (, idt) per layer; an empty
// tensor ``empty`` for a layer without idt); ``rest``: the parameters after the layers'.
struct Layers {
  std::vector<Tensor> matrices, biases, idts;
  size_t rest = 0;
};

Layers split_layers(const c10::List<bool>& has_idt, TensorList params, const Tensor& empty) {
  Layers out;
  size_t p = 0;
  for (const bool with_idt : has_idt) {
    TORCH_CHECK(p + (with_idt ? 3 : 2) <= params.size(), "dpfit: fewer parameters than the layers take");
    out.matrices.push_back(params[p]);
    out.biases.push_back(params[p + 1]);
    out.idts.push_back(with_idt ? params[p + 2] : empty);
    p += with_idt ? 3 : 2;
  }
  out.rest = p;
  return out;
}

// a fitting net's: the tanh layers', then the output layer's matrix and bias (the last two parameters)
Layers split_fitting(const c10::List<bool>& has_idt, TensorList params, const Tensor& empty) {
  TORCH_CHECK(params.size() >= 2, "dpfit::fitting: the output layer's matrix and bias last");
  Layers out = split_layers(has_idt, params.slice(0, params.size() - 2), empty);
  out.matrices.push_back(params[params.size() - 2]);
  out.biases.push_back(params[params.size() - 1]);
  return out;
}

Tensor contiguous_or_empty(const std::optional<Tensor>& t, const Tensor& empty) {
  return t.has_value() ? t->contiguous() : empty;
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> value_and_tangent_op(const Tensor& s, TensorList params,
                                                                     at::IntArrayRef kinds,
                                                                     const c10::List<bool>& has_idt, bool keep) {
  const Layers l = split_layers(has_idt, params, s.new_empty({0}));
  std::vector<Tensor> out = value_and_tangent(s.contiguous(), l.matrices, l.biases, l.idts, to_vector(kinds),
                                              kBlockRows, keep);
  return {out[0], out[1], std::vector<Tensor>(out.begin() + 2, out.end())};
}

std::vector<Tensor> value_and_tangent_backward_op(const Tensor& s, const Tensor& grad_g, const Tensor& grad_t,
                                                  TensorList kept, TensorList params, at::IntArrayRef kinds,
                                                  const c10::List<bool>& has_idt, bool need_s) {
  const size_t n = kinds.size();
  TORCH_CHECK(kept.size() == 2 * n, "dpfit::value_and_tangent_backward: h and u of each layer");
  const Layers l = split_layers(has_idt, params, s.new_empty({0}));
  return value_and_tangent_backward(s.contiguous(), grad_g.contiguous(), grad_t.contiguous(),
                                    std::vector<Tensor>(kept.begin(), kept.begin() + n),
                                    std::vector<Tensor>(kept.begin() + n, kept.end()), l.matrices, l.biases, l.idts,
                                    to_vector(kinds), kBlockRows, need_s);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> fitting_op(const Tensor& x, TensorList params, at::IntArrayRef kinds,
                                                           const c10::List<bool>& has_idt, bool keep) {
  const Layers l = split_fitting(has_idt, params, x.new_empty({0}));
  std::vector<Tensor> out = fitting_forward(x.contiguous(), l.matrices, l.biases, l.idts, to_vector(kinds), keep);
  std::vector<Tensor> kept(out.begin() + 2, out.end());
  if (x.size(0) <= 1)  // (then the last layer's kept g is a view of the output matrix: an op returns no
    for (auto& k : kept) k = k.clone();  // alias of its inputs)
  return {out[0], out[1], kept};
}

std::vector<Tensor> fitting_backward_op(const Tensor& x, const std::optional<Tensor>& grad_e,
                                        const std::optional<Tensor>& grad_g, TensorList kept, TensorList params,
                                        at::IntArrayRef kinds, const c10::List<bool>& has_idt, bool need_x) {
  const Layers l = split_fitting(has_idt, params, x.new_empty({0}));
  return fitting_backward(x.contiguous(), grad_e, grad_g, l.matrices, l.biases, l.idts, to_vector(kinds),
                          kept.vec(), need_x);
}

std::tuple<Tensor, Tensor, Tensor> env_geometry_op(const Tensor& coord, const Tensor& nlist,
                                                   const std::optional<Tensor>& shift, const std::optional<Tensor>& box,
                                                   const Tensor& atype, const Tensor& davg, const Tensor& dstd,
                                                   const std::optional<Tensor>& keep, const Tensor& slot_type,
                                                   double rcut_smth, double rcut, double far) {
  TORCH_CHECK(torch_mismatch().empty(), torch_mismatch());  // (every model's first op)
  const bool periodic = shift.has_value() && box.has_value();
  const Tensor empty = coord.new_empty({0});
  std::vector<Tensor> out = env_geometry(
      coord.contiguous(), nlist.contiguous(), periodic ? shift->contiguous() : nlist.new_empty({0}),
      periodic ? box->contiguous() : empty, atype.contiguous(), davg.contiguous(), dstd.contiguous(),
      contiguous_or_empty(keep, empty), slot_type.contiguous(), rcut_smth, rcut, far);
  return {out[0], out[1], out[2]};
}

Tensor env_jacobian_op(const Tensor& jac, const Tensor& v, bool transpose) {
  return env_jacobian_apply(jac.contiguous(), v.contiguous(), transpose);
}

Tensor reverse_slots_op(const Tensor& nlist, const std::optional<Tensor>& shift, const Tensor& atype,
                        at::IntArrayRef sections) {
  return reverse_slots(nlist.contiguous(), contiguous_or_empty(shift, nlist.new_empty({0})), atype.contiguous(),
                       to_vector(sections));
}

std::vector<Tensor> block_rows_op(const Tensor& s, const Tensor& mask, const Tensor& atype,
                                  const std::optional<Tensor>& partner, int64_t lo, int64_t kept,
                                  at::IntArrayRef centers, const Tensor& pad) {
  return block_rows(s.contiguous(), mask.contiguous(), atype.contiguous(),
                    contiguous_or_empty(partner, atype.new_empty({0})), lo, kept, to_vector(centers),
                    pad.contiguous());
}

std::tuple<Tensor, Tensor> slots_of_rows_op(const Tensor& index, int64_t n_rows) {
  std::vector<Tensor> out = slots_of_rows(index.contiguous(), n_rows);
  return {out[0], out[1]};
}

// Also returns a handle on the rows' gradient: zeros shaped like G (stride 0, no memory); see
// registration.py.
std::tuple<Tensor, Tensor> slot_gt_op(const Tensor& g, const Tensor& index, const Tensor& r, const Tensor& order,
                                      const Tensor& ptr) {
  (void)order;
  (void)ptr;
  Tensor out = slot_gt(g.contiguous(), index.contiguous(), r.contiguous());
  return {out, at::zeros({}, g.options()).expand(g.sizes())};
}

Tensor slot_rows_op(const Tensor& coef, const Tensor& per_atom, const Tensor& order, const Tensor& ptr,
                    int64_t n_rows, int64_t k, const std::optional<Tensor>& base) {
  return slot_rows(coef.contiguous(), per_atom.contiguous(), order.contiguous(), ptr.contiguous(), n_rows, k, base);
}

std::tuple<Tensor, Tensor> slot_env_op(const Tensor& g, const Tensor& t, const Tensor& index, const Tensor& valid,
                                       const Tensor& gbar, const Tensor& order, const Tensor& ptr,
                                       const std::optional<Tensor>& rows_grad) {
  (void)order;
  (void)ptr;
  (void)rows_grad;
  std::vector<Tensor> out =
      slot_env(g.contiguous(), t.contiguous(), index.contiguous(), valid.contiguous(), gbar.contiguous());
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> slot_rows_value_and_tangent_op(const Tensor& coef_a, const Tensor& coef_b,
                                                          const Tensor& per_atom, const Tensor& order,
                                                          const Tensor& ptr, const Tensor& valid, int64_t n_rows,
                                                          int64_t k) {
  std::vector<Tensor> out = slot_rows_value_and_tangent(coef_a.contiguous(), coef_b.contiguous(),
                                                        per_atom.contiguous(), order.contiguous(), ptr.contiguous(),
                                                        valid.contiguous(), n_rows, k);
  return {out[0], out[1]};
}

Tensor slot_env_gbar_op(const Tensor& g, const Tensor& t, const Tensor& index, const Tensor& valid,
                        const Tensor& grad_part, const Tensor& grad_tds) {
  return slot_env_gbar(g.contiguous(), t.contiguous(), index.contiguous(), valid.contiguous(), grad_part.contiguous(),
                       grad_tds.contiguous());
}

Tensor descriptor_gram_op(const Tensor& g, int64_t a) {
  const Tensor gc = g.contiguous();
  return descriptor_gram(gc, gc, a, false);
}

Tensor descriptor_vjp_op(const Tensor& g, const Tensor& w) { return descriptor_vjp(g.contiguous(), w.contiguous()); }

Tensor descriptor_cross_gram_op(const Tensor& x, const Tensor& y, int64_t a, bool symmetric) {
  return descriptor_gram(x.contiguous(), y.contiguous(), a, symmetric);
}

std::tuple<Tensor, Tensor> tabulated_value_and_tangent_op(const Tensor& s, const Tensor& table, double lo, double step,
                                                          int64_t n_fine, double step_coarse) {
  std::vector<Tensor> out = tabulated_value_and_tangent(s.contiguous(), table.contiguous(), lo, step, n_fine,
                                                        step_coarse);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(dpfit, m) {
  if (!torch_mismatch().empty()) std::cerr << "error: " << torch_mismatch() << std::endl;  // said once, at load
  // where Python finds the ops' fake implementations (torch.compile, torch.fx) and autograd formulas
  m.set_python_module("dpfit.model.kernels.registration");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("value_and_tangent(Tensor s, Tensor[] params, SymInt[] kinds, bool[] has_idt, bool keep) "
        "-> (Tensor, Tensor, Tensor[])", tags);
  m.def("value_and_tangent_backward(Tensor s, Tensor grad_g, Tensor grad_t, Tensor[] kept, Tensor[] params, "
        "SymInt[] kinds, bool[] has_idt, bool need_s) -> Tensor[]", tags);
  m.def("fitting(Tensor x, Tensor[] params, SymInt[] kinds, bool[] has_idt, bool keep) -> (Tensor, Tensor, Tensor[])",
        tags);
  m.def("fitting_backward(Tensor x, Tensor? grad_e, Tensor? grad_g, Tensor[] kept, Tensor[] params, SymInt[] kinds, "
        "bool[] has_idt, bool need_x) -> Tensor[]", tags);
  m.def("env_geometry(Tensor coord, Tensor nlist, Tensor? shift, Tensor? box, Tensor atype, Tensor davg, "
        "Tensor dstd, Tensor? keep, Tensor slot_type, float rcut_smth, float rcut, float far) "
        "-> (Tensor, Tensor, Tensor)", tags);
  m.def("env_jacobian(Tensor jac, Tensor v, bool transpose) -> Tensor", tags);
  m.def("reverse_slots(Tensor nlist, Tensor? shift, Tensor atype, SymInt[] sections) -> Tensor", tags);
  m.def("block_rows(Tensor s, Tensor mask, Tensor atype, Tensor? partner, SymInt lo, SymInt kept, "
        "SymInt[] centers, Tensor pad) -> Tensor[]", tags);
  m.def("slots_of_rows(Tensor index, SymInt n_rows) -> (Tensor, Tensor)", tags);
  m.def("slot_gt(Tensor g, Tensor index, Tensor r, Tensor order, Tensor ptr) -> (Tensor, Tensor)", tags);
  m.def("slot_rows(Tensor coef, Tensor per_atom, Tensor order, Tensor ptr, SymInt n_rows, SymInt k, Tensor? base) "
        "-> Tensor", tags);
  m.def("slot_env(Tensor g, Tensor t, Tensor index, Tensor valid, Tensor gbar, Tensor order, Tensor ptr, "
        "Tensor? rows_grad) -> (Tensor, Tensor)", tags);
  m.def("slot_rows_value_and_tangent(Tensor coef_a, Tensor coef_b, Tensor per_atom, Tensor order, Tensor ptr, "
        "Tensor valid, SymInt n_rows, SymInt k) -> (Tensor, Tensor)", tags);
  m.def("slot_env_gbar(Tensor g, Tensor t, Tensor index, Tensor valid, Tensor grad_part, Tensor grad_tds) -> Tensor",
        tags);
  m.def("descriptor_gram(Tensor g, SymInt a) -> Tensor", tags);
  m.def("descriptor_vjp(Tensor g, Tensor w) -> Tensor", tags);
  m.def("descriptor_cross_gram(Tensor x, Tensor y, SymInt a, bool symmetric) -> Tensor", tags);
  m.def("tabulated_value_and_tangent(Tensor s, Tensor table, float lo, float step, SymInt n_fine, "
        "float step_coarse) -> (Tensor, Tensor)", tags);
}

TORCH_LIBRARY_IMPL(dpfit, CPU, m) {
  m.impl("value_and_tangent", TORCH_FN(value_and_tangent_op));
  m.impl("value_and_tangent_backward", TORCH_FN(value_and_tangent_backward_op));
  m.impl("fitting", TORCH_FN(fitting_op));
  m.impl("fitting_backward", TORCH_FN(fitting_backward_op));
  m.impl("env_geometry", TORCH_FN(env_geometry_op));
  m.impl("env_jacobian", TORCH_FN(env_jacobian_op));
  m.impl("reverse_slots", TORCH_FN(reverse_slots_op));
  m.impl("block_rows", TORCH_FN(block_rows_op));
  m.impl("slots_of_rows", TORCH_FN(slots_of_rows_op));
  m.impl("slot_gt", TORCH_FN(slot_gt_op));
  m.impl("slot_rows", TORCH_FN(slot_rows_op));
  m.impl("slot_env", TORCH_FN(slot_env_op));
  m.impl("slot_rows_value_and_tangent", TORCH_FN(slot_rows_value_and_tangent_op));
  m.impl("slot_env_gbar", TORCH_FN(slot_env_gbar_op));
  m.impl("descriptor_gram", TORCH_FN(descriptor_gram_op));
  m.impl("descriptor_vjp", TORCH_FN(descriptor_vjp_op));
  m.impl("descriptor_cross_gram", TORCH_FN(descriptor_cross_gram_op));
  m.impl("tabulated_value_and_tangent", TORCH_FN(tabulated_value_and_tangent_op));
}

TORCH_LIBRARY_IMPL(dpfit, Autograd, m) { dpfit::register_autograd(m); }
