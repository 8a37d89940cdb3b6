// The descriptor's contractions over neighbor slots, read straight from the embedding rows.
//
// One neighbor-type block: N atoms x k slots; slot (n, j) uses embedding row index[n, j] (its own row,
// its reverse pair's, or a padding row shared by many slots). Forward products read the rows through
// the index; backward products sum each row's slots in row order (CSR: the slots of row r are
// order[ptr[r] .. ptr[r + 1]), flat slot s = n * k + j), so no padded (N, k, M) tensor is written.
//
//   slot_gt:   out[n, c, :] = sum_j R[n, j, c] G[index[n, j], :]                  (N, 4, M)
//   slot_env:  part[n, j, c] = G[index[n, j], :] . gbar[n, c, :], tds likewise with T   (N, k, 4)
//
// slot_env and its backward pass over the padded slots (valid[n, j] false): their products are written
// as zeros and their gradients are not read (the forces' pass never uses a padded slot: its pair vector
// lies beyond the cutoff, where the environment matrix's Jacobian vanishes).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// rows per chunk of the backward row sums (kept in the cache, then streamed out)
constexpr int64_t kChunkRows = 16;

void check_block(const at::Tensor& rows, const at::Tensor& index) {
  TORCH_CHECK(rows.device().is_cpu() && rows.is_contiguous() && rows.dim() == 2, "rows: contiguous (R, M) on CPU");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2, "index: contiguous (N, k) int64");
}

void check_valid(const at::Tensor& valid, const at::Tensor& index) {
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.sizes() == index.sizes(),
              "valid: contiguous bool like index");
}

template <typename T>
void gt_forward(const T* g, const int64_t* index, const T* r, T* out, int64_t n_atoms, int64_t k, int64_t m) {
  at::parallel_for(0, n_atoms, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* o = out + n * 4 * m;
      std::fill(o, o + 4 * m, T(0));
      for (int64_t j = 0; j < k; ++j) {
        const T* row = g + index[n * k + j] * m;
        const T* rc = r + (n * k + j) * 4;
        for (int c = 0; c < 4; ++c) {
          const T w = rc[c];
          T* oc = o + c * m;
#pragma omp simd
          for (int64_t e = 0; e < m; ++e) oc[e] += w * row[e];
        }
      }
    }
  });
}

// grad_rows[r] = base[r] + sum over the slots s of row r of sum_c coef[s, c] * per_atom[n(s), c, :]
// (base: nullptr for zeros)
template <typename T>
void rows_from_slots(const T* coef, const T* per_atom, const int64_t* order, const int64_t* ptr, const T* base,
                     T* out, int64_t n_rows, int64_t k, int64_t m) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kChunkRows * m);  // a chunk of rows summed in the cache, then streamed out
    for (int64_t lo = begin; lo < end; lo += kChunkRows) {
      const int64_t hi = std::min(end, lo + kChunkRows);
      for (int64_t row = lo; row < hi; ++row) {
        T* o = buf.data() + (row - lo) * m;
        const int64_t q0 = ptr[row], q1 = ptr[row + 1];
        if (base != nullptr)
          std::copy(base + row * m, base + (row + 1) * m, o);
        else
          std::fill(o, o + m, T(0));
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t s = order[q];
          const T c0 = coef[s * 4], c1 = coef[s * 4 + 1], c2 = coef[s * 4 + 2], c3 = coef[s * 4 + 3];
          const T* pa = per_atom + (s / k) * 4 * m;
#pragma omp simd
          for (int64_t e = 0; e < m; ++e) o[e] += c0 * pa[e] + c1 * pa[m + e] + c2 * pa[2 * m + e] + c3 * pa[3 * m + e];
        }
      }
      stream_copy(out + lo * m, buf.data(), (size_t)(hi - lo) * m);
    }
  });
}

