// A fitting net's atomic energy and its input gradient (forward), and the backward of both.
//
// Layers k < L: z = x W + b, h = tanh(z), y = idt h + res(x) (idt = 1 without a timestep; res: none,
// x, or [x, x] for kind 0, 1, 2); the last layer is linear, e = x_L w + c (one output). The input
// gradient with a constant output gradient of 1: g_L = w^T on every row, then for k = L-1 .. 0
//   gz_k = idt (1 - h^2) g_{k+1},   g_k = gz_k W^T + res^T(g_{k+1}).
// The backward takes the gradients of e and g_0 and runs two sweeps: up the input-gradient chain
// (k = 0 .. L-1), then down the value chain (k = L-1 .. 0), each layer's weight gradient taking one
// product from each. The products go to ATen's matrix multiply (MKL, all threads); everything between
// them is one pass over the (rows x width) arrays.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <vector>

namespace {

struct Fit {
  std::vector<at::Tensor> w, b, idt;  // tanh layers
  std::vector<int64_t> kind;
  at::Tensor w_out, b_out;            // linear output layer (H, 1), (1)
  size_t layers() const { return w.size(); }
};

Fit make_fit(const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& biases,
             const std::vector<at::Tensor>& idts, const std::vector<int64_t>& kinds) {
  TORCH_CHECK(matrices.size() >= 2 && matrices.size() == biases.size() && idts.size() + 1 == matrices.size() &&
                  kinds.size() + 1 == matrices.size(), "tanh layers (matrix, bias, idt, kind) and a linear output layer");
  Fit f;
  for (size_t k = 0; k + 1 < matrices.size(); ++k) {
    f.w.push_back(matrices[k]);
    f.b.push_back(biases[k]);
    f.idt.push_back(idts[k]);
    f.kind.push_back(kinds[k]);
  }
  f.w_out = matrices.back();
  f.b_out = biases.back();
  TORCH_CHECK(f.w_out.dim() == 2 && f.w_out.size(1) == 1, "the output layer has one output");
  return f;
}

// Rows in parallel: fn(row_begin, row_end).
template <typename F>
inline void over_rows(int64_t rows, F fn) {
  at::parallel_for(0, rows, 32, fn);
}

// res(x) added onto y (rows x o): kind 1 y += x, kind 2 y[:, :a] += x and y[:, a:] += x.
template <typename T>
void add_residual(T* y, const T* x, int64_t i0, int64_t i1, int64_t a, int64_t o, int64_t kind) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t half = 0; half < kind; ++half) {
      T* yh = y + i * o + half * a;
      const T* xi = x + i * a;
#pragma omp simd
      for (int64_t c = 0; c < a; ++c) yh[c] += xi[c];
    }
}

