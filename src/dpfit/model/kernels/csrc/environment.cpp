// The environment matrix and its Jacobian in one pass over the neighbor slots (coordinates that carry
// no gradient: training and inference), for dpfit.model.energy_model.
//
// Per slot (atom i, slot j, neighbor type t_j): d = r_j + S box - r_i (padding: (far, 0, 0)),
// R~ = (w(r) [1/r, d/r^2] - davg[t_i, j]) / dstd[t_i, j] (times keep[t_i, t_j] on excluded pairs), and
// J (3 x 4) with dE/dd = J dE/dR~ (zero on padding): column 0 = s0 (w' - w/r)/r^2 d, column c + 1 =
// s_{c+1} ((w' - 2 w/r)/r^3 d_c d + w/r^2 e_c), s = keep / dstd[t_i, j].
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// coord: nall atoms per frame, the first nloc of which are the centers; atype: natype (nloc or nall)
// per frame, the first nloc read.
template <typename T>
void geometry(const T* coord, const int64_t* nlist, const int64_t* shift, const T* box, const int64_t* atype,
              const T* davg, const T* dstd, const T* keep, const int64_t* slot_type, int64_t nf, int64_t nloc,
              int64_t nall, int64_t natype, int64_t nnei, int64_t ntypes, T rcut_smth, T rcut, T far, T* diff, T* rr,
              T* jac) {
  const T width = rcut - rcut_smth;
  at::parallel_for(0, nf * nloc, 16, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const int64_t f = a / nloc, i = a % nloc;
      const T* ri = coord + (f * nall + i) * 3;
      const int64_t ti = atype[f * natype + i];
      for (int64_t j = 0; j < nnei; ++j) {
        const int64_t slot = a * nnei + j;
        const int64_t nb = nlist[slot];
        T* d = diff + slot * 3;
        T* out = rr + slot * 4;
        T* jj = jac + slot * 12;
        const T* avg = davg + (ti * nnei + j) * 4;
        const T* sd = dstd + (ti * nnei + j) * 4;
        if (nb < 0) {
          d[0] = far;
          d[1] = T(0);
          d[2] = T(0);
          for (int c = 0; c < 4; ++c) out[c] = -avg[c] / sd[c];
          for (int e = 0; e < 12; ++e) jj[e] = T(0);
          continue;
        }
        const T* rj = coord + (f * nall + nb) * 3;
        for (int k = 0; k < 3; ++k) d[k] = rj[k] - ri[k];
        if (shift != nullptr) {
          const int64_t* s = shift + slot * 3;
          const T* b = box + f * 9;
          for (int k = 0; k < 3; ++k) d[k] += T(s[0]) * b[k] + T(s[1]) * b[3 + k] + T(s[2]) * b[6 + k];
        }
        const T r = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
        T u = (r - rcut_smth) / width;
        u = u < T(0) ? T(0) : (u > T(1) ? T(1) : u);
        const T u2 = u * u;
        const T w = u2 * u * (T(-6) * u2 + T(15) * u - T(10)) + T(1);
        const T dw = T(-30) / width * u2 * (u - T(1)) * (u - T(1));
        const T inv_r = T(1) / r;
        const T k_ex = keep != nullptr ? keep[ti * ntypes + slot_type[j]] : T(1);
        const T env[4] = {inv_r * w, d[0] * inv_r * inv_r * w, d[1] * inv_r * inv_r * w, d[2] * inv_r * inv_r * w};
        for (int c = 0; c < 4; ++c) out[c] = (env[c] - avg[c]) / sd[c] * k_ex;
        const T inv_r2 = inv_r * inv_r;
        const T a0 = (dw - w * inv_r) * inv_r2;
        const T b0 = (dw - T(2) * w * inv_r) * inv_r * inv_r2;
        const T c0 = w * inv_r2;
        for (int k = 0; k < 3; ++k) {
          T* row = jj + k * 4;
          row[0] = k_ex / sd[0] * a0 * d[k];
          for (int c = 0; c < 3; ++c) row[c + 1] = k_ex / sd[c + 1] * (b0 * d[c] * d[k] + (c == k ? c0 : T(0)));
        }
      }
    }
  });
}

}  // namespace

