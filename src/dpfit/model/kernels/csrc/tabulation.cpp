// A tabulated embedding net (dpfit.model.tabulation): g(s) and dg/ds of every row from a table of quintic
// pieces, table (n_fine + n_coarse, 6, M): piece i of the first part covers [lo + i step, lo + (i + 1) step),
// the pieces after it [hi + j step_coarse, ...) with hi = lo + n_fine step; p(u) = sum_k c_k u^k with u the
// place in the piece (0..1), dg/ds = p'(u) / step. Inputs outside the table take the end pieces'
// polynomials (extrapolated), as the PyTorch evaluation does. No matrix products: per row one piece's
// 6 M coefficients, both polynomials by one Horner pass, vectorized over the M channels. No gradient
// (inference only: a compressed model is never trained).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

// the piece of ``x`` in a part of n pieces (floor, clamped to 0 .. n - 1; NaN gives 0)
inline int64_t piece_of(double f, int64_t n) {
  const double i = std::floor(f);
  return i >= 0.0 ? (i <= static_cast<double>(n - 1) ? static_cast<int64_t>(i) : n - 1) : 0;
}

template <typename T>
void tabulated_impl(const T* s, const T* table, T* g, T* t, int64_t rows, int64_t m, double lo, double step,
                    int64_t n_fine, double step_coarse, int64_t n_coarse) {
  const T lo_t = static_cast<T>(lo), step_t = static_cast<T>(step), coarse_t = static_cast<T>(step_coarse);
  const T hi = static_cast<T>(lo + static_cast<double>(n_fine) * step);
  const T inv_fine = static_cast<T>(1.0 / step), inv_coarse = static_cast<T>(1.0 / step_coarse);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T x = s[r];
      int64_t piece;
      T u, inv_h;
      if (x < hi) {
        const T f = (x - lo_t) / step_t;
        piece = piece_of(f, n_fine);
        u = f - static_cast<T>(piece);
        inv_h = inv_fine;
      } else {
        const T f = (x - hi) / coarse_t;
        const int64_t j = piece_of(f, n_coarse);
        piece = n_fine + j;
        u = f - static_cast<T>(j);
        inv_h = inv_coarse;
      }
      const T* c = table + piece * 6 * m;
      T* gr = g + r * m;
      T* tr = t + r * m;
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) {
        T dp = c[5 * m + k];
        T p = c[4 * m + k] + dp * u;
        dp = p + dp * u;
        p = c[3 * m + k] + p * u;
        dp = p + dp * u;
        p = c[2 * m + k] + p * u;
        dp = p + dp * u;
        p = c[m + k] + p * u;
        dp = p + dp * u;
        p = c[k] + p * u;
        gr[k] = p;
        tr[k] = dp * inv_h;
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> tabulated_value_and_tangent(const at::Tensor& s, const at::Tensor& table, double lo,
                                                    double step, int64_t n_fine, double step_coarse) {
  TORCH_CHECK(s.device().is_cpu() && table.device().is_cpu(), "dpfit::tabulated_value_and_tangent: CPU tensors");
  TORCH_CHECK(table.dim() == 3 && table.size(1) == 6 && table.is_contiguous(),
              "dpfit::tabulated_value_and_tangent: a contiguous table (pieces, 6, M)");
  TORCH_CHECK(s.scalar_type() == table.scalar_type(), "dpfit::tabulated_value_and_tangent: s and table of one dtype");
  TORCH_CHECK(s.is_contiguous() && (s.dim() == 1 || (s.dim() == 2 && s.size(1) == 1)),
              "dpfit::tabulated_value_and_tangent: s (rows, 1)");
  TORCH_CHECK(0 < n_fine && n_fine < table.size(0) && step > 0.0 && step_coarse > 0.0,
              "dpfit::tabulated_value_and_tangent: 0 < n_fine < pieces and positive steps");
  const int64_t rows = s.size(0), m = table.size(2);
  at::Tensor g = at::empty({rows, m}, s.options());
  at::Tensor t = at::empty({rows, m}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "tabulated_value_and_tangent", [&] {
    tabulated_impl<scalar_t>(s.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                             t.data_ptr<scalar_t>(), rows, m, lo, step, n_fine, step_coarse, table.size(0) - n_fine);
  });
  return {g, t};
}
