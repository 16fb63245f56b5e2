// The cosine top-k of backend "cpu" (docs/design.md, "Scoring"): for each query, the k gallery rows of
// largest (or smallest) cosine, without a Q x N score matrix.
//
//   l2sm::cpu_cosine_topk(queries (Q, D), gallery (N, D), k, normalize_gallery, largest, eps)
//       -> (values (Q, k) in the compute dtype, indices (Q, k) int64)
// with the schema of l2sm_kernels/backends/topk.py (TOPK_SCHEMA; tests/test_cosine_topk.py asserts it). This
// file registers the schema (TORCH_LIBRARY_FRAGMENT) and the CPU kernel; the Python side attaches the fake
// kernel (l2sm_kernels/backends/cpu_topk.py).
//
// How: each thread takes an equal contiguous share of the gallery and walks it in chunks of `nc` rows
// (converted to the compute dtype T when the gallery is not a contiguous T matrix, with their inverse norms
// 1 / max(|g_j|, eps) accumulated in double). Per chunk and block of `qb` queries, one BLAS product
// S = Q_hat[block] G_chunk^T (qb x nc) lands in a small per-thread workspace; each row of S is scaled by the
// inverse norms (score s_ij = (q_hat_i . g_j) / max(|g_j|, eps): the same formula every backend uses, so
// exactly representable inputs give bit-identical scores) and filtered against the row's running
// threshold, the k-th best score so far: a vectorized pass finds the few scores that beat it, and only
// those enter the row's candidate buffer (capacity k + max(64, k / 2)); a full buffer is cut back to its
// k best (std::nth_element), which raises the threshold. For random data after the first chunks almost
// nothing passes, so the selection costs one vectorized compare per score beside the 2 D flops of its
// product. At the end each thread's k best per query are merged in thread order.
//
// Order (the same on every backend): larger score first (smaller with largest = false); equal scores by the
// lower gallery index; NaN counts as larger than every number (as torch.topk / torch.sort do): first with
// largest = true, last with largest = false; NaNs among themselves by index.
//
// Workspace per thread: qb x nc scores of T, nc inverse norms, nc x D values of T when the gallery must be
// converted, and Q x (k + max(64, k / 2)) candidates of (T, int64) (16 bytes each); shared: the normalized
// queries Q x D of T. Nothing is Q x N. Defaults: nc = 512, qb = min(Q, 256) (a 512 KiB fp32 score block,
// in L2 while the filter reads it back); the candidates grow with Q x k (at Q = 2048, k = 10: 2.4 MB per
// thread; a very large Q with a large k would want an outer loop over query blocks, not done here).
//
// The selection is exact. The scores' rounding depends on the BLAS products' shapes (the blocks, and the
// thread shares they fall in); for a given thread count and block sizes results are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"

namespace l2sm_cpu {
namespace {

constexpr int64_t kTopkGalleryAlign = 16;  // gallery rows per unit of a thread's share
inline std::atomic<int64_t> g_topk_query_block{256};
inline std::atomic<int64_t> g_topk_gallery_chunk{512};

template <typename T>
struct Entry {
  T v;
  int64_t i;
};

// The total order of (score, index): "a comes before b".
template <typename T, bool LARGEST>
L2SM_INLINE bool before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) {
    if (na && nb) return ia < ib;
    return LARGEST ? na : nb;  // NaN is larger than everything
  }
  if (a != b) return LARGEST ? a > b : a < b;
  return ia < ib;
}

template <typename T, bool LARGEST>
struct Before {
  bool operator()(const Entry<T>& a, const Entry<T>& b) const { return before<T, LARGEST>(a.v, a.i, b.v, b.i); }
};

// Whether a score v with an index above the threshold entry's comes before it: a tie loses (the scan visits
// indices in increasing order), so only strictly better values, or NaN against a number (largest), pass.
template <typename T, bool LARGEST>
L2SM_INLINE bool passes(T v, T thr) {
  return LARGEST ? ((v > thr) | ((v != v) & (thr == thr))) : ((v < thr) | ((v == v) & (thr != thr)));
}

