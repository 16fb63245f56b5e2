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

// ---------------------------------------------------------------------------------------------
// the memory dial: products kept between the forward and the backward (docs/memory_dial.md)
// ---------------------------------------------------------------------------------------------
// The forward may keep the products x_hat . W_r of the first R rows of the batch with every row of W,
// an (R, C K) row-major block in the compute dtype, at most max_logits_bytes of it:
//     R = min(B, max_logits_bytes / (C K esize)).
// The backward then copies rows [0, R) of each chunk's products from the block and computes only
// rows [R, B) by BLAS: 3 + (B - R) / B GEMM-equivalents per step instead of 4. Splitting by rows,
// not by classes, keeps the layout independent of the chunk size and of the thread split (the
// backward may run with other settings than the forward), and gives every thread the same share of
// kept and recomputed work. The block travels to the backward inside the forward's aux (the op's
// declared output: loss_forward.cpp), so a budget of 0 (or no gradient asked for) adds nothing.
// Default (max_logits_bytes None): keep up to kDefaultMaxLogitsBytes; nothing when x and W are both bf16
// (bf16_inputs): their products are bf16 GEMMs (use_bf16_gemm), 2.6x faster than fp32 ones, and keeping
// the products (written and read back in fp32) then cost more than recomputing them (B = 256, D = 512,
// C = 16384, 2 threads, measured under load on the 2-core AMD EPYC: fp32 keep all 0.83x keep nothing;
// bf16 keep all 1.2x keep nothing; docs/memory_dial.md).
constexpr int64_t kDefaultMaxLogitsBytes = int64_t(256) << 20;

inline int64_t kept_rows(int64_t B, int64_t C, int64_t K, int64_t esize, c10::optional<int64_t> max_logits_bytes,
                         bool bf16_inputs = false) {
  const int64_t budget = max_logits_bytes.has_value() ? *max_logits_bytes
                                                       : (bf16_inputs ? int64_t(0) : kDefaultMaxLogitsBytes);
  const int64_t row = C * K * esize;  // bytes of one kept row (C K < 2^63 / esize: W exists)
  if (B <= 0 || row <= 0 || budget <= 0) return 0;
  return std::min<int64_t>(B, budget / row);
}

// ---------------------------------------------------------------------------------------------
// bf16 products: x and W both bf16 (docs/memory_dial.md, "bf16 inputs")
// ---------------------------------------------------------------------------------------------
// The three B x C K x D products then run through ATen's bf16 GEMM (oneDNN: AVX512-BF16 / AMX where
// the CPU has them, 2.6x an fp32 GEMM of a 256 x 1344 x 512 chunk on the 2-core AMD EPYC test
// machine, measured under load) on x_hat rounded to bf16 and W's rows as stored, accumulating in fp32
// inside the GEMM and rounding its result to bf16, as plain torch's bf16 matmuls do: the products
// x_hat . W_r (plain torch: its bf16 logits), dC' (its bf16 dZ), each chunk's dC' W_c (added into an
// fp32 dX_hat) and dC'^T X_hat (its bf16 dW product). Everything else (norms, epilogues, online
// logsumexp, the normalization backwards, the target cosine) stays in fp32 / double as for fp32
// inputs. set_bf16_gemm(false) (l2sm_kernels.backends.cpu.set_bf16_gemm) computes them in fp32 instead.
inline std::atomic<bool> g_bf16_gemm{true};

