// The descriptor's per-atom products, D = G^T G< and its vector-Jacobian product, one atom at a time.
//
// G (N, 4, M) is each atom's contracted embedding (G^T / nnei of the descriptor), G< its first a
// columns (axis_neuron), D (N, M, a):
//   gram:     D[n, i, j] = sum_c X[n, c, i] Y[n, c, j]                   (j < a)
//             (symmetric: + Y[n, c, i] X[n, c, j], the gradient of the vjp for W)
//   vjp:      V[n, c, k] = sum_{j<a} X[n, c, j] W[n, k, j] + [k < a] sum_i X[n, c, i] W[n, i, k]
// vjp(G, W) is the gradient of D(G) for G under the cotangent W, and the vjp is bilinear: its
// gradients are vjp(C, W) for X and the symmetric gram of (C, X) for W. With K = 4 or a = 16 these
// products are too thin for a BLAS (torch.bmm loops over the atoms, ~1 us per call); here each atom's
// products stay in L1 and vectorize over the M or a columns (the vjp's sums stay in registers for
// a = 16, DeePMD's usual axis_neuron).
#include "kernels.h"

#include <ATen/Parallel.h>

namespace {

void check_g(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 3 && x.size(1) == 4, name,
              ": contiguous (N, 4, M) on CPU");
}

template <typename T>
void gram_impl(const T* x, const T* y, T* out, int64_t n_atoms, int64_t m, int64_t a, bool symmetric) {
  at::parallel_for(0, n_atoms, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* xn = x + n * 4 * m;
      const T* yn = y + n * 4 * m;
      T* o = out + n * m * a;
      for (int64_t i = 0; i < m; ++i) {
        T* oi = o + i * a;
        const T x0 = xn[i], x1 = xn[m + i], x2 = xn[2 * m + i], x3 = xn[3 * m + i];
        if (symmetric) {
          const T y0 = yn[i], y1 = yn[m + i], y2 = yn[2 * m + i], y3 = yn[3 * m + i];
#pragma omp simd
          for (int64_t j = 0; j < a; ++j)
            oi[j] = x0 * yn[j] + x1 * yn[m + j] + x2 * yn[2 * m + j] + x3 * yn[3 * m + j] + y0 * xn[j] +
                    y1 * xn[m + j] + y2 * xn[2 * m + j] + y3 * xn[3 * m + j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < a; ++j)
            oi[j] = x0 * yn[j] + x1 * yn[m + j] + x2 * yn[2 * m + j] + x3 * yn[3 * m + j];
        }
      }
    }
  });
}

// acc[c][q] += x[c * stride] * v[q] for the four rows c and the W columns q (registers: W is fixed)
template <int W, typename T>
inline void add_outer4(T (&acc)[4][W], const T* x, int64_t stride, const T* v) {
  const T x0 = x[0], x1 = x[stride], x2 = x[2 * stride], x3 = x[3 * stride];
#pragma omp simd
  for (int q = 0; q < W; ++q) {
    acc[0][q] += x0 * v[q];
    acc[1][q] += x1 * v[q];
    acc[2][q] += x2 * v[q];
    acc[3][q] += x3 * v[q];
  }
}

// vjp for a compile-time a (the common axis_neuron 16): both terms accumulate in registers.
// First term: 8 columns k at a time, W's columns read with a stride of A; second: the (4, A) block.
template <typename T, int A>
void vjp_fixed(const T* xn, const T* wn, T* o, int64_t m) {
  constexpr int KB = 8;
  int64_t k0 = 0;
  for (; k0 + KB <= m; k0 += KB) {
    T acc[4][KB] = {};
    for (int j = 0; j < A; ++j) {
      T col[KB];
      for (int q = 0; q < KB; ++q) col[q] = wn[(k0 + q) * A + j];
      add_outer4<KB>(acc, xn + j, m, col);
    }
    for (int c = 0; c < 4; ++c)
      for (int q = 0; q < KB; ++q) o[c * m + k0 + q] = acc[c][q];
  }
  for (int64_t k = k0; k < m; ++k)
    for (int c = 0; c < 4; ++c) {
      T sum = T(0);
      for (int j = 0; j < A; ++j) sum += xn[c * m + j] * wn[k * A + j];
      o[c * m + k] = sum;
    }
  T acc[4][A] = {};
  for (int64_t i = 0; i < m; ++i) add_outer4<A>(acc, xn + i, m, wn + i * A);
  for (int c = 0; c < 4; ++c)
    for (int k = 0; k < A; ++k) o[c * m + k] += acc[c][k];
}

// vjp for any a: per column k four dot products over j, then the (4, a) block row by row
template <typename T>
void vjp_any(const T* xn, const T* wn, T* o, int64_t m, int64_t a) {
  for (int64_t k = 0; k < m; ++k) {
    const T* wk = wn + k * a;
    T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
    for (int64_t j = 0; j < a; ++j) {
      s0 += xn[j] * wk[j];
      s1 += xn[m + j] * wk[j];
      s2 += xn[2 * m + j] * wk[j];
      s3 += xn[3 * m + j] * wk[j];
    }
    o[k] = s0;
    o[m + k] = s1;
    o[2 * m + k] = s2;
    o[3 * m + k] = s3;
  }
  for (int c = 0; c < 4; ++c)
    for (int64_t i = 0; i < m; ++i) {
      const T xi = xn[c * m + i];
      const T* wi = wn + i * a;
      for (int64_t k = 0; k < a; ++k) o[c * m + k] += xi * wi[k];
    }
}

template <typename T>
void vjp_impl(const T* x, const T* w, T* out, int64_t n_atoms, int64_t m, int64_t a) {
  at::parallel_for(0, n_atoms, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (a == 16)
        vjp_fixed<T, 16>(x + n * 4 * m, w + n * m * a, out + n * 4 * m, m);
      else
        vjp_any<T>(x + n * 4 * m, w + n * m * a, out + n * 4 * m, m, a);
    }
  });
}

}  // namespace

// (N, M, a): sum_c x[n, c, i] y[n, c, j] (+ y[n, c, i] x[n, c, j] when symmetric), j < a.
at::Tensor descriptor_gram(const at::Tensor& x, const at::Tensor& y, int64_t a, bool symmetric) {
  check_g(x, "x");
  check_g(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(), "x, y: one shape and dtype");
  const int64_t n = x.size(0), m = x.size(2);
  TORCH_CHECK(a > 0 && a <= m, "0 < a <= M");
  at::Tensor out = at::empty({n, m, a}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "descriptor_gram", [&] {
    gram_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, m, a, symmetric);
  });
  return out;
}

// (N, 4, M): the gradient of D = gram(x, x) for x under the cotangent w (N, M, a).
at::Tensor descriptor_vjp(const at::Tensor& x, const at::Tensor& w) {
  check_g(x, "x");
  const int64_t n = x.size(0), m = x.size(2);
  TORCH_CHECK(w.is_contiguous() && w.dim() == 3 && w.size(0) == n && w.size(1) == m && w.size(2) <= m &&
                  w.scalar_type() == x.scalar_type(), "w: contiguous (N, M, a), x's dtype");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "descriptor_vjp", [&] {
    vjp_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, m, w.size(2));
  });
  return out;
}