// rows_from_slots for two coefficient sets at once (one pass over the slot lists and per-atom data)
template <typename T>
void rows_from_slots2(const T* coef_a, const T* coef_b, const T* per_atom, const int64_t* order, const int64_t* ptr,
                      const bool* valid, T* out_a, T* out_b, int64_t n_rows, int64_t k, int64_t m) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> buf_a(kChunkRows * m), buf_b(kChunkRows * m);  // as in rows_from_slots
    for (int64_t lo = begin; lo < end; lo += kChunkRows) {
      const int64_t hi = std::min(end, lo + kChunkRows);
      for (int64_t row = lo; row < hi; ++row) {
        T* oa = buf_a.data() + (row - lo) * m;
        T* ob = buf_b.data() + (row - lo) * m;
        std::fill(oa, oa + m, T(0));
        std::fill(ob, ob + m, T(0));
        for (int64_t q = ptr[row]; q < ptr[row + 1]; ++q) {
          const int64_t s = order[q];
          if (!valid[s]) continue;
          const T* ca = coef_a + s * 4;
          const T* cb = coef_b + s * 4;
          const T* pa = per_atom + (s / k) * 4 * m;
#pragma omp simd
          for (int64_t e = 0; e < m; ++e) {
            const T p0 = pa[e], p1 = pa[m + e], p2 = pa[2 * m + e], p3 = pa[3 * m + e];
            oa[e] += ca[0] * p0 + ca[1] * p1 + ca[2] * p2 + ca[3] * p3;
            ob[e] += cb[0] * p0 + cb[1] * p1 + cb[2] * p2 + cb[3] * p3;
          }
        }
      }
      stream_copy(out_a + lo * m, buf_a.data(), (size_t)(hi - lo) * m);
      stream_copy(out_b + lo * m, buf_b.data(), (size_t)(hi - lo) * m);
    }
  });
}

template <typename T>
void env_forward(const T* g, const T* t, const int64_t* index, const bool* valid, const T* gbar, T* part, T* tds,
                 int64_t n_atoms, int64_t k, int64_t m) {
  at::parallel_for(0, n_atoms, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* gb = gbar + n * 4 * m;
      for (int64_t j = 0; j < k; ++j) {
        T* p = part + (n * k + j) * 4;
        T* d = tds + (n * k + j) * 4;
        if (!valid[n * k + j]) {
          std::fill(p, p + 4, T(0));
          std::fill(d, d + 4, T(0));
          continue;
        }
        const int64_t row = index[n * k + j];
        const T* gr = g + row * m;
        const T* tr = t + row * m;
        T p0 = T(0), p1 = T(0), p2 = T(0), p3 = T(0), d0 = T(0), d1 = T(0), d2 = T(0), d3 = T(0);
#pragma omp simd reduction(+ : p0, p1, p2, p3, d0, d1, d2, d3)
        for (int64_t e = 0; e < m; ++e) {
          const T ge = gr[e], te = tr[e], b0 = gb[e], b1 = gb[m + e], b2 = gb[2 * m + e], b3 = gb[3 * m + e];
          p0 += ge * b0;
          p1 += ge * b1;
          p2 += ge * b2;
          p3 += ge * b3;
          d0 += te * b0;
          d1 += te * b1;
          d2 += te * b2;
          d3 += te * b3;
        }
        p[0] = p0; p[1] = p1; p[2] = p2; p[3] = p3;
        d[0] = d0; d[1] = d1; d[2] = d2; d[3] = d3;
      }
    }
  });
}

// grad_gbar[n, c, :] = sum_j grad_part[n, j, c] G[index[n, j], :] + grad_tds[n, j, c] T[index[n, j], :]
// grad_gbar[n, c, :] = sum_j grad_part[n, j, c] G[index[n, j], :] + grad_tds[n, j, c] T[index[n, j], :]
template <typename T>
void env_backward_gbar(const T* g, const T* t, const int64_t* index, const bool* valid, const T* grad_part,
                       const T* grad_tds, T* out, int64_t n_atoms, int64_t k, int64_t m) {
  at::parallel_for(0, n_atoms, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* o = out + n * 4 * m;
      std::fill(o, o + 4 * m, T(0));
      for (int64_t j = 0; j < k; ++j) {
        if (!valid[n * k + j]) continue;
        const int64_t row = index[n * k + j];
        const T* gr = g + row * m;
        const T* tr = t + row * m;
        const T* gp = grad_part + (n * k + j) * 4;
        const T* gd = grad_tds + (n * k + j) * 4;
        for (int c = 0; c < 4; ++c) {
          const T a = gp[c], b = gd[c];
          T* oc = o + c * m;
#pragma omp simd
          for (int64_t e = 0; e < m; ++e) oc[e] += a * gr[e] + b * tr[e];
        }
      }
    }
  });
}

}  // namespace

