// An embedding net's value and ds-tangent (forward) and their backward, in blocks of rows that stay in
// the core's cache. Layers: y = idt * tanh(x W + b) + res(x); the tangent along the scalar input s:
// ty = idt * (1 - h^2) * (tx W) + res(tx), with res: none (kind 0), x (kind 1) or [x, x] (kind 2).
// The first layer's input is s (rows, 1) with tx = 1. The forward keeps each layer's activations
// h = tanh(x W + b) and u = tx W; the backward rebuilds the layers' inputs from them block by block.
// Matrix products (one thread each: the blocks are spread over the threads): with AVX-512, the small
// register-tiled kernel below (these products are thin: 25 to 100 wide, 128 rows; BLAS runs them at
// 27-39 GFLOP/s per core on the development machine, this kernel at 44-54); otherwise the BLAS inside
// libtorch (sgemm_/dgemm_ of libtorch_cpu, looked up there: a host may define its own, e.g. LAMMPS's
// bundled reference BLAS, which a plain symbol reference would bind to, several times slower).
#include "kernels.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                          const int*, const double*, const int*, const double*, double*, const int*);

// ``name`` (sgemm_ / dgemm_) from libtorch_cpu, which is loaded already (this library links it); from the
// process's global scope only if libtorch exports none.
template <typename F>
F torch_blas(const char* name) {
  void* handle = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  void* fn = handle != nullptr ? dlsym(handle, name) : nullptr;
  if (fn == nullptr) fn = dlsym(RTLD_DEFAULT, name);
  TORCH_CHECK(fn != nullptr, "dpfit op library: no ", name, " in libtorch_cpu or the process");
  return reinterpret_cast<F>(fn);
}

}  // namespace

// tanh in place, vectorized (glibc's libmvec under -ffast-math, for every instruction set we build for);
// also used by fitting_net.cpp. float64: tanh(x) = expm1(2x) / (expm1(2x) + 2), |x| clamped at 20
// (where tanh is 1 to double precision): libmvec's vector expm1 is about twice as fast as its tanh.
void vector_tanh(float* h, size_t n) {
#pragma omp simd
  for (size_t e = 0; e < n; ++e) h[e] = std::tanh(h[e]);
}
void vector_tanh(double* h, size_t n) {
#pragma omp simd
  for (size_t e = 0; e < n; ++e) {
    const double x = h[e] > 20.0 ? 20.0 : (h[e] < -20.0 ? -20.0 : h[e]);
    const double q = std::expm1(2.0 * x);
    h[e] = q / (q + 2.0);
  }
}

// dst[0 .. n) = src[0 .. n): with AVX-512, non-temporal stores where dst is 64-byte aligned (the lines
// are not read into the cache first: for large outputs read back only later, by another kernel or the
// backward). Also used by slot_contraction.cpp.
template <typename T>
static inline void stream_copy_impl(T* dst, const T* src, size_t n) {
#if defined(__AVX512F__)
  constexpr size_t L = 64 / sizeof(T);
  size_t e = 0;
  for (; e < n && (reinterpret_cast<uintptr_t>(dst + e) & 63) != 0; ++e) dst[e] = src[e];
  for (; e + L <= n; e += L) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + e), _mm512_loadu_si512(src + e));
  for (; e < n; ++e) dst[e] = src[e];
  _mm_sfence();
#else
  std::copy(src, src + n, dst);
#endif
}
void stream_copy(float* dst, const float* src, size_t n) { stream_copy_impl(dst, src, n); }
void stream_copy(double* dst, const double* src, size_t n) { stream_copy_impl(dst, src, n); }

namespace {

inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  static const sgemm_fn sgemm = torch_blas<sgemm_fn>("sgemm_");
  sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  static const dgemm_fn dgemm = torch_blas<dgemm_fn>("dgemm_");
  dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

#if defined(__AVX512F__)
// C (m x n, row stride ldc) = A B, or C + A B with ``acc``: A (m x k) with element (i, p) at
// a[i * sai + p * sap] (so A may be a transposed view), B (k x n) row-major (row stride ldb). Tiles of
// up to 8 rows x 3 vectors of C stay in registers over the whole k loop; the last vector of a row is
// masked, so any n works and nothing past column n is read or written.
template <typename T>
struct Vec;
template <>
struct Vec<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int L = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static V loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v, M m) { _mm512_mask_storeu_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
};
template <>
struct Vec<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
};