// res^T(g) written into out (rows x a): kind 1 g, kind 2 g[:, :a] + g[:, a:], kind 0 zeros.
template <typename T>
void residual_transpose(T* out, const T* g, int64_t i0, int64_t i1, int64_t a, int64_t o, int64_t kind) {
  for (int64_t i = i0; i < i1; ++i) {
    T* oi = out + i * a;
    std::fill(oi, oi + a, T(0));
    for (int64_t half = 0; half < kind; ++half) {
      const T* gh = g + i * o + half * a;
#pragma omp simd
      for (int64_t c = 0; c < a; ++c) oi[c] += gh[c];
    }
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x0, const Fit& f, bool keep) {
  const int64_t rows = x0.size(0);
  const size_t L = f.layers();
  std::vector<at::Tensor> xs{x0}, hs, gzs, gs;
  at::Tensor x = x0;
  for (size_t k = 0; k < L; ++k) {
    const int64_t a = f.w[k].size(0), o = f.w[k].size(1);
    at::Tensor h = at::empty({rows, o}, x0.options());  // b + x W (as at::addmm; never a view of b)
    h.copy_(f.b[k].reshape({1, o}).expand({rows, o}));
    matmul(x, false, f.w[k], false, h, true);
    at::Tensor y = at::empty({rows, o}, x0.options());
    T* hp = h.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* idt = opt_ptr<T>(f.idt[k]);
    const int64_t kind = f.kind[k];
    over_rows(rows, [&](int64_t i0, int64_t i1) {
      vector_tanh(hp + i0 * o, (size_t)(i1 - i0) * o);
      for (int64_t i = i0; i < i1; ++i) {
        const T* hi = hp + i * o;
        T* yi = yp + i * o;
        if (idt != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < o; ++j) yi[j] = idt[j] * hi[j];
        } else {
          std::copy(hi, hi + o, yi);
        }
      }
      add_residual(yp, xp, i0, i1, a, o, kind);
    });
    hs.push_back(h);
    xs.push_back(y);
    x = y;
  }
  at::Tensor energy = at::empty({rows, f.w_out.size(1)}, x0.options());
  energy.copy_(f.b_out.reshape({1, -1}).expand({rows, f.w_out.size(1)}));
  matmul(x, false, f.w_out, false, energy, true);
  // input gradient: g_L = w_out^T on every row
  const int64_t width = f.w_out.size(0);
  at::Tensor g = f.w_out.reshape({1, width}).expand({rows, width}).contiguous();
  std::vector<at::Tensor> g_above(L);
  for (size_t kk = L; kk-- > 0;) {
    const int64_t a = f.w[kk].size(0), o = f.w[kk].size(1);
    at::Tensor gz = at::empty({rows, o}, x0.options());
    at::Tensor below = at::empty({rows, a}, x0.options());
    const T* gp = g.data_ptr<T>();
    const T* hp = hs[kk].data_ptr<T>();
    T* gzp = gz.data_ptr<T>();
    T* bp = below.data_ptr<T>();
    const T* idt = opt_ptr<T>(f.idt[kk]);
    const int64_t kind = f.kind[kk];
    over_rows(rows, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* gi = gp + i * o;
        const T* hi = hp + i * o;
        T* gzi = gzp + i * o;
#pragma omp simd
        for (int64_t j = 0; j < o; ++j) gzi[j] = (idt != nullptr ? idt[j] : T(1)) * (T(1) - hi[j] * hi[j]) * gi[j];
      }
      residual_transpose(bp, gp, i0, i1, a, o, kind);
    });
    matmul(gz, false, f.w[kk], true, below, true);
    gzs.insert(gzs.begin(), gz);
    g_above[kk] = g;
    g = below;
  }
  std::vector<at::Tensor> out{energy, g};
  if (keep) {  // x_1 .. x_L, h_k, gz_k, g_{k+1} (k < L)
    out.insert(out.end(), xs.begin() + 1, xs.end());
    out.insert(out.end(), hs.begin(), hs.end());
    out.insert(out.end(), gzs.begin(), gzs.end());
    out.insert(out.end(), g_above.begin(), g_above.end());
  }
  return out;
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& x0, const at::Tensor& grad_e, const at::Tensor& grad_g0,
                                      const Fit& f, const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& hs,
                                      const std::vector<at::Tensor>& gzs, const std::vector<at::Tensor>& gs,
                                      bool need_x) {
  const int64_t rows = x0.size(0);
  const size_t L = f.layers();
  std::vector<at::Tensor> gw(L), gb(L), gi(L), hbar(L);
  for (size_t k = 0; k < L; ++k) {
    gi[k] = at::zeros_like(f.idt[k]);
    hbar[k] = at::zeros_like(hs[k]);
  }
  at::Tensor gw_out;
  // sweep 1, up the input-gradient chain: gbar = dLoss/dg_k
  if (grad_g0.defined()) {
    at::Tensor gbar = grad_g0;
    for (size_t k = 0; k < L; ++k) {
      const int64_t a = f.w[k].size(0), o = f.w[k].size(1);
      gw[k] = matmul(gbar, true, gzs[k], false);
      at::Tensor gzbar = matmul(gbar, false, f.w[k], false);
      at::Tensor next = at::empty({rows, o}, x0.options());
      const T* gzb = gzbar.data_ptr<T>();
      const T* hp = hs[k].data_ptr<T>();
      const T* gp = gs[k].data_ptr<T>();
      const T* gbp = gbar.data_ptr<T>();
      T* np_ = next.data_ptr<T>();
      T* hb = hbar[k].data_ptr<T>();
      const T* idt = opt_ptr<T>(f.idt[k]);
      const int64_t kind = f.kind[k];
      // idt's gradient: per thread partial sums, added in order
      const int nthreads = at::get_num_threads();
      std::vector<std::vector<T>> part(idt != nullptr ? nthreads : 0, std::vector<T>(o, T(0)));
      over_rows(rows, [&](int64_t i0, int64_t i1) {
        T* pi = idt != nullptr ? part[at::get_thread_num()].data() : nullptr;
        for (int64_t i = i0; i < i1; ++i) {
          const T* zi = gzb + i * o;
          const T* hi = hp + i * o;
          const T* gi_ = gp + i * o;
          T* ni = np_ + i * o;
          T* hbi = hb + i * o;
          if (idt != nullptr) {
#pragma omp simd
            for (int64_t j = 0; j < o; ++j) {
              const T d = T(1) - hi[j] * hi[j];
              ni[j] = zi[j] * idt[j] * d;
              pi[j] += zi[j] * gi_[j] * d;
              hbi[j] = T(-2) * zi[j] * gi_[j] * idt[j] * hi[j];
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < o; ++j) {
              const T d = T(1) - hi[j] * hi[j];
              ni[j] = zi[j] * d;
              hbi[j] = T(-2) * zi[j] * gi_[j] * hi[j];
            }
          }
        }
        add_residual(np_, gbp, i0, i1, a, o, kind);
      });
      if (idt != nullptr) {
        T* g_idt = gi[k].data_ptr<T>();
        for (const auto& p : part)
          for (int64_t j = 0; j < o; ++j) g_idt[j] += p[j];
      }
      gbar = next;
    }
    gw_out = gbar.sum(0).reshape({-1, 1});  // g_L = w_out^T on every row
  } else {
    gw_out = at::zeros_like(f.w_out);
  }
  // sweep 2, down the value chain: xbar = dLoss/dx_k
  at::Tensor ge = grad_e.defined() ? grad_e.reshape({rows, 1}) : at::zeros({rows, 1}, x0.options());
  matmul(xs[L], true, ge, false, gw_out, true);  // (gw_out: a new tensor either way)
  at::Tensor gb_out = ge.sum(0);
  at::Tensor xbar = matmul(ge, false, f.w_out, true);  // (rows, H)
  for (size_t kk = L; kk-- > 0;) {
    const int64_t a = f.w[kk].size(0), o = f.w[kk].size(1);
    const T* yb = xbar.data_ptr<T>();
    const T* hp = hs[kk].data_ptr<T>();
    T* zb = hbar[kk].data_ptr<T>();  // becomes zbar in place
    const T* idt = opt_ptr<T>(f.idt[kk]);
    const int nthreads = at::get_num_threads();
    std::vector<std::vector<T>> part(nthreads, std::vector<T>(2 * o, T(0)));  // bias, idt
    over_rows(rows, [&](int64_t i0, int64_t i1) {
      T* pb = part[at::get_thread_num()].data();
      T* pi = pb + o;
      for (int64_t i = i0; i < i1; ++i) {
        const T* ybi = yb + i * o;
        const T* hi = hp + i * o;
        T* zi = zb + i * o;
        if (idt != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < o; ++j) {
            pi[j] += ybi[j] * hi[j];
            zi[j] = (zi[j] + ybi[j] * idt[j]) * (T(1) - hi[j] * hi[j]);
            pb[j] += zi[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < o; ++j) {
            zi[j] = (zi[j] + ybi[j]) * (T(1) - hi[j] * hi[j]);
            pb[j] += zi[j];
          }
        }
      }
    });
    gb[kk] = at::zeros_like(f.b[kk]);
    T* g_b = gb[kk].data_ptr<T>();
    T* g_idt = idt != nullptr ? gi[kk].data_ptr<T>() : nullptr;
    for (const auto& p : part)
      for (int64_t j = 0; j < o; ++j) {
        g_b[j] += p[j];
        if (g_idt != nullptr) g_idt[j] += p[o + j];
      }
    if (gw[kk].defined())
      matmul(xs[kk], true, hbar[kk], false, gw[kk], true);
    else
      gw[kk] = matmul(xs[kk], true, hbar[kk], false);
    if (kk == 0 && !need_x) {
      xbar = at::Tensor();
      break;
    }
    at::Tensor below = at::empty({rows, a}, x0.options());
    T* bp = below.data_ptr<T>();
    const int64_t kind = f.kind[kk];
    over_rows(rows, [&](int64_t i0, int64_t i1) { residual_transpose(bp, yb, i0, i1, a, o, kind); });
    matmul(hbar[kk], false, f.w[kk], true, below, true);
    xbar = below;
  }
  std::vector<at::Tensor> out{need_x ? xbar : at::empty({0}, x0.options())};
  for (size_t k = 0; k < L; ++k) {
    out.push_back(gw[k]);
    out.push_back(gb[k]);
    out.push_back(gi[k]);
  }
  out.push_back(gw_out);
  out.push_back(gb_out);
  return out;
}