// One neighbor-type block's embedding rows (the compiled path of SeE2A.embed): the inputs s of the
// rows each net embeds, in slot order, and each slot's row in the block's table (net 0's rows, net
// 1's, ..., then the padding rows). s (N, nnei); mask (N, nnei) bool; atype (N); partner (N, nnei):
// flat slot of each slot's reverse pair or -1 (empty: none shared); the block's slots [lo, lo + kept);
// centers[k]: net k's center type (-1: every type); pad (ntypes, >= kept): the padding row of each
// (center type, slot), counted from the first padding row. A slot whose reverse pair comes first
// (partner's block position lower) reuses that pair's row.
// Returns index (N, kept) int64, then each net's inputs (R_k, 1).
std::vector<at::Tensor> block_rows(const at::Tensor& s, const at::Tensor& mask, const at::Tensor& atype,
                                   const at::Tensor& partner, int64_t lo, int64_t kept,
                                   const std::vector<int64_t>& centers, const at::Tensor& pad) {
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
                  mask.sizes() == s.sizes(), "s, mask: contiguous (N, nnei)");
  const int64_t n = s.size(0), nnei = s.size(1), nets = static_cast<int64_t>(centers.size());
  TORCH_CHECK(atype.scalar_type() == at::kLong && atype.is_contiguous() && atype.numel() == n, "atype: (N) int64");
  const bool shared = partner.numel() > 0;
  TORCH_CHECK(!shared || (partner.scalar_type() == at::kLong && partner.is_contiguous() && partner.sizes() == s.sizes()),
              "partner: contiguous (N, nnei) int64 or empty");
  TORCH_CHECK(pad.scalar_type() == at::kLong && pad.is_contiguous() && pad.dim() == 2 && pad.size(1) >= kept,
              "pad: contiguous (ntypes, >= kept) int64");
  TORCH_CHECK(lo >= 0 && kept >= 0 && lo + kept <= nnei && nets > 0, "block within the slots, one net at least");
  const bool* m = mask.data_ptr<bool>();
  const int64_t* at_ = atype.data_ptr<int64_t>();
  const int64_t* pp = shared ? partner.data_ptr<int64_t>() : nullptr;
  const int64_t* pd = pad.data_ptr<int64_t>();
  at::Tensor index = at::empty({n, kept}, atype.options());
  int64_t* idx = index.data_ptr<int64_t>();
  // each atom's net; each slot's kind: 0 own row, 1 padding, 2 reuses its partner's row
  std::vector<int64_t> net_of(n, -1);
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t k = 0; k < nets && net_of[a] < 0; ++k)
      if (centers[k] < 0 || centers[k] == at_[a]) net_of[a] = k;
    TORCH_CHECK(at_[a] >= 0 && at_[a] < pad.size(0), "block_rows: atom type out of range");
  }
  std::vector<int64_t> count(nets, 0), partner_pos(shared ? n * kept : 0);
  std::vector<uint8_t> kind(n * kept);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t q = a * kept + j, col = a * nnei + lo + j;
      if (!m[col]) {
        kind[q] = 1;
        continue;
      }
      if (shared && pp[col] >= 0) {
        const int64_t p = pp[col];
        const int64_t pos = (p / nnei) * kept + p % nnei - lo;
        if (pos < q) {
          TORCH_CHECK(pos >= 0, "block_rows: a partner outside the block");
          kind[q] = 2;
          partner_pos[q] = pos;
          continue;
        }
      }
      TORCH_CHECK(net_of[a] >= 0, "block_rows: no net for an atom's type");
      kind[q] = 0;
      ++count[net_of[a]];
    }
  std::vector<int64_t> next(nets, 0);
  int64_t total = 0;
  for (int64_t k = 0; k < nets; ++k) {
    next[k] = total;
    total += count[k];
  }
  std::vector<at::Tensor> inputs;
  for (int64_t k = 0; k < nets; ++k) inputs.push_back(at::empty({count[k], 1}, s.options()));
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "block_rows", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    std::vector<scalar_t*> xs;
    std::vector<int64_t> start(next);
    for (auto& x : inputs) xs.push_back(x.data_ptr<scalar_t>());
    for (int64_t a = 0; a < n; ++a)
      for (int64_t j = 0; j < kept; ++j) {
        const int64_t q = a * kept + j;
        if (kind[q] == 0) {
          const int64_t k = net_of[a];
          xs[k][next[k] - start[k]] = sp[a * nnei + lo + j];
          idx[q] = next[k]++;
        } else if (kind[q] == 1) {
          idx[q] = total + pd[at_[a] * pad.size(1) + j];
        }
      }
  });
  for (int64_t q = 0; q < n * kept; ++q)
    if (kind[q] == 2) idx[q] = idx[partner_pos[q]];
  std::vector<at::Tensor> out{index};
  out.insert(out.end(), inputs.begin(), inputs.end());
  return out;
}