// The first j in [j0, n) whose s[j] passes the threshold, or n. Blocks of 32 are tested with one vectorized
// compare-and-or each; only a block with a hit is searched element by element.
template <typename T, bool LARGEST>
L2SM_INLINE int64_t first_pass_impl(const T* s, int64_t j0, int64_t n, T thr) {
  constexpr int64_t kBlock = 32;
  int64_t j = j0;
  for (; j + kBlock <= n; j += kBlock) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t t = 0; t < kBlock; ++t) hit |= int(passes<T, LARGEST>(s[j + t], thr));
    if (hit) break;
  }
  for (; j < n; ++j) {
    if (passes<T, LARGEST>(s[j], thr)) return j;
  }
  return n;
}

template <typename T>
L2SM_INLINE void scale_impl(T* s, const T* inv, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] * inv[j];
}

L2SM_CLONES int64_t first_pass_f32_largest(const float* s, int64_t j0, int64_t n, float thr) {
  return first_pass_impl<float, true>(s, j0, n, thr);
}
L2SM_CLONES int64_t first_pass_f32_smallest(const float* s, int64_t j0, int64_t n, float thr) {
  return first_pass_impl<float, false>(s, j0, n, thr);
}
L2SM_CLONES void scale_f32(float* s, const float* inv, int64_t n) { scale_impl<float>(s, inv, n); }

template <typename T, bool LARGEST>
inline int64_t first_pass(const T* s, int64_t j0, int64_t n, T thr) {
  if constexpr (std::is_same<T, float>::value) {
    return LARGEST ? first_pass_f32_largest(s, j0, n, thr) : first_pass_f32_smallest(s, j0, n, thr);
  } else {
    return first_pass_impl<T, LARGEST>(s, j0, n, thr);
  }
}

template <typename T>
inline void scale(T* s, const T* inv, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    scale_f32(s, inv, n);
  } else {
    scale_impl<T>(s, inv, n);
  }
}

// One thread's running top-k of every query: a candidate buffer per query (cap entries), its fill, and the
// threshold (the k-th best entry after the last cut; valid once the buffer was cut at least once).
template <typename T, bool LARGEST>
struct RunningTopK {
  int64_t k, cap;
  at::Tensor store;  // (Q, cap, sizeof(Entry<T>)) bytes: candidates, allocated through torch (seen by its profiler)
  Entry<T>* e;
  std::vector<int64_t> cnt;
  std::vector<T> thr;
  std::vector<uint8_t> has_thr;

  RunningTopK(int64_t Q, int64_t k_, const at::TensorOptions& opt) : k(k_), cap(k_ + std::max<int64_t>(64, k_ / 2)) {
    store = at::empty({Q * cap * int64_t(sizeof(Entry<T>))}, opt.dtype(at::kByte));
    e = reinterpret_cast<Entry<T>*>(store.data_ptr<uint8_t>());
    cnt.assign(Q, 0);
    thr.assign(Q, T(0));
    has_thr.assign(Q, 0);
  }

  // keep the k best of query q's buffer; the k-th best becomes the threshold
  void cut(int64_t q) {
    Entry<T>* b = e + q * cap;
    std::nth_element(b, b + (k - 1), b + cnt[q], Before<T, LARGEST>());
    cnt[q] = k;
    thr[q] = b[k - 1].v;
    has_thr[q] = 1;
  }

  // offer scores s[0..n) of gallery rows base, base + 1, ... (increasing indices) to query q
  void offer(int64_t q, const T* s, int64_t n, int64_t base) {
    Entry<T>* b = e + q * cap;
    int64_t j = 0;
    while (j < n) {
      if (has_thr[q]) {
        j = first_pass<T, LARGEST>(s, j, n, thr[q]);
        if (j >= n) break;
      }
      b[cnt[q]++] = Entry<T>{s[j], base + j};
      if (cnt[q] == cap) cut(q);
      ++j;
    }
  }

