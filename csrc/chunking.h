// Chunking and the work split of the C++ CPU kernels (loss.h has the overview: per chunk of `cc`
// classes, i.e. cc K contiguous rows of W with K sub-centers per class, one BLAS product into a
// workspace buffer, then fused epilogues on it while it is in cache).
//
// Threads (at::parallel_for): each thread takes an equal contiguous share of the classes (at least
// kWorkerAlign of them) and walks it in chunks with its own workspace, running single-threaded BLAS
// and epilogues (one parallel region per call; see Split). Only when C < 2 kWorkerAlign does a
// single share run, and BLAS and the epilogues are threaded inside each chunk. Workspace per thread:
// B x cc K values of the compute dtype (+ cc K x D when W must be converted), cc from a byte budget
// (set_workspace_bytes) or fixed (set_chunk_classes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "common.h"

namespace l2sm_cpu {

// ---------------------------------------------------------------------------------------------
// chunk size: the workspace knobs (set from Python through l2sm_kernels._C, register.cpp)
// ---------------------------------------------------------------------------------------------
// Default budget for one chunk's working set, the B x cc K cosines plus the cc K x D weight rows
// the BLAS calls stream through: 4 MiB (L2 is 0.5-2 MiB per core on current x86 servers, L3 tens
// of MiB). At B = 256, D = 512, fp32 that is 1344 classes per chunk (K = 1; 448 with K = 3) and a
// 1.3 MiB cosine buffer.
constexpr int64_t kDefaultWorkspaceBytes = int64_t(4) << 20;
constexpr int64_t kChunkAlign = 64;  // chunk sizes picked from the budget are multiples of this
// Largest values the knobs take (l2sm_kernels/backends/cpu.py clamps environment values to them and
// refuses larger ones from its setters): 1 TiB of budget; 2^40 classes per chunk (a chunk never
// exceeds C anyway). Both keep every size product below 2^63.
constexpr int64_t kMaxWorkspaceBytes = int64_t(1) << 40;
constexpr int64_t kMaxChunkClasses = int64_t(1) << 40;

// inline variables (C++17): one object shared by every translation unit
inline std::atomic<int64_t> g_chunk_classes{0};  // > 0: fixed chunk size; 0: from the budget
inline std::atomic<int64_t> g_workspace_bytes{kDefaultWorkspaceBytes};

// Classes per chunk for B rows of D features, C classes of K sub-centers, in a compute dtype of
// `esize` bytes. From the budget: budget / ((B + D + 1) x esize) rows of W, i.e. that over K
// classes, rounded down to a multiple of 64 classes, at least 64; a fixed size is in classes. At
// most C. A chunk's buffers then hold cc K (B + D + 1) values (see ChunkBuffers).
inline int64_t chunk_classes(int64_t B, int64_t C, int64_t D, int64_t esize, int64_t K = 1) {
  int64_t n = g_chunk_classes.load();
  if (n <= 0) {
    n = g_workspace_bytes.load() / ((std::max<int64_t>(B, 0) + std::max<int64_t>(D, 0) + 1) * esize) /
        std::max<int64_t>(K, 1);
    n = std::max<int64_t>(n / kChunkAlign * kChunkAlign, kChunkAlign);
  }
  return std::max<int64_t>(1, std::min<int64_t>(n, std::max<int64_t>(C, 1)));
}

// ---------------------------------------------------------------------------------------------
// one chunk's inputs in the compute dtype
// ---------------------------------------------------------------------------------------------
// Rows [r0, r0 + n) of W in T, contiguous: a view when W already is, else converted into `buf`.
inline at::Tensor weight_chunk(const at::Tensor& w, bool direct, at::Tensor& buf, int64_t r0, int64_t n) {
  if (direct) return w.narrow(0, r0, n);
  at::Tensor out = buf.narrow(0, 0, n);
  out.copy_(w.narrow(0, r0, n));
  return out;
}

// (cc) of the bias chunk in T (zeros without bias), written into `buf`.
template <typename T>
const T* bias_chunk(const c10::optional<at::Tensor>& bias, at::Tensor& buf, int64_t c0, int64_t cc) {
  at::Tensor out = buf.narrow(0, 0, cc);
  if (bias.has_value()) out.copy_(bias->narrow(0, c0, cc));
  return buf.data_ptr<T>();
}

// Inverse norms of the chunk's rows of W (and the norms themselves), or ones / nullptr without
// normalize_weight.
template <typename T>
void weight_chunk_norms(const at::Tensor& wc, bool normalize_weight, double eps, T* inv, T* norm) {
  const int64_t cc = wc.size(0), D = wc.size(1);
  if (!normalize_weight) {
    std::fill(inv, inv + cc, T(1));
    return;
  }
  const T* wp = wc.data_ptr<T>();
  at::parallel_for(0, cc, 64, [&](int64_t r0, int64_t r1) { normalize_rows<T>(wp, nullptr, norm, inv, r0, r1, D, eps); });
}

// A contiguous (B x n) view of the first B * n elements of the workspace.
inline at::Tensor logits_view(at::Tensor& ws, int64_t B, int64_t n) {
  return ws.view({-1}).narrow(0, 0, B * n).view({B, n});
}

// ---------------------------------------------------------------------------------------------
// work split: the classes are dealt out to `workers` contiguous ranges, one per thread
// ---------------------------------------------------------------------------------------------
// Each worker takes an equal share of the classes (whole units of kWorkerAlign classes, the last
// share also the C mod kWorkerAlign left over) and walks it in chunks of at most `chunk` classes
// with its own workspace, calling single-threaded BLAS and epilogues: one parallel region per call
// instead of several per chunk (fork / join barriers cost little on an idle machine and a lot on a
// busy one), and every thread has work whenever C >= threads x kWorkerAlign, whatever the chunk
// size. Per-row statistics (forward) and dX_hat (backward) are combined across workers in worker
// order. With fewer than 2 kWorkerAlign classes a single worker runs, and BLAS and the epilogues
// are threaded inside each chunk instead (at::parallel_for nested in a parallel region runs
// inline). The split depends only on C and the number of threads, the chunk boundaries also on the
// chunk size: for a given chunk size and thread count every sum has a fixed order.
constexpr int64_t kWorkerAlign = 16;  // classes per unit of a worker's share

inline int64_t default_threads() { return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads()); }