// CSR of rows -> flat slots by a counting sort (stable: a row's slots in increasing order): row r's
// slots are order[ptr[r] .. ptr[r + 1]).
std::vector<at::Tensor> slots_of_rows(const at::Tensor& index, int64_t n_rows) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous(), "index: contiguous int64");
  const int64_t total = index.numel();
  at::Tensor ptr = at::zeros({n_rows + 1}, index.options());
  at::Tensor order = at::empty({total}, index.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t q = 0; q < total; ++q) {
    TORCH_CHECK(idx[q] >= 0 && idx[q] < n_rows, "slots_of_rows: row index out of range");
    ++p[idx[q] + 1];
  }
  for (int64_t r = 0; r < n_rows; ++r) p[r + 1] += p[r];
  std::vector<int64_t> next(p, p + n_rows);
  for (int64_t q = 0; q < total; ++q) o[next[idx[q]]++] = q;
  return {order, ptr};
}

// (N, 4, M): sum over the block's slots of R[n, j, :]^T G[index[n, j]]. r: (N, k, 4) contiguous.
at::Tensor slot_gt(const at::Tensor& g, const at::Tensor& index, const at::Tensor& r) {
  check_block(g, index);
  const int64_t n = index.size(0), k = index.size(1), m = g.size(1);
  TORCH_CHECK(r.is_contiguous() && r.sizes() == at::IntArrayRef({n, k, 4}) && r.scalar_type() == g.scalar_type(), "r: (N, k, 4)");
  at::Tensor out = at::empty({n, 4, m}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "slot_gt", [&] {
    gt_forward<scalar_t>(g.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), r.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, k, m);
  });
  return out;
}

// (R, M): base (or zeros) plus each row's sum over its slots of sum_c coef[s, c] per_atom[n(s), c, :]
// (the backward of slot_gt with coef = R and per_atom = its output's gradient; of slot_env with
// coef = grad_part).
at::Tensor slot_rows(const at::Tensor& coef, const at::Tensor& per_atom, const at::Tensor& order,
                     const at::Tensor& ptr, int64_t n_rows, int64_t k, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(coef.is_contiguous() && per_atom.is_contiguous() && order.is_contiguous() && ptr.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(ptr.numel() == n_rows + 1 && per_atom.dim() == 3 && per_atom.size(1) == 4, "ptr (R + 1), per_atom (N, 4, M)");
  const int64_t m = per_atom.size(2);
  const at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.sizes() == at::IntArrayRef({n_rows, m}) && b.scalar_type() == per_atom.scalar_type()),
              "base: (R, M) like the output");
  at::Tensor out = at::empty({n_rows, m}, per_atom.options());
  AT_DISPATCH_FLOATING_TYPES(per_atom.scalar_type(), "slot_rows", [&] {
    rows_from_slots<scalar_t>(coef.data_ptr<scalar_t>(), per_atom.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
                              ptr.data_ptr<int64_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                              out.data_ptr<scalar_t>(), n_rows, k, m);
  });
  return out;
}