  // sort query q's best min(cnt, k) to the front; returns how many
  int64_t finish(int64_t q) {
    Entry<T>* b = e + q * cap;
    const int64_t m = std::min(cnt[q], k);
    std::partial_sort(b, b + m, b + cnt[q], Before<T, LARGEST>());
    return m;
  }
};

// Rows [r0, r1) of a T matrix as a contiguous (r1 - r0, D) T tensor: a view when it already is, else a copy
// into buf.
inline at::Tensor rows_as(const at::Tensor& g, bool direct, at::Tensor& buf, int64_t r0, int64_t rows) {
  if (direct) return g.narrow(0, r0, rows);
  at::Tensor out = buf.narrow(0, 0, rows);
  out.copy_(g.narrow(0, r0, rows));
  return out;
}

template <typename T, bool LARGEST>
std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                                             bool normalize_gallery, double eps) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t Q = queries.size(0), N = gallery.size(0), D = queries.size(1);
  const auto opt = queries.options().dtype(ct);
  at::Tensor values = at::empty({Q, k}, opt), indices = at::empty({Q, k}, opt.dtype(at::kLong));
  if (Q == 0) return {values, indices};

  // queries normalized once (norms accumulated in double, common.h)
  at::Tensor q_hat, q_norm;
  normalized_features<T>(queries, eps, &q_hat, &q_norm);

  const int64_t nc_knob = std::max<int64_t>(1, g_topk_gallery_chunk.load());
  const int64_t qb = std::max<int64_t>(1, std::min<int64_t>(Q, g_topk_query_block.load()));
  const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t units = N / kTopkGalleryAlign;  // whole units; the last share also takes the rest
  const int64_t workers = std::max<int64_t>(1, std::min(threads, units));
  const auto edge = [&](int64_t w) {
    return w >= workers ? N : std::min(N, units * w / workers * kTopkGalleryAlign);
  };
  const bool direct = gallery.scalar_type() == ct && gallery.is_contiguous();

  std::vector<std::unique_ptr<RunningTopK<T, LARGEST>>> tops(workers);
  const auto work = [&](int64_t w) {
    const int64_t g0 = edge(w), g1 = edge(w + 1);
    const int64_t nc = std::max<int64_t>(1, std::min(nc_knob, g1 - g0));
    tops[w] = std::make_unique<RunningTopK<T, LARGEST>>(Q, k, opt);
    RunningTopK<T, LARGEST>& top = *tops[w];
    at::Tensor ws = at::empty({qb * nc}, opt);
    at::Tensor inv = at::empty({nc}, opt);
    at::Tensor gbuf;
    if (!direct) gbuf = at::empty({nc, D}, opt);
    T* invp = inv.data_ptr<T>();
    for (int64_t c0 = g0; c0 < g1; c0 += nc) {
      const int64_t cc = std::min(nc, g1 - c0);
      const at::Tensor gc = rows_as(gallery, direct, gbuf, c0, cc);
      if (normalize_gallery) normalize_rows<T>(gc.data_ptr<T>(), nullptr, nullptr, invp, 0, cc, D, eps);
      for (int64_t q0 = 0; q0 < Q; q0 += qb) {
        const int64_t qn = std::min(qb, Q - q0);
        at::Tensor S = ws.narrow(0, 0, qn * cc).view({qn, cc});
        at::mm_out(S, q_hat.narrow(0, q0, qn), gc.t());
        T* sp = S.data_ptr<T>();
        for (int64_t r = 0; r < qn; ++r) {
          T* row = sp + r * cc;
          if (normalize_gallery) scale<T>(row, invp, cc);
          top.offer(q0 + r, row, cc, c0);
        }
      }
    }
  };
  if (workers == 1) {
    work(0);  // one share: BLAS threads inside each product
  } else {
    // the ATen calls on the worker threads must see the caller's thread-local state (below autograd, no
    // autocast: KernelGuard; the profiler's state, so that the benchmarks' memory meter sees the workspace)
    const at::ThreadLocalState state;
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      at::ThreadLocalStateGuard tls(state);
      for (int64_t w = w0; w < w1; ++w) work(w);
    });
  }

  // merge: per query, every thread's sorted best (at most k each), in thread order, cut to the k best
  T* vp = values.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, Q, 16, [&](int64_t r0, int64_t r1) {
    std::vector<Entry<T>> all;
    all.reserve(workers * k);
    for (int64_t q = r0; q < r1; ++q) {
      all.clear();
      for (int64_t w = 0; w < workers; ++w) {
        const int64_t m = tops[w]->finish(q);
        const Entry<T>* b = tops[w]->e + q * tops[w]->cap;
        all.insert(all.end(), b, b + m);
      }
      // every gallery row was offered to exactly one thread, so all.size() >= k (the caller checked k <= N)
      std::partial_sort(all.begin(), all.begin() + k, all.end(), Before<T, LARGEST>());
      for (int64_t t = 0; t < k; ++t) {
        vp[q * k + t] = all[t].v;
        ip[q * k + t] = all[t].i;
      }
    }
  });
  return {values, indices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cpu_cosine_topk(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                                                    bool normalize_gallery, bool largest, double eps) {
  TORCH_CHECK(queries.dim() == 2, "l2sm::cpu_cosine_topk: queries must be 2-D (Q, D), got ", queries.sizes());
  TORCH_CHECK(gallery.dim() == 2 && gallery.size(1) == queries.size(1),
              "l2sm::cpu_cosine_topk: gallery must be (N, ", queries.size(1), "), got ", gallery.sizes());
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()) && at::isFloatingType(gallery.scalar_type()),
              "l2sm::cpu_cosine_topk: queries and gallery must be floating, got ", queries.scalar_type(), " and ",
              gallery.scalar_type());
  TORCH_CHECK(queries.device().is_cpu() && gallery.device().is_cpu(),
              "l2sm::cpu_cosine_topk: queries and gallery must be CPU tensors");
  TORCH_CHECK(k >= 1 && k <= gallery.size(0), "l2sm::cpu_cosine_topk: k must be in [1, N = ", gallery.size(0),
              "], got ", k);
  TORCH_CHECK(eps > 0, "l2sm::cpu_cosine_topk: eps must be > 0, got ", eps);
  const KernelGuard guard;
  const bool f64 = queries.scalar_type() == at::kDouble || gallery.scalar_type() == at::kDouble;
  if (f64) {
    return largest ? topk_impl<double, true>(queries, gallery, k, normalize_gallery, eps)
                   : topk_impl<double, false>(queries, gallery, k, normalize_gallery, eps);
  }
  return largest ? topk_impl<float, true>(queries, gallery, k, normalize_gallery, eps)
                 : topk_impl<float, false>(queries, gallery, k, normalize_gallery, eps);
}