// diff (nf, nloc, nnei, 3), rr (nf, nloc, nnei, 4), jac (nf, nloc, nnei, 3, 4) from coord (nf, nall, 3),
// nall >= nloc (LAMMPS-style extended atoms: the centers are the first nloc atoms of each frame, nlist
// holds indices in [0, nall) or -1), atype (nf, nloc or nall). shift (nf, nloc, nnei, 3) int64 and
// box (nf, 3, 3), or both empty (no periodicity); keep (ntypes, ntypes) or empty.
std::vector<at::Tensor> env_geometry(const at::Tensor& coord, const at::Tensor& nlist, const at::Tensor& shift,
                                     const at::Tensor& box, const at::Tensor& atype, const at::Tensor& davg,
                                     const at::Tensor& dstd, const at::Tensor& keep, const at::Tensor& slot_type,
                                     double rcut_smth, double rcut, double far) {
  TORCH_CHECK(coord.is_contiguous() && nlist.is_contiguous() && atype.is_contiguous() && davg.is_contiguous() &&
                  dstd.is_contiguous() && slot_type.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(nlist.scalar_type() == at::kLong && atype.scalar_type() == at::kLong && slot_type.scalar_type() == at::kLong,
              "int64 nlist, atype, slot_type");
  TORCH_CHECK(nlist.dim() == 3 && coord.dim() == 3 && coord.size(2) == 3 && atype.dim() == 2,
              "env_geometry: coord (nf, nall, 3), nlist (nf, nloc, nnei), atype (nf, nloc or nall)");
  const int64_t nf = nlist.size(0), nloc = nlist.size(1), nnei = nlist.size(2), ntypes = davg.size(0);
  const int64_t nall = coord.size(1), natype = atype.size(1);
  TORCH_CHECK(coord.size(0) == nf && atype.size(0) == nf && nall >= nloc && natype >= nloc,
              "env_geometry: coord (nf, nall >= nloc, 3) and atype (nf, >= nloc) for nlist (nf, nloc, nnei)");
  TORCH_CHECK(nlist.numel() == 0 || nlist.max().item<int64_t>() < nall, "env_geometry: a neighbor index >= nall = ",
              nall, " (coord's atoms per frame)");
  const bool periodic = shift.numel() > 0;
  TORCH_CHECK(!periodic || (shift.is_contiguous() && shift.scalar_type() == at::kLong && box.is_contiguous()),
              "contiguous int64 shift and box");
  at::Tensor diff = at::empty({nf, nloc, nnei, 3}, coord.options());
  at::Tensor rr = at::empty({nf, nloc, nnei, 4}, coord.options());
  at::Tensor jac = at::empty({nf, nloc, nnei, 3, 4}, coord.options());
  AT_DISPATCH_FLOATING_TYPES(coord.scalar_type(), "env_geometry", [&] {
    geometry<scalar_t>(coord.data_ptr<scalar_t>(), nlist.data_ptr<int64_t>(), periodic ? shift.data_ptr<int64_t>() : nullptr,
                       periodic ? box.data_ptr<scalar_t>() : nullptr, atype.data_ptr<int64_t>(), davg.data_ptr<scalar_t>(),
                       dstd.data_ptr<scalar_t>(), keep.numel() > 0 ? keep.data_ptr<scalar_t>() : nullptr,
                       slot_type.data_ptr<int64_t>(), nf, nloc, nall, natype, nnei, ntypes, static_cast<scalar_t>(rcut_smth),
                       static_cast<scalar_t>(rcut), static_cast<scalar_t>(far), diff.data_ptr<scalar_t>(),
                       rr.data_ptr<scalar_t>(), jac.data_ptr<scalar_t>());
  });
  return {diff, rr, jac};
}

// out[..., k] = sum_c jac[..., k, c] v[..., c] (transpose: out[..., c] = sum_k jac[..., k, c] v[..., k]).
at::Tensor env_jacobian_apply(const at::Tensor& jac, const at::Tensor& v, bool transpose) {
  TORCH_CHECK(jac.is_contiguous() && v.is_contiguous() && jac.size(-2) == 3 && jac.size(-1) == 4, "jac (..., 3, 4)");
  const int64_t n = jac.numel() / 12;
  std::vector<int64_t> shape(jac.sizes().begin(), jac.sizes().end() - 1);
  shape.back() = transpose ? 4 : 3;
  at::Tensor out = at::empty(shape, v.options());
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "env_jacobian_apply", [&] {
    const scalar_t* j = jac.data_ptr<scalar_t>();
    const scalar_t* x = v.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* js = j + s * 12;
        if (!transpose) {
          const scalar_t* xs = x + s * 4;
          for (int k = 0; k < 3; ++k)
            o[s * 3 + k] = js[k * 4] * xs[0] + js[k * 4 + 1] * xs[1] + js[k * 4 + 2] * xs[2] + js[k * 4 + 3] * xs[3];
        } else {
          const scalar_t* xs = x + s * 3;
          for (int c = 0; c < 4; ++c) o[s * 4 + c] = js[c] * xs[0] + js[4 + c] * xs[1] + js[8 + c] * xs[2];
        }
      }
    });
  });
  return out;
}