inline bool use_bf16_gemm(const at::Tensor& x, const at::Tensor& weight, at::ScalarType compute) {
  return g_bf16_gemm.load() && compute == at::kFloat && x.scalar_type() == at::kBFloat16 &&
         weight.scalar_type() == at::kBFloat16;
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
  // bf16 products (use_bf16_gemm): x_lp (B, D) x_hat in bf16 (undefined: products in T), plp (B chunk K)
  // bf16 products / dC', wlpbuf (chunk K, D) bf16 rows of a non-contiguous W, wlp the current rows
  at::Tensor x_lp, plp, wlpbuf, wlp;
  int64_t K;
  bool direct, lp_direct = false;
  ChunkBuffers(const at::Tensor& weight, int64_t B, int64_t D, int64_t chunk, int64_t K_, const at::TensorOptions& opt,
               const at::Tensor& x_lp_ = at::Tensor())
      : x_lp(x_lp_), K(K_) {
    constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
    direct = weight.scalar_type() == ct && weight.is_contiguous();
    ws = at::empty({B * chunk * K}, opt);
    if (!direct) wbuf = at::empty({chunk * K, D}, opt);
    inv_wn = at::empty({chunk * K}, opt);
    wnorm = at::empty({chunk * K}, opt);
    bbuf = at::zeros({chunk}, opt);
    if (x_lp.defined()) {
      plp = at::empty({B * chunk * K}, x_lp.options());
      lp_direct = weight.is_contiguous();
      if (!lp_direct) wlpbuf = at::empty({chunk * K, D}, x_lp.options());
    }
  }
  // rows [r0, r0 + n) of the current chunk's products (n x cc K, T) into out: by T's GEMM on x_hat and
  // wc, or by the bf16 GEMM on x_lp and wlp, then widened to T
  void product(at::Tensor out, const at::Tensor& x_hat, const at::Tensor& wc, int64_t r0, int64_t n) {
    if (!x_lp.defined()) {
      at::mm_out(out, x_hat.narrow(0, r0, n), wc.t());
      return;
    }
    at::Tensor p = plp.narrow(0, 0, n * out.size(1)).view({n, out.size(1)});
    at::mm_out(p, x_lp.narrow(0, r0, n), wlp.t());
    out.copy_(p);
  }
  // Load the classes [c0, c0 + cc), rows [c0 K, (c0 + cc) K) of W: the weight rows in T (a view when
  // possible), their inverse norms, the classes' bias; the chunk's products x_hat . W_r (B x cc K,
  // not yet divided by |W_r|) into the workspace. kept: the (R, C K) block of the memory dial
  // (undefined or R = 0: none). Forward (reuse false): all B rows by BLAS, then rows [0, R) copied
  // into the block's columns [c0 K, (c0 + cc) K). Backward (reuse true): rows [0, R) copied back from
  // the block, rows [R, B) by BLAS. The epilogues then run on the workspace, in cache, as without a
  // block: they never see where the products came from. With bf16 products (x_lp defined) the rows in
  // T are only needed for W's norms: without normalize_weight the returned wc is undefined.
  at::Tensor load(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& x_hat,
                  bool normalize_weight, double eps, int64_t c0, int64_t cc, at::Tensor* logits,
                  const at::Tensor& kept = at::Tensor(), bool reuse = false) {
    const bool lp = x_lp.defined();
    at::Tensor wc;
    if (!lp || normalize_weight) wc = weight_chunk(weight, direct, wbuf, c0 * K, cc * K);
    if (lp) wlp = weight_chunk(weight, lp_direct, wlpbuf, c0 * K, cc * K);
    if (normalize_weight) {
      weight_chunk_norms<T>(wc, true, eps, inv_wn.data_ptr<T>(), wnorm.data_ptr<T>());
    } else {
      std::fill(inv_wn.data_ptr<T>(), inv_wn.data_ptr<T>() + cc * K, T(1));
    }
    bias_chunk<T>(bias, bbuf, c0, cc);
    const int64_t B = x_hat.size(0);
    const int64_t R = kept.defined() ? kept.size(0) : 0;
    *logits = logits_view(ws, B, cc * K);
    if (reuse && R > 0) {
      logits->narrow(0, 0, R).copy_(kept.narrow(1, c0 * K, cc * K));
      if (R < B) product(logits->narrow(0, R, B - R), x_hat, wc, R, B - R);  // contiguous: whole rows
    } else {
      product(*logits, x_hat, wc, 0, B);
      if (R > 0) kept.narrow(1, c0 * K, cc * K).copy_(logits->narrow(0, 0, R));
    }
    return wc;
  }
};

}  // namespace l2sm_cpu