// One tile: MR rows x NV vectors of C (the last vector under the mask ``last``).
template <typename T, int MR, int NV>
inline void gemm_tile(int k, const T* a, int64_t sai, int64_t sap, const T* b, int64_t ldb, T* c, int64_t ldc,
                      typename Vec<T>::M last, bool acc) {
  using W = Vec<T>;
  using V = typename W::V;
  V cr[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) cr[i][v] = W::zero();
  for (int p = 0; p < k; ++p) {
    V bv[NV];
    const T* bp = b + p * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = v + 1 < NV ? W::loadu(bp + v * W::L) : W::load(bp + v * W::L, last);
    const T* ap = a + p * sap;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V ai = W::set1(ap[i * sai]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) cr[i][v] = W::fma(ai, bv[v], cr[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      T* cp = c + i * ldc + v * W::L;
      const typename W::M m = v + 1 < NV ? static_cast<typename W::M>(-1) : last;
      V r = cr[i][v];
      if (acc) r = W::add(r, W::load(cp, m));
      W::store(cp, r, m);
    }
}

// MR rows of C, all n columns: tiles of 3 vectors, then 2 or 1.
template <typename T, int MR>
inline void gemm_rows(int n, int k, const T* a, int64_t sai, int64_t sap, const T* b, int64_t ldb, T* c, int64_t ldc,
                      bool acc) {
  using W = Vec<T>;
  using M = typename W::M;
  const int nvec = (n + W::L - 1) / W::L;
  const int rem = n - (nvec - 1) * W::L;
  const M full = static_cast<M>(-1);
  const M tail = rem == W::L ? full : static_cast<M>((1u << rem) - 1);
  for (int v0 = 0; v0 < nvec;) {
    const int nv = std::min(3, nvec - v0);
    const M last = v0 + nv == nvec ? tail : full;
    const T* bp = b + v0 * W::L;
    T* cp = c + v0 * W::L;
    if (nv == 3)
      gemm_tile<T, MR, 3>(k, a, sai, sap, bp, ldb, cp, ldc, last, acc);
    else if (nv == 2)
      gemm_tile<T, MR, 2>(k, a, sai, sap, bp, ldb, cp, ldc, last, acc);
    else
      gemm_tile<T, MR, 1>(k, a, sai, sap, bp, ldb, cp, ldc, last, acc);
    v0 += nv;
  }
}

template <typename T>
void small_gemm(int m, int n, int k, const T* a, int64_t sai, int64_t sap, const T* b, int64_t ldb, T* c, int64_t ldc,
                bool acc) {
  if (m <= 0 || n <= 0) return;
  int i = 0;
  for (; i + 8 <= m; i += 8) gemm_rows<T, 8>(n, k, a + i * sai, sai, sap, b, ldb, c + i * ldc, ldc, acc);
  const T* ai = a + i * sai;
  T* ci = c + i * ldc;
  switch (m - i) {
    case 7: gemm_rows<T, 7>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 6: gemm_rows<T, 6>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 5: gemm_rows<T, 5>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 4: gemm_rows<T, 4>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 3: gemm_rows<T, 3>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 2: gemm_rows<T, 2>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    case 1: gemm_rows<T, 1>(n, k, ai, sai, sap, b, ldb, ci, ldc, acc); break;
    default: break;
  }
}
#endif

// Row-major products: C (r x o) = X (r x a) W (a x o) + beta C (beta 0 or 1), and C (r x a) = D (r x o)
// W^T + beta C (wt: W^T, o x a row-major, for the small kernel).
template <typename T>
inline void rows_times(const T* x, const T* w, T* c, int r, int a, int o, T beta) {
#if defined(__AVX512F__)
  small_gemm<T>(r, o, a, x, a, 1, w, o, c, o, beta != T(0));
#else
  gemm('N', 'N', o, r, a, T(1), w, o, x, a, beta, c, o);
#endif
}
template <typename T>
inline void rows_times_t(const T* d, const T* w, const T* wt, T* c, int r, int a, int o, T beta) {
#if defined(__AVX512F__)
  (void)w;
  small_gemm<T>(r, a, o, d, o, 1, wt, a, c, a, beta != T(0));
#else
  (void)wt;
  gemm('T', 'N', a, r, o, T(1), w, o, d, o, beta, c, a);
#endif
}
// G (a x o) += X^T (a x r) D (r x o)
template <typename T>
inline void accumulate_xt_d(const T* x, const T* d, T* g, int r, int a, int o) {
#if defined(__AVX512F__)
  small_gemm<T>(a, o, r, x, 1, a, d, o, g, o, true);
#else
  gemm('N', 'T', o, a, r, T(1), d, o, x, a, T(1), g, o);
#endif
}

struct Layer {
  int in, out, kind;
  bool has_idt;
};

template <typename T>
struct Net {
  std::vector<Layer> layers;
  std::vector<const T*> w, b, idt;
  std::vector<std::vector<T>> wt;  // W^T (out x in) of each layer, for the backward's D W^T (else empty)
  int widest = 1;
};

template <typename T>
Net<T> make_net(const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& biases,
                const std::vector<at::Tensor>& idts, const std::vector<int64_t>& kinds, bool transposed = false) {
  Net<T> net;
  for (size_t k = 0; k < matrices.size(); ++k) {
    Layer l{static_cast<int>(matrices[k].size(0)), static_cast<int>(matrices[k].size(1)), static_cast<int>(kinds[k]),
            idts[k].numel() > 0};
    net.layers.push_back(l);
    net.w.push_back(matrices[k].data_ptr<T>());
    net.b.push_back(biases[k].data_ptr<T>());
    net.idt.push_back(l.has_idt ? idts[k].data_ptr<T>() : nullptr);
    std::vector<T> wt(transposed ? (size_t)l.in * l.out : 0);  // only the backward's D W^T reads it
    const T* w = net.w.back();
    for (int c = 0; c < l.in && transposed; ++c)
      for (int j = 0; j < l.out; ++j) wt[(size_t)j * l.in + c] = w[(size_t)c * l.out + j];
    net.wt.push_back(std::move(wt));
    net.widest = std::max(net.widest, l.out);
  }
  return net;
}

// A layer's activation on r rows: h = tanh(x W + b) and u = tx W (tx == nullptr: first layer, x = s,
// tx = 1, u = row 0 of W).
template <typename T>
void layer_activation(const Layer& l, const T* w, const T* b, const T* x, const T* tx, T* h, T* u, int r) {
  const int a = l.in, o = l.out;
  if (tx == nullptr) {
    for (int i = 0; i < r; ++i) {
      const T si = x[i];
      T* hi = h + (size_t)i * o;
#pragma omp simd
      for (int j = 0; j < o; ++j) hi[j] = si * w[j] + b[j];
    }
    for (int i = 0; i < r; ++i) std::copy(w, w + o, u + (size_t)i * o);
  } else {  // h = X W + b with C preset to the bias (beta = 1); u = tx W (beta = 0)
    for (int i = 0; i < r; ++i) std::copy(b, b + o, h + (size_t)i * o);
    rows_times(x, w, h, r, a, o, T(1));
    rows_times(tx, w, u, r, a, o, T(0));
  }
  vector_tanh(h, (size_t)r * o);
}

// A layer's output and tangent from its activation: y = idt h + res(x), ty = idt (1 - h^2) u + res(tx).
template <typename T>
void layer_output(const Layer& l, const T* idt, const T* x, const T* tx, const T* h, const T* u, T* y, T* ty, int r) {
  const int a = l.in, o = l.out;
  for (int i = 0; i < r; ++i) {
    const T* hi = h + (size_t)i * o;
    const T* ui = u + (size_t)i * o;
    T* yi = y + (size_t)i * o;
    T* tyi = ty + (size_t)i * o;
    if (idt != nullptr) {
#pragma omp simd
      for (int j = 0; j < o; ++j) {
        yi[j] = idt[j] * hi[j];
        tyi[j] = idt[j] * (T(1) - hi[j] * hi[j]) * ui[j];
      }
    } else {
#pragma omp simd
      for (int j = 0; j < o; ++j) {
        yi[j] = hi[j];
        tyi[j] = (T(1) - hi[j] * hi[j]) * ui[j];
      }
    }
    if (l.kind == 0) continue;
    const T* xi = x + (size_t)i * a;
    for (int half = 0; half < l.kind; ++half) {
      T* yh = yi + half * a;
      T* tyh = tyi + half * a;
      if (tx == nullptr) {
        for (int c = 0; c < a; ++c) {
          yh[c] += xi[c];
          tyh[c] += T(1);
        }
      } else {
        const T* txi = tx + (size_t)i * a;
#pragma omp simd
        for (int c = 0; c < a; ++c) {
          yh[c] += xi[c];
          tyh[c] += txi[c];
        }
      }
    }
  }
}

template <typename T>
struct Scratch {
  // per layer: the input x, tx (layer 0: s and 1, not stored) and h and u (the forward streams them to
  // the kept activations when it keeps them; the backward reads those, so it needs none here);
  // gradient buffers of the widest layer
  std::vector<std::vector<T>> x, tx, h, u;
  std::vector<T> gy, gty, gx, gtx, dz, du;
  Scratch(const Net<T>& net, int block, bool with_activations) {
    const size_t L = net.layers.size();
    x.resize(L);
    tx.resize(L);
    h.resize(L);
    u.resize(L);
    for (size_t k = 0; k < L; ++k) {
      const auto& l = net.layers[k];
      if (k > 0) {
        x[k].resize((size_t)block * l.in);
        tx[k].resize((size_t)block * l.in);
      }
      if (with_activations) {
        h[k].resize((size_t)block * l.out);
        u[k].resize((size_t)block * l.out);
      }
    }
    const size_t wide = (size_t)block * net.widest;
    for (auto* v : {&gy, &gty, &gx, &gtx, &dz, &du}) v->resize(wide);
  }
};

// Row r0's place in layer k's kept activations (nullptr when none are kept).
template <typename T>
inline T* kept_rows(const std::vector<at::Tensor>& kept, size_t k, int64_t r0) {
  return kept.empty() ? nullptr : kept[k].data_ptr<T>() + r0 * kept[k].size(1);
}

template <typename T>
void forward_impl(const at::Tensor& s, const Net<T>& net, at::Tensor& g, at::Tensor& t,
                  const std::vector<at::Tensor>& kept_h, const std::vector<at::Tensor>& kept_u, int block) {
  const int64_t rows = s.size(0);
  const int64_t nblocks = (rows + block - 1) / block;
  const size_t L = net.layers.size();
  const int o_last = net.layers.back().out;
  const T* sp = s.data_ptr<T>();
  T* gp = g.data_ptr<T>();
  T* tp = t.data_ptr<T>();
  const bool keep = !kept_h.empty();
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(net, block, true);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block;
      const int r = static_cast<int>(std::min<int64_t>(block, rows - r0));
      const T* x = sp + r0;
      const T* tx = nullptr;
      for (size_t k = 0; k < L; ++k) {
        const bool last = k + 1 == L;
        T* h = sc.h[k].data();
        T* u = sc.u[k].data();
        // g and t (the last layer's) are written in place: the slot contractions read them next
        T* y = last ? gp + r0 * o_last : sc.x[k + 1].data();
        T* ty = last ? tp + r0 * o_last : sc.tx[k + 1].data();
        layer_activation(net.layers[k], net.w[k], net.b[k], x, tx, h, u, r);
        layer_output(net.layers[k], net.idt[k], x, tx, h, u, y, ty, r);
        if (keep) {  // computed in the cache-resident scratch, then streamed out (read only by the backward)
          const size_t n = (size_t)r * net.layers[k].out;
          stream_copy(kept_rows<T>(kept_h, k, r0), h, n);
          stream_copy(kept_rows<T>(kept_u, k, r0), u, n);
        }
        x = y;
        tx = ty;
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& s, const at::Tensor& grad_g, const at::Tensor& grad_t, const Net<T>& net,
                   const std::vector<at::Tensor>& kept_h, const std::vector<at::Tensor>& kept_u,
                   std::vector<at::Tensor>& grads, at::Tensor& grad_s, int block) {
  const int64_t rows = s.size(0);
  const int64_t nblocks = (rows + block - 1) / block;
  const size_t L = net.layers.size();
  const int o_last = net.layers.back().out;
  const T* sp = s.data_ptr<T>();
  const T* ggp = grad_g.data_ptr<T>();
  const T* gtp = grad_t.data_ptr<T>();
  T* gsp = grad_s.defined() ? grad_s.data_ptr<T>() : nullptr;
  // per thread accumulators of dW, db, didt (layer k at offset[k])
  std::vector<size_t> offset(L + 1, 0);
  for (size_t k = 0; k < L; ++k) {
    const auto& l = net.layers[k];
    offset[k + 1] = offset[k] + (size_t)l.in * l.out + (size_t)l.out * (l.has_idt ? 2 : 1);
  }
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<T>> acc(nthreads, std::vector<T>(offset[L], T(0)));
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(net, block, false);
    std::vector<T>& my = acc[at::get_thread_num()];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block;
      const int r = static_cast<int>(std::min<int64_t>(block, rows - r0));
      // the layers' inputs, from the kept activations
      for (size_t k = 0; k + 1 < L; ++k) {
        const T* x = k == 0 ? sp + r0 : sc.x[k].data();
        const T* tx = k == 0 ? nullptr : sc.tx[k].data();
        layer_output(net.layers[k], net.idt[k], x, tx, kept_rows<T>(kept_h, k, r0), kept_rows<T>(kept_u, k, r0),
                     sc.x[k + 1].data(), sc.tx[k + 1].data(), r);
      }
      for (size_t kk = L; kk-- > 0;) {
        const auto& l = net.layers[kk];
        const int a = l.in, o = l.out;
        const T* h = kept_rows<T>(kept_h, kk, r0);
        const T* u = kept_rows<T>(kept_u, kk, r0);
        const T* idt = net.idt[kk];
        T* gw = my.data() + offset[kk];
        T* gb = gw + (size_t)a * o;
        T* gi = gb + o;  // didt when the layer has one
        T* dz = sc.dz.data();
        T* du = sc.du.data();
        // the last layer reads the incoming gradients in place; the others, the scratch
        const T* gy = kk + 1 == L ? ggp + r0 * o_last : sc.gy.data();
        const T* gty = kk + 1 == L ? gtp + r0 * o_last : sc.gty.data();
        for (int i = 0; i < r; ++i) {
          const T* hi = h + (size_t)i * o;
          const T* ui = u + (size_t)i * o;
          const T* gyi = gy + (size_t)i * o;
          const T* gtyi = gty + (size_t)i * o;
          T* dzi = dz + (size_t)i * o;
          T* dui = du + (size_t)i * o;
          if (idt != nullptr) {
#pragma omp simd
            for (int j = 0; j < o; ++j) {
              const T dh = T(1) - hi[j] * hi[j];
              dui[j] = idt[j] * dh * gtyi[j];
              dzi[j] = idt[j] * dh * (gyi[j] - T(2) * hi[j] * ui[j] * gtyi[j]);
              gb[j] += dzi[j];
              gi[j] += gyi[j] * hi[j] + gtyi[j] * dh * ui[j];
            }
          } else {
#pragma omp simd
            for (int j = 0; j < o; ++j) {
              const T dh = T(1) - hi[j] * hi[j];
              dui[j] = dh * gtyi[j];
              dzi[j] = dh * (gyi[j] - T(2) * hi[j] * ui[j] * gtyi[j]);
              gb[j] += dzi[j];
            }
          }
        }
        if (kk > 0) {
          accumulate_xt_d(sc.x[kk].data(), dz, gw, r, a, o);
          accumulate_xt_d(sc.tx[kk].data(), du, gw, r, a, o);
          // the residual's share first, then += D W^T (beta = 1)
          std::fill(sc.gx.data(), sc.gx.data() + (size_t)r * a, T(0));
          std::fill(sc.gtx.data(), sc.gtx.data() + (size_t)r * a, T(0));
          for (int i = 0; i < r && l.kind > 0; ++i) {
            T* gxi = sc.gx.data() + (size_t)i * a;
            T* gtxi = sc.gtx.data() + (size_t)i * a;
            for (int half = 0; half < l.kind; ++half) {
              const T* gyh = gy + (size_t)i * o + half * a;
              const T* gtyh = gty + (size_t)i * o + half * a;
#pragma omp simd
              for (int c = 0; c < a; ++c) {
                gxi[c] += gyh[c];
                gtxi[c] += gtyh[c];
              }
            }
          }
          rows_times_t(dz, net.w[kk], net.wt[kk].data(), sc.gx.data(), r, a, o, T(1));
          rows_times_t(du, net.w[kk], net.wt[kk].data(), sc.gtx.data(), r, a, o, T(1));
          std::swap(sc.gy, sc.gx);
          std::swap(sc.gty, sc.gtx);
        } else {  // input s (r x 1) with tx = 1: dW[0] collects both paths
          const T* s_blk = sp + r0;
          const T* w = net.w[0];
          for (int i = 0; i < r; ++i) {
            const T* dzi = dz + (size_t)i * o;
            const T* dui = du + (size_t)i * o;
            T sum = T(0);
            const T si = s_blk[i];
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < o; ++j) {
              gw[j] += si * dzi[j] + dui[j];
              sum += dzi[j] * w[j];
            }
            if (gsp != nullptr) {
              for (int half = 0; half < l.kind; ++half) sum += gy[(size_t)i * o + half];
              gsp[r0 + i] = sum;
            }
          }
        }
      }
    }
  });
  for (size_t k = 0; k < L; ++k) {
    const auto& l = net.layers[k];
    T* gw = grads[k * 3].data_ptr<T>();
    T* gb = grads[k * 3 + 1].data_ptr<T>();
    T* gi = l.has_idt ? grads[k * 3 + 2].data_ptr<T>() : nullptr;
    const size_t nw = (size_t)l.in * l.out;
    for (const auto& my : acc) {
      const T* src = my.data() + offset[k];
      for (size_t e = 0; e < nw; ++e) gw[e] += src[e];
      for (int j = 0; j < l.out; ++j) gb[j] += src[nw + j];
      if (gi != nullptr)
        for (int j = 0; j < l.out; ++j) gi[j] += src[nw + l.out + j];
    }
  }
}