struct Split {
  int64_t chunk, units, workers;  // chunk: classes per chunk (cc K rows of W)
  Split(int64_t B, int64_t C, int64_t D, int64_t esize, int64_t K, int64_t threads = default_threads()) {
    chunk = chunk_classes(B, C, D, esize, K);
    units = std::max<int64_t>(C, 0) / kWorkerAlign;  // whole units; the last share also takes the rest
    workers = std::max<int64_t>(1, std::min(threads, units));
  }
  // [first class, end class) of worker w
  std::pair<int64_t, int64_t> classes(int64_t w, int64_t C) const {
    const auto edge = [&](int64_t k) { return k >= workers ? C : std::min(C, units * k / workers * kWorkerAlign); };
    return {edge(w), edge(w + 1)};
  }
  // the widest chunk worker w walks (its buffers' size)
  int64_t max_chunk(int64_t w, int64_t C) const {
    const auto r = classes(w, C);
    return std::max<int64_t>(1, std::min(chunk, r.second - r.first));
  }
  template <typename F>
  void run(const F& f) const {  // f(worker index)
    if (workers == 1) return f(int64_t(0));
    // The ATen calls on the worker threads (views, BLAS) must see the caller's thread-local state:
    // below autograd, no autocast (see KernelGuard), grad mode.
    const at::ThreadLocalState state;
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      at::ThreadLocalStateGuard tls(state);
      for (int64_t w = w0; w < w1; ++w) f(w);
    });
  }
};

// One worker's buffers for a range of chunks (the workspace), for chunks of up to `chunk` classes
// of K sub-centers each.
template <typename T>
struct ChunkBuffers {
  at::Tensor ws;            // (B * chunk K): the chunk's cosines, then dC'
  at::Tensor wbuf;          // (chunk K, D): the weight rows converted to T, when W is not already
  at::Tensor inv_wn, wnorm;  // (chunk K): per row of W
  at::Tensor bbuf;           // (chunk): per class
  int64_t K;
  bool direct;
  ChunkBuffers(const at::Tensor& weight, int64_t B, int64_t D, int64_t chunk, int64_t K_, const at::TensorOptions& opt)
      : K(K_) {
    constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
    direct = weight.scalar_type() == ct && weight.is_contiguous();
    ws = at::empty({B * chunk * K}, opt);
    if (!direct) wbuf = at::empty({chunk * K, D}, opt);
    inv_wn = at::empty({chunk * K}, opt);
    wnorm = at::empty({chunk * K}, opt);
    bbuf = at::zeros({chunk}, opt);
  }
  // Load the classes [c0, c0 + cc), rows [c0 K, (c0 + cc) K) of W: the weight rows in T (a view when
  // possible), their inverse norms, the classes' bias; compute the chunk's products x_hat . W_r
  // (B x cc K, not yet divided by |W_r|) with BLAS.
  at::Tensor load(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& x_hat,
                  bool normalize_weight, double eps, int64_t c0, int64_t cc, at::Tensor* logits) {
    at::Tensor wc = weight_chunk(weight, direct, wbuf, c0 * K, cc * K);
    weight_chunk_norms<T>(wc, normalize_weight, eps, inv_wn.data_ptr<T>(), wnorm.data_ptr<T>());
    bias_chunk<T>(bias, bbuf, c0, cc);
    *logits = logits_view(ws, x_hat.size(0), cc * K);
    at::mm_out(*logits, x_hat, wc.t());
    return wc;
  }
};

}  // namespace l2sm_cpu