// (query_block, gallery_chunk) after setting them; a value <= 0 keeps the current one. For tests and tuning.
std::vector<int64_t> cpu_cosine_topk_blocks(int64_t query_block, int64_t gallery_chunk) {
  if (query_block > 0) g_topk_query_block.store(query_block);
  if (gallery_chunk > 0) g_topk_gallery_chunk.store(gallery_chunk);
  return {g_topk_query_block.load(), g_topk_gallery_chunk.load()};
}

}  // namespace l2sm_cpu

// Schema: textually TOPK_SCHEMA of l2sm_kernels/backends/topk.py. FRAGMENT: the namespace l2sm is shared with
// the loss's ops (register.cpp) and the ops Python defines (eager, triton).
TORCH_LIBRARY_FRAGMENT(l2sm, m) {
  m.def(
      "cpu_cosine_topk(Tensor queries, Tensor gallery, int k, bool normalize_gallery, bool largest, float eps) "
      "-> (Tensor, Tensor)");
  m.def("_cpu_cosine_topk_blocks(int query_block, int gallery_chunk) -> int[]",
        &l2sm_cpu::cpu_cosine_topk_blocks);
}

TORCH_LIBRARY_IMPL(l2sm, CPU, m) { m.impl("cpu_cosine_topk", &l2sm_cpu::cpu_cosine_topk); }