void check_input(const at::Tensor& x0, const std::vector<at::Tensor>& matrices) {
  TORCH_CHECK(x0.device().is_cpu() && x0.is_contiguous() && x0.dim() == 2, "x: contiguous (rows, in) on CPU");
  for (const auto& m : matrices)
    TORCH_CHECK(m.is_contiguous() && m.scalar_type() == x0.scalar_type(), "contiguous parameters of the input's dtype");
  TORCH_CHECK(matrices[0].size(0) == x0.size(1), "the first matrix takes the input's width");
}

}  // namespace

// Returns energy (rows, 1), g_0 = dE/dx (rows, in); with ``keep`` also x_1 .. x_L, h_k, gz_k and g_{k+1}
// of each tanh layer (for the backward).
std::vector<at::Tensor> fitting_forward(const at::Tensor& x0, const std::vector<at::Tensor>& matrices,
                                        const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& idts,
                                        const std::vector<int64_t>& kinds, bool keep) {
  const Fit f = make_fit(matrices, biases, idts, kinds);
  check_input(x0, matrices);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fitting_forward", [&] { out = forward_impl<scalar_t>(x0, f, keep); });
  return out;
}

// Returns dLoss/dx (empty unless need_x), then dW, db, didt (empty when none) per tanh layer, then the
// output layer's dW and db. grad_e (rows, 1) and grad_g0 (rows, in) may be undefined (zero).
std::vector<at::Tensor> fitting_backward(const at::Tensor& x0, const c10::optional<at::Tensor>& grad_e,
                                         const c10::optional<at::Tensor>& grad_g0,
                                         const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& biases,
                                         const std::vector<at::Tensor>& idts, const std::vector<int64_t>& kinds,
                                         const std::vector<at::Tensor>& kept, bool need_x) {
  const Fit f = make_fit(matrices, biases, idts, kinds);
  check_input(x0, matrices);
  const size_t L = f.layers();
  TORCH_CHECK(kept.size() == 4 * L, "kept: x_1 .. x_L, h, gz, g per layer");
  std::vector<at::Tensor> xs{x0};
  xs.insert(xs.end(), kept.begin(), kept.begin() + L);
  const std::vector<at::Tensor> hs(kept.begin() + L, kept.begin() + 2 * L);
  const std::vector<at::Tensor> gzs(kept.begin() + 2 * L, kept.begin() + 3 * L);
  const std::vector<at::Tensor> gs(kept.begin() + 3 * L, kept.end());
  const at::Tensor ge = grad_e.has_value() ? grad_e->contiguous() : at::Tensor();
  const at::Tensor gg = grad_g0.has_value() ? grad_g0->contiguous() : at::Tensor();
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fitting_backward", [&] {
    out = backward_impl<scalar_t>(x0, ge, gg, f, xs, hs, gzs, gs, need_x);
  });
  return out;
}