// Flat slot of each slot's reverse pair (same frame; i -> j with image S  <->  j -> i with image -S),
// -1 where there is none; only pairs of two atoms of the same type (the slot's neighbor type equals
// the center's). sections (ntypes + 1): slot ranges per neighbor type. shift: (nf, nloc, nnei, 3) int64
// or empty (no periodicity). nlist (nf, nloc, nnei) may index nall >= nloc atoms (LAMMPS-style extended
// atoms, atype (nf, nall)): a ghost neighbor (j >= nloc) has no slot list, so its slots get -1.
// Same result as dpfit.model.index_facts.reverse_slots where nall == nloc.
at::Tensor reverse_slots(const at::Tensor& nlist, const at::Tensor& shift, const at::Tensor& atype,
                         const std::vector<int64_t>& sections) {
  TORCH_CHECK(nlist.is_contiguous() && atype.is_contiguous() && nlist.scalar_type() == at::kLong &&
                  atype.scalar_type() == at::kLong, "contiguous int64 nlist and atype");
  TORCH_CHECK(nlist.dim() == 3 && atype.dim() == 2 && atype.size(0) == nlist.size(0) && atype.size(1) >= nlist.size(1),
              "reverse_slots: nlist (nf, nloc, nnei), atype (nf, nloc or nall)");
  const int64_t nf = nlist.size(0), nloc = nlist.size(1), nnei = nlist.size(2), natype = atype.size(1);
  const bool periodic = shift.numel() > 0;
  TORCH_CHECK(!periodic || (shift.is_contiguous() && shift.scalar_type() == at::kLong), "contiguous int64 shift");
  at::Tensor out = at::empty({nf, nloc, nnei}, nlist.options());
  const int64_t* nl = nlist.data_ptr<int64_t>();
  const int64_t* at_ = atype.data_ptr<int64_t>();
  const int64_t* sh = periodic ? shift.data_ptr<int64_t>() : nullptr;
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, nf * nloc, 16, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const int64_t f = a / nloc, i = a % nloc, t = at_[f * natype + i];
      std::fill(o + a * nnei, o + (a + 1) * nnei, int64_t(-1));
      for (int64_t p = sections[t]; p < sections[t + 1]; ++p) {  // slots of i's own type
        const int64_t j = nl[a * nnei + p];
        if (j < 0 || j >= nloc) continue;  // padding, or a ghost atom (no slots of its own)
        const int64_t b = f * nloc + j;    // the neighbor, of type t too
        if (at_[f * natype + j] != t) continue;
        for (int64_t q = sections[t]; q < sections[t + 1]; ++q) {
          if (nl[b * nnei + q] != i) continue;
          if (sh != nullptr) {
            const int64_t* s1 = sh + (a * nnei + p) * 3;
            const int64_t* s2 = sh + (b * nnei + q) * 3;
            if (s1[0] != -s2[0] || s1[1] != -s2[1] || s1[2] != -s2[2]) continue;
          }
          o[a * nnei + p] = b * nnei + q;
          break;
        }
      }
    }
  });
  return out;
}