// slot_rows for two coefficient sets (N, k, 4) sharing per_atom: the rows' gradients of G and T.
std::vector<at::Tensor> slot_rows_value_and_tangent(const at::Tensor& coef_a, const at::Tensor& coef_b, const at::Tensor& per_atom,
                                   const at::Tensor& order, const at::Tensor& ptr, const at::Tensor& valid, int64_t n_rows,
                                   int64_t k) {
  TORCH_CHECK(coef_a.is_contiguous() && coef_b.is_contiguous() && per_atom.is_contiguous() && order.is_contiguous() &&
                  ptr.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(ptr.numel() == n_rows + 1 && per_atom.dim() == 3 && per_atom.size(1) == 4, "ptr (R + 1), per_atom (N, 4, M)");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.numel() == coef_a.numel() / 4,
              "valid: contiguous bool (N, k)");
  const int64_t m = per_atom.size(2);
  at::Tensor out_a = at::empty({n_rows, m}, per_atom.options());
  at::Tensor out_b = at::empty({n_rows, m}, per_atom.options());
  AT_DISPATCH_FLOATING_TYPES(per_atom.scalar_type(), "slot_rows_value_and_tangent", [&] {
    rows_from_slots2<scalar_t>(coef_a.data_ptr<scalar_t>(), coef_b.data_ptr<scalar_t>(), per_atom.data_ptr<scalar_t>(),
                               order.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(), valid.data_ptr<bool>(), out_a.data_ptr<scalar_t>(),
                               out_b.data_ptr<scalar_t>(), n_rows, k, m);
  });
  return {out_a, out_b};
}

// part, tds (N, k, 4) from the rows G, T and gbar (N, 4, M); zeros on the padded slots.
std::vector<at::Tensor> slot_env(const at::Tensor& g, const at::Tensor& t, const at::Tensor& index, const at::Tensor& valid,
                                 const at::Tensor& gbar) {
  check_block(g, index);
  check_block(t, index);
  check_valid(valid, index);
  const int64_t n = index.size(0), k = index.size(1), m = g.size(1);
  TORCH_CHECK(gbar.is_contiguous() && gbar.sizes() == at::IntArrayRef({n, 4, m}), "gbar: (N, 4, M)");
  at::Tensor part = at::empty({n, k, 4}, g.options());
  at::Tensor tds = at::empty({n, k, 4}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "slot_env", [&] {
    env_forward<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), valid.data_ptr<bool>(),
                          gbar.data_ptr<scalar_t>(),
                          part.data_ptr<scalar_t>(), tds.data_ptr<scalar_t>(), n, k, m);
  });
  return {part, tds};
}

// grad of gbar (N, 4, M) for slot_env.
at::Tensor slot_env_gbar(const at::Tensor& g, const at::Tensor& t, const at::Tensor& index, const at::Tensor& valid,
                         const at::Tensor& grad_part, const at::Tensor& grad_tds) {
  check_block(g, index);
  check_valid(valid, index);
  const int64_t n = index.size(0), k = index.size(1), m = g.size(1);
  TORCH_CHECK(grad_part.is_contiguous() && grad_tds.is_contiguous(), "contiguous gradients");
  at::Tensor out = at::empty({n, 4, m}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "slot_env_gbar", [&] {
    env_backward_gbar<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                                valid.data_ptr<bool>(), grad_part.data_ptr<scalar_t>(), grad_tds.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, k, m);
  });
  return out;
}