void check(const at::Tensor& s, const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& biases,
           const std::vector<at::Tensor>& idts, const std::vector<int64_t>& kinds) {
  TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.dim() == 2 && s.size(1) == 1, "s: contiguous (rows, 1) CPU");
  TORCH_CHECK(!matrices.empty() && matrices.size() == biases.size() && matrices.size() == idts.size() &&
                  matrices.size() == kinds.size(), "one matrix, bias, idt and kind per layer");
  TORCH_CHECK(matrices[0].size(0) == 1, "the first layer's input is the scalar s");
  for (size_t k = 0; k < matrices.size(); ++k) {
    TORCH_CHECK(matrices[k].is_contiguous() && biases[k].is_contiguous() && idts[k].is_contiguous(), "contiguous parameters");
    TORCH_CHECK(matrices[k].scalar_type() == s.scalar_type() && biases[k].scalar_type() == s.scalar_type(), "one dtype");
    if (k > 0) TORCH_CHECK(matrices[k].size(0) == matrices[k - 1].size(1), "layer widths chain");
  }
}

}  // namespace

// (g, dg/ds) of every row; with ``keep`` also each layer's activations h and u (for the backward).
// Returns g, t, then h and u of each layer (none without keep).
std::vector<at::Tensor> value_and_tangent(const at::Tensor& s, const std::vector<at::Tensor>& matrices,
                                          const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& idts,
                                          const std::vector<int64_t>& kinds, int64_t block, bool keep) {
  check(s, matrices, biases, idts, kinds);
  const int64_t o = matrices.back().size(1);
  std::vector<at::Tensor> out{at::empty({s.size(0), o}, s.options()), at::empty({s.size(0), o}, s.options())};
  std::vector<at::Tensor> kept_h, kept_u;
  for (size_t k = 0; k < matrices.size() && keep; ++k) {
    kept_h.push_back(at::empty({s.size(0), matrices[k].size(1)}, s.options()));
    kept_u.push_back(at::empty({s.size(0), matrices[k].size(1)}, s.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "value_and_tangent", [&] {
    forward_impl<scalar_t>(s, make_net<scalar_t>(matrices, biases, idts, kinds), out[0], out[1], kept_h, kept_u,
                           static_cast<int>(block));
  });
  out.insert(out.end(), kept_h.begin(), kept_h.end());
  out.insert(out.end(), kept_u.begin(), kept_u.end());
  return out;
}

// Returns grad_s (empty unless need_s) followed by dW, db, didt (empty when none) per layer.
std::vector<at::Tensor> value_and_tangent_backward(const at::Tensor& s, const at::Tensor& grad_g,
                                                   const at::Tensor& grad_t, const std::vector<at::Tensor>& kept_h,
                                                   const std::vector<at::Tensor>& kept_u,
                                                   const std::vector<at::Tensor>& matrices,
                                                   const std::vector<at::Tensor>& biases,
                                                   const std::vector<at::Tensor>& idts,
                                                   const std::vector<int64_t>& kinds, int64_t block, bool need_s) {
  check(s, matrices, biases, idts, kinds);
  TORCH_CHECK(grad_g.is_contiguous() && grad_t.is_contiguous(), "contiguous gradients");
  TORCH_CHECK(kept_h.size() == matrices.size() && kept_u.size() == matrices.size(), "kept activations per layer");
  std::vector<at::Tensor> grads;
  for (size_t k = 0; k < matrices.size(); ++k) {
    grads.push_back(at::zeros_like(matrices[k]));
    grads.push_back(at::zeros_like(biases[k]));
    grads.push_back(at::zeros_like(idts[k]));
  }
  at::Tensor grad_s = need_s ? at::empty_like(s) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "value_and_tangent_backward", [&] {
    backward_impl<scalar_t>(s, grad_g, grad_t, make_net<scalar_t>(matrices, biases, idts, kinds, true), kept_h, kept_u,
                            grads, grad_s, static_cast<int>(block));
  });
  std::vector<at::Tensor> out{need_s ? grad_s : at::empty({0}, s.options())};
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}

// C^T = op(B)^T op(A)^T in BLAS's column-major terms: a row-major matrix is its transpose there.
void matmul(const at::Tensor& a_, bool ta, const at::Tensor& b_, bool tb, at::Tensor& c, bool accumulate) {
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  TORCH_CHECK(c.is_contiguous() && a.dim() == 2 && b.dim() == 2 &&
                  c.dim() == 2 && a.scalar_type() == c.scalar_type() && b.scalar_type() == c.scalar_type(),
              "matmul: contiguous 2-d matrices of one dtype");
  const int64_t m = ta ? a.size(1) : a.size(0), k = ta ? a.size(0) : a.size(1);
  const int64_t n = tb ? b.size(0) : b.size(1);
  TORCH_CHECK((tb ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n, "matmul: shapes");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "matmul", [&] {
    gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
         scalar_t(1), b.data_ptr<scalar_t>(), static_cast<int>(b.size(1)), a.data_ptr<scalar_t>(),
         static_cast<int>(a.size(1)), accumulate ? scalar_t(1) : scalar_t(0), c.data_ptr<scalar_t>(),
         static_cast<int>(n));
  });
}

at::Tensor matmul(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb) {
  at::Tensor c = at::empty({ta ? a.size(1) : a.size(0), tb ? b.size(0) : b.size(1)}, a.options());
  matmul(a, ta, b, tb, c, false);
  return c;
}
