// The numerical kernels of the dpfit op library, one declaration per entry point (defined in the
// .cpp file named above each group). ops.cpp adapts them to the ops' schemas and registers them.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <optional>
#include <vector>

// embedding_net.cpp: an embedding net's value and ds-tangent, and their backward
std::vector<at::Tensor> value_and_tangent(const at::Tensor& s, const std::vector<at::Tensor>& matrices,
                                          const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& idts,
                                          const std::vector<int64_t>& kinds, int64_t block, bool keep);
std::vector<at::Tensor> value_and_tangent_backward(const at::Tensor& s, const at::Tensor& grad_g,
                                                   const at::Tensor& grad_t, const std::vector<at::Tensor>& kept_h,
                                                   const std::vector<at::Tensor>& kept_u,
                                                   const std::vector<at::Tensor>& matrices,
                                                   const std::vector<at::Tensor>& biases,
                                                   const std::vector<at::Tensor>& idts,
                                                   const std::vector<int64_t>& kinds, int64_t block, bool need_s);
// (helpers shared with the other files)
void vector_tanh(float* h, size_t n);
void vector_tanh(double* h, size_t n);
void stream_copy(float* dst, const float* src, size_t n);
void stream_copy(double* dst, const double* src, size_t n);
// c = op(a) op(b), or c += op(a) op(b) with ``accumulate``: contiguous row-major matrices (float32/64), op(x)
// = x^T where asked; by libtorch's BLAS (as at::mm / addmm_, without the dispatcher; see embedding_net.cpp)
void matmul(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, at::Tensor& c, bool accumulate);
at::Tensor matmul(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb);

// slot_contraction.cpp: the descriptor's contractions over neighbor slots
at::Tensor slot_gt(const at::Tensor& g, const at::Tensor& index, const at::Tensor& r);
std::vector<at::Tensor> slots_of_rows(const at::Tensor& index, int64_t n_rows);
std::vector<at::Tensor> block_rows(const at::Tensor& s, const at::Tensor& mask, const at::Tensor& atype,
                                   const at::Tensor& partner, int64_t lo, int64_t kept,
                                   const std::vector<int64_t>& centers, const at::Tensor& pad);
at::Tensor slot_rows(const at::Tensor& coef, const at::Tensor& per_atom, const at::Tensor& order, const at::Tensor& ptr,
                     int64_t n_rows, int64_t k, const std::optional<at::Tensor>& base);
std::vector<at::Tensor> slot_rows_value_and_tangent(const at::Tensor& coef_a, const at::Tensor& coef_b,
                                                    const at::Tensor& per_atom, const at::Tensor& order,
                                                    const at::Tensor& ptr, const at::Tensor& valid, int64_t n_rows,
                                                    int64_t k);
std::vector<at::Tensor> slot_env(const at::Tensor& g, const at::Tensor& t, const at::Tensor& index,
                                 const at::Tensor& valid, const at::Tensor& gbar);
at::Tensor slot_env_gbar(const at::Tensor& g, const at::Tensor& t, const at::Tensor& index, const at::Tensor& valid,
                         const at::Tensor& grad_part, const at::Tensor& grad_tds);

// environment.cpp: pair vectors, the environment matrix and its Jacobian; reverse pairs
std::vector<at::Tensor> env_geometry(const at::Tensor& coord, const at::Tensor& nlist, const at::Tensor& shift,
                                     const at::Tensor& box, const at::Tensor& atype, const at::Tensor& davg,
                                     const at::Tensor& dstd, const at::Tensor& keep, const at::Tensor& slot_type,
                                     double rcut_smth, double rcut, double far);
at::Tensor env_jacobian_apply(const at::Tensor& jac, const at::Tensor& v, bool transpose);
at::Tensor reverse_slots(const at::Tensor& nlist, const at::Tensor& shift, const at::Tensor& atype,
                         const std::vector<int64_t>& sections);

// descriptor_product.cpp: D = G^T G< per atom and its vector-Jacobian product
at::Tensor descriptor_gram(const at::Tensor& x, const at::Tensor& y, int64_t a, bool symmetric);
at::Tensor descriptor_vjp(const at::Tensor& x, const at::Tensor& w);

// fitting_net.cpp: a fitting net's energies and input gradient, and their backward
std::vector<at::Tensor> fitting_forward(const at::Tensor& x0, const std::vector<at::Tensor>& matrices,
                                        const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& idts,
                                        const std::vector<int64_t>& kinds, bool keep);
std::vector<at::Tensor> fitting_backward(const at::Tensor& x0, const std::optional<at::Tensor>& grad_e,
                                         const std::optional<at::Tensor>& grad_g0,
                                         const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& biases,
                                         const std::vector<at::Tensor>& idts, const std::vector<int64_t>& kinds,
                                         const std::vector<at::Tensor>& kept, bool need_x);

// tabulation.cpp: a tabulated embedding net's value and ds-tangent (inference only)
std::vector<at::Tensor> tabulated_value_and_tangent(const at::Tensor& s, const at::Tensor& table, double lo,
                                                    double step, int64_t n_fine, double step_coarse);
