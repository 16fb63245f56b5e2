// The backward of backend "cpu" (loss.h has the overview; chunking.h the chunks and threads;
// docs/design.md, "The backward", the formulas).
//
// The forward saves lse and aux = q (q_i = 1 - p_iy, accurate for confident rows; loss_forward.cpp),
// followed by the memory dial's kept products of the first R rows (chunking.h, kept_rows).
// Per chunk the products x_hat . W_r are copied from the kept block (rows [0, R)) and recomputed
// (BLAS, rows [R, B); all B x cc K of them when nothing is kept), and the epilogue
// (backward_cols) turns them in place into dC': for row i and class j with winning sub-center r
// (the max of its K; r = j when K = 1), dC'_ir = alpha dz_ij f'(c_ij) / max(|W_r|, eps) and 0 at the
// class's other sub-centers, with
//     dz_ij = w_p p_ij - w_k                              (j != y_i; p = exp(z - lse))
//     dz_iy = grad_lse p_iy - grad_loss q_i + w_t s (1 - 1/C)
// (the second is w_p p_iy - w_t (1 - s + s / C) with p_iy = 1 - q_i: no p - 1 formed, so a confident
// row's target gradient keeps its relative precision; with a non-target transform (common.h,
// Negatives) z_ij = alpha N(c_ij) + b_j off the target and dC'_ij carries N'(c_ij)), summing db and
// d alpha's per-class terms over
// the rows in double. Two more BLAS products per chunk: dX_hat += dC' W_c (one partial sum per
// worker, added in worker order at the end) and G = dC'^T X_hat straight into the chunk's rows of
// dW, which then get W's normalization backward. A class's gradient reaches only its winning
// sub-center (the others' dC' are 0: exactly zero dW rows).
//
// backward_impl: the outputs and row_weights, then each worker (backward_worker) walks its chunks
// (backward_chunk -> backward_cols; weight_rows_backward -> weight_norm_backward), and
// features_backward turns the summed dX_hat into dX.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "chunking.h"
#include "common.h"
#include "loss.h"

namespace l2sm_cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// backward epilogue: classes [j0, j1) of one chunk, all rows
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  T* L;              // (B x cc K) products x_hat . W_r (unscaled); overwritten with dC' when need_dc
  int64_t B, cc, c0, K;
  const T* inv_wn;   // (cc K) 1 / max(|W_r|, eps), or ones
  const T* bias;     // (cc) or zeros
  T alpha;
  const int64_t* tcol;  // (B) target class or -1
  const T* c_t;         // (B) the target class's cosine (common.h: target_cosines)
  const int64_t* win;   // (B) its winning sub-center
  const Margins<T>* margins;
  const Negatives<T>* neg;  // the non-target transform (common.h)
  const T* lse;      // (B)
  const T* q;        // (B) 1 - p_iy (the forward's aux)
  const T* w_p;      // (B) grad_loss + grad_lse (grad_loss taken as 0 on ignored rows)
  const T* w_k;      // (B) grad_loss * s / C: subtracted from every column
  const T* w_t;      // (B) grad_loss (0 on ignored rows, NaN on rows with an out-of-range target)
  const T* g_lse;    // (B) grad_lse
  const T* w_ts;     // (B) grad_loss * s (1 - 1/C): the target column's smoothing term
  double* db;        // (cc) sum_i dz_ij, accumulated in double (B rows one at a time: fp32 would drift)
  double* da;        // (cc) sum_i dz_ij g_ij, in double
};

// Non-target classes [ja, jb) of one row, K = 1: dz_ij = w_p p_ij - w_k, p = exp(z - lse);
// dC'_ij = alpha dz_ij / max(|W_j|, eps) (dloss/dc, pre-scaled by W's inverse norm so that
// dC' W = dC W_hat and dC'^T X_hat = dW_hat / |W|, see weight_norm_backward).
// NEG: the non-target transform (common.h, Negatives): z = alpha N(c) + b, d alpha's term dz N(c),
// dC' times N'(c) (t, t + 2c or 0 on the row's hard columns: th, tt are its threshold and t).
template <typename T, bool DC, bool DB, bool DA, bool NEG>
L2SM_INLINE void backward_span(T* Lr, const BwdArgs<T>& a, int64_t ja, int64_t jb, T lse, T wp, T wk, T th, T tt) {
  const T* inv = a.inv_wn;
  const T* b = a.bias;
  const T al = a.alpha;
  double* db = a.db;
  double* da = a.da;
  const int nk = a.neg->kind;
#pragma omp simd
  for (int64_t j = ja; j < jb; ++j) {
    const T c = Lr[j] * inv[j];
    T sl = T(1);
    const T g = NEG ? negative_value<T>(nk, c, th, tt, &sl) : c;
    const T p = vexp<T>(al * g + b[j] - lse);
    const T dz = wp * p - wk;
    if (DB) db[j] += double(dz);
    if (DA) da[j] += double(dz) * double(g);
    if (DC) Lr[j] = NEG ? al * dz * sl * inv[j] : al * dz * inv[j];
  }
}

// Classes per sub-block of the epilogue (backward_cols_impl): K = 1 columns, or K > 1 classes of K
// columns each up to this many columns. It also sizes backward_span_k's stack buffers.
constexpr int64_t kBlock = 512;

// The same with K > 1 sub-centers (at most kBlock classes): class j's cosine is the max of its K
// products (class_max), its dC' goes to the winning sub-center, the class's other K - 1 entries
// become 0. Two passes: the maxima (a strided, branch-free scalar pass) into stack buffers, then the
// exponentials and sums vectorized over the classes as for K = 1.
template <typename T, bool DC, bool DB, bool DA, bool NEG>
L2SM_INLINE void backward_span_k(T* Lr, const BwdArgs<T>& a, int64_t ja, int64_t jb, T lse, T wp, T wk, T th,
                                 T tt) {
  const int64_t K = a.K, n = jb - ja;
  const T* inv = a.inv_wn + ja * K;
  const T* b = a.bias + ja;
  const T al = a.alpha;
  double* db = a.db + ja;
  double* da = a.da + ja;
  const int nk = a.neg->kind;
  T* seg = Lr + ja * K;
  T cls[kBlock], val[kBlock];
  int32_t win[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    int64_t w;
    cls[j] = class_max(seg + j * K, inv + j * K, K, &w);
    win[j] = int32_t(w);
    val[j] = inv[j * K + w];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T c = cls[j];
    T sl = T(1);
    const T g = NEG ? negative_value<T>(nk, c, th, tt, &sl) : c;  // the transform of the class's max
    const T p = vexp<T>(al * g + b[j] - lse);
    const T dz = wp * p - wk;
    if (DB) db[j] += double(dz);
    if (DA) da[j] += double(dz) * double(g);
    if (DC) val[j] = NEG ? al * dz * sl * val[j] : al * dz * val[j];
  }
  if (DC) {
    std::fill(seg, seg + n * K, T(0));
    for (int64_t j = 0; j < n; ++j) seg[j * K + win[j]] = val[j];
  }
}

template <typename T, bool DC, bool DB, bool DA>
L2SM_INLINE void backward_other(T* Lr, const BwdArgs<T>& a, int64_t ja, int64_t jb, T lse, T wp, T wk, T th, T tt) {
  if (ja >= jb) return;
  const bool neg = a.neg->on();
  if (a.K == 1) {
    if (neg) {
      backward_span<T, DC, DB, DA, true>(Lr, a, ja, jb, lse, wp, wk, th, tt);
    } else {
      backward_span<T, DC, DB, DA, false>(Lr, a, ja, jb, lse, wp, wk, th, tt);
    }
  } else if (neg) {
    backward_span_k<T, DC, DB, DA, true>(Lr, a, ja, jb, lse, wp, wk, th, tt);
  } else {
    backward_span_k<T, DC, DB, DA, false>(Lr, a, ja, jb, lse, wp, wk, th, tt);
  }
}

// Row i's target class t (in the chunk; c its precise cosine, win its winner): z = alpha f(c) + b, and
// dz = grad_lse p - grad_loss q + grad_loss s (1 - 1/C) (see the file comment; p keeps its relative
// precision as an exponential, q comes from the forward); dC' = alpha dz f'(c) / |W_r| at the winner.
template <typename T, bool DC, bool DB, bool DA>
L2SM_INLINE void backward_target(T* Lr, const BwdArgs<T>& a, int64_t i, int64_t t, T lse) {
  const int64_t K = a.K, win = a.win[i];
  const T c = a.c_t[i];  // as in the forward
  T f, slope;
  a.margins->apply(i, c, f, slope);
  const T p = vexp<T>(a.alpha * f + a.bias[t] - lse);
  const T dz = (a.g_lse[i] * p - a.w_t[i] * a.q[i]) + a.w_ts[i];
  if (DB) a.db[t] += double(dz);
  if (DA) a.da[t] += double(dz) * double(f);
  if (DC) {
    const T v = a.alpha * dz * slope * a.inv_wn[t * K + win];
    for (int64_t k = 0; k < K; ++k) Lr[t * K + k] = T(0);
    Lr[t * K + win] = v;
  }
}

template <typename T, bool DC, bool DB, bool DA>
L2SM_INLINE void backward_cols_impl(const BwdArgs<T>& a, int64_t j0, int64_t j1) {
  // sub-blocks of classes keep the db / da accumulators and the rows' segments in L1 / L2
  const int64_t block = std::max<int64_t>(1, kBlock / a.K);
  for (int64_t jb0 = j0; jb0 < j1; jb0 += block) {
    const int64_t jb1 = std::min(j1, jb0 + block);
    for (int64_t i = 0; i < a.B; ++i) {  // rows in order: each class's sums have a fixed order
      T* Lr = a.L + i * a.cc * a.K;
      const T lse = a.lse[i], wp = a.w_p[i], wk = a.w_k[i];
      const T th = a.neg->on() ? a.neg->thr[i] : T(0), tt = a.neg->on() ? a.neg->t[i] : T(0);
      const int64_t t = a.tcol[i] - a.c0;
      if (a.tcol[i] >= 0 && t >= jb0 && t < jb1) {
        backward_other<T, DC, DB, DA>(Lr, a, jb0, t, lse, wp, wk, th, tt);
        backward_target<T, DC, DB, DA>(Lr, a, i, t, lse);
        backward_other<T, DC, DB, DA>(Lr, a, t + 1, jb1, lse, wp, wk, th, tt);
      } else {
        backward_other<T, DC, DB, DA>(Lr, a, jb0, jb1, lse, wp, wk, th, tt);
      }
    }
  }
}

#define L2SM_BWD_VARIANT(NAME, T, DC, DB, DA) \
  L2SM_CLONES void NAME(const BwdArgs<T>& a, int64_t j0, int64_t j1) { backward_cols_impl<T, DC, DB, DA>(a, j0, j1); }
L2SM_BWD_VARIANT(bwd_f32_ddd, float, true, true, true)
L2SM_BWD_VARIANT(bwd_f32_dd_, float, true, true, false)
L2SM_BWD_VARIANT(bwd_f32_d_d, float, true, false, true)
L2SM_BWD_VARIANT(bwd_f32_d__, float, true, false, false)
L2SM_BWD_VARIANT(bwd_f32__dd, float, false, true, true)
L2SM_BWD_VARIANT(bwd_f32__d_, float, false, true, false)
L2SM_BWD_VARIANT(bwd_f32___d, float, false, false, true)
#undef L2SM_BWD_VARIANT

void backward_cols(const BwdArgs<float>& a, int64_t j0, int64_t j1, bool dc, bool db, bool da) {
  if (dc && db && da) return bwd_f32_ddd(a, j0, j1);
  if (dc && db) return bwd_f32_dd_(a, j0, j1);
  if (dc && da) return bwd_f32_d_d(a, j0, j1);
  if (dc) return bwd_f32_d__(a, j0, j1);
  if (db && da) return bwd_f32__dd(a, j0, j1);
  if (db) return bwd_f32__d_(a, j0, j1);
  if (da) return bwd_f32___d(a, j0, j1);
}

void backward_cols(const BwdArgs<double>& a, int64_t j0, int64_t j1, bool dc, bool db, bool da) {
  // float64 is for gradcheck: one variant that does everything asked, branches hoisted by hand
  if (dc && db && da) return backward_cols_impl<double, true, true, true>(a, j0, j1);
  if (dc) return backward_cols_impl<double, true, true, true>(a, j0, j1);  // db / da unused
  return backward_cols_impl<double, false, true, true>(a, j0, j1);
}

// ---------------------------------------------------------------------------------------------
// backward: per-row weights, one worker's walk, one chunk's step, the normalization backwards
// ---------------------------------------------------------------------------------------------
// Per-row weights of the softmax and target terms (backends/contract.py), in T: w_t = grad_loss (0
// on ignored rows, NaN on rows with an out-of-range target: never a plausible gradient),
// w_p = w_t + grad_lse, w_k = w_t s / C (every column), w_ts = w_t s (1 - 1/C) (the target column's
// smoothing term; see BwdArgs).
template <typename T>
struct RowWeights {
  std::vector<T> w_p, w_k, w_t, g_lse, w_ts;  // (B) each
};

template <typename T>
RowWeights<T> row_weights(const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& valid,
                          const at::Tensor& bad, double s, int64_t C) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = valid.size(0);
  at::Tensor gl = grad_loss.to(ct).contiguous(), gs = grad_lse.to(ct).contiguous();
  RowWeights<T> r{std::vector<T>(B), std::vector<T>(B), std::vector<T>(B), std::vector<T>(B), std::vector<T>(B)};
  const T* glp = gl.data_ptr<T>();
  const T* gsp = gs.data_ptr<T>();
  const bool* vp = valid.data_ptr<bool>();
  const bool* bdp = bad.data_ptr<bool>();
  const T k_all = T(s / double(C)), k_t = T(s * (1.0 - 1.0 / double(C)));
  for (int64_t i = 0; i < B; ++i) {
    T wt = vp[i] ? glp[i] : T(0);
    if (bdp[i]) wt = std::numeric_limits<T>::quiet_NaN();
    r.w_p[i] = wt + gsp[i];
    r.w_k[i] = wt * k_all;
    r.w_t[i] = wt;
    r.g_lse[i] = gsp[i];
    r.w_ts[i] = wt * k_t;
  }
  return r;
}

// What the chunks of one backward call share: the inputs, in T where the epilogue reads them, and
// the outputs of which each chunk writes its rows (classes [c0, c0 + cc): rows [c0 K, (c0 + cc) K) of dW).
template <typename T>
struct BackwardCall {
  const at::Tensor& weight;  // (C K x D), any floating dtype and strides
  const c10::optional<at::Tensor>& bias;
  const at::Tensor& x_hat;  // (B x D) in T
  at::Tensor x_lp;          // x_hat in bf16 when the products are bf16 GEMMs (chunking.h), else undefined
  at::TensorOptions opt;    // of T
  int64_t C, K;             // classes, sub-centers per class
  bool normalize_weight;
  double eps;
  bool need_x, need_weight, need_bias, need_alpha;
  T alpha;
  const Margins<T>* margins;
  const Negatives<T>* neg;
  const int64_t* tcol;  // (B) target class or -1
  const T* c_t;         // (B) the target class's cosine, and its winning sub-center (target_cosines)
  const int64_t* win;
  const T* lse;         // (B)
  const T* q;           // (B) the forward's aux: 1 - p_iy
  const RowWeights<T>* rows;
  at::Tensor kept;    // (R, C K) the forward's kept products of rows [0, R), or undefined (R = 0)
  at::Tensor gw, gb;  // (C K x D) and (C) outputs in the inputs' dtypes, or empty when not asked for
  bool gw_direct;     // gw is in T (and contiguous): the chunks' dW rows are computed in place
};

// One worker's buffers: the chunk workspace, dW rows in T when gw is not (gbuf, chunk K x D), the
// per-class sums over the B rows in double (db, and da: sum_i dz_ij g_ij of d alpha), and the
// worker's dX_hat partial sum dxw.
template <typename T>
struct WorkerBuffers {
  ChunkBuffers<T> buf;
  at::Tensor gbuf, db, da, dxw;
  at::Tensor dxlp, glp;  // bf16 products: a chunk's dC' W_c (B, D) and dC'^T X_hat (chunk K, D) in bf16
  WorkerBuffers(const BackwardCall<T>& k, int64_t chunk)
      : buf(k.weight, k.x_hat.size(0), k.x_hat.size(1), chunk, k.K, k.opt, k.x_lp) {
    if (k.need_weight && !k.gw_direct) gbuf = at::empty({chunk * k.K, k.x_hat.size(1)}, k.opt);
    if (k.x_lp.defined() && k.need_x) dxlp = at::empty({k.x_hat.size(0), k.x_hat.size(1)}, k.x_lp.options());
    if (k.x_lp.defined() && k.need_weight && k.normalize_weight) {
      glp = at::empty({chunk * k.K, k.x_hat.size(1)}, k.x_lp.options());
    }
    const auto opt64 = k.opt.dtype(at::kDouble);
    db = at::empty({chunk}, opt64);
    da = at::empty({chunk}, opt64);
  }
};

// The normalization backward of W, in place on n rows of g (D columns). On entry g holds
// G = dC'^T X_hat, which is dW_hat / max(|W_r|, eps) row-wise: dC' carries W's inverse norm
// (backward_span). With W_hat = W / max(|W|, eps) the normalization backward is then
//   dW = (dW_hat - W_hat (W_hat . dW_hat)) / |W| = G - W_hat (W_hat . G)   where |W_r| >= eps,
//   dW = dW_hat / eps = G                                                   where |W_r| < eps,
// as normalize_rows_backward does for x. w: the rows of W in T; nrm: their |W_r|.
// W_hat is formed as W / max(|W|, eps), as eager does, not as W times the rounded inverse norm:
// then W_hat . W_hat = 1 to rounding and the projection removes the radial part of G exactly where it
// should (D = 1: dW = 0 exactly; through W * (1/|W|) a residue of G times a few ulps stays, and G
// is large where the angular margin's slope is, near c = 1: tests/test_margins.py). Never through
// 1 / |W|^2, which underflows in fp32 for |W| >~ 1e19.
template <typename T>
void weight_norm_backward(T* g, const T* w, const T* nrm, int64_t n, int64_t D, double eps) {
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t j = r0; j < r1; ++j) {
      if (!(nrm[j] >= T(eps))) continue;
      T* gr = g + j * D;
      const T* wr = w + j * D;
      const T den = nrm[j];  // = max(|W_r|, eps) on this branch
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < D; ++k) acc += double(wr[k] / den) * double(gr[k]);
      const T proj = T(acc);
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) gr[k] -= (wr[k] / den) * proj;
    }
  });
}

// The chunk's rows of dW (cc K of them): G = dC'^T X_hat by BLAS, straight into gw's rows when gw is
// in T (else through gbuf, then converted), and W's normalization backward on them.
// With bf16 products Lv is dC' in bf16: G = dC'^T X_hat by the bf16 GEMM, straight into gw's (bf16)
// rows without normalize_weight, else through glp into gbuf (T) for the normalization backward.
template <typename T>
void weight_rows_backward(const BackwardCall<T>& k, WorkerBuffers<T>& wb, const at::Tensor& Lv, const at::Tensor& wc,
                          int64_t c0, int64_t cc) {
  const int64_t r0 = c0 * k.K, n = cc * k.K;
  if (k.x_lp.defined() && !k.normalize_weight) {
    at::Tensor rows = k.gw.narrow(0, r0, n);  // gw: bf16, contiguous
    at::mm_out(rows, Lv.t(), k.x_lp);
    return;
  }
  at::Tensor g = k.gw_direct ? k.gw.narrow(0, r0, n) : wb.gbuf.narrow(0, 0, n);
  if (k.x_lp.defined()) {
    at::Tensor g_lp = wb.glp.narrow(0, 0, n);
    at::mm_out(g_lp, Lv.t(), k.x_lp);
    g.copy_(g_lp);
  } else {
    at::mm_out(g, Lv.t(), k.x_hat);
  }
  if (k.normalize_weight) {
    weight_norm_backward<T>(g.data_ptr<T>(), wc.data_ptr<T>(), wb.buf.wnorm.template data_ptr<T>(), n,
                            k.x_hat.size(1), k.eps);
  }
  if (!k.gw_direct) k.gw.narrow(0, r0, n).copy_(g);
}

// One chunk of classes [c0, c0 + cc): its products (kept rows copied, the others recomputed), the epilogue (dC' in their place;
// the per-class sums db and da), then the chunk's share of each gradient: its rows of grad_bias, its
// terms of d alpha (added to *dalpha), dX_hat += dC' W_c into the worker's partial sum, its rows of dW.
template <typename T>
void backward_chunk(const BackwardCall<T>& k, WorkerBuffers<T>& wb, int64_t c0, int64_t cc, double* dalpha) {
  at::Tensor Lv;
  at::Tensor wc = wb.buf.load(k.weight, k.bias, k.x_hat, k.normalize_weight, k.eps, c0, cc, &Lv, k.kept,
                              /*reuse=*/true);
  double* dbp = wb.db.template data_ptr<double>();
  double* dap = wb.da.template data_ptr<double>();
  std::fill(dbp, dbp + cc, 0.0);
  std::fill(dap, dap + cc, 0.0);
  const RowWeights<T>& r = *k.rows;
  BwdArgs<T> a{Lv.data_ptr<T>(), k.x_hat.size(0), cc, c0, k.K, wb.buf.inv_wn.template data_ptr<T>(),
               wb.buf.bbuf.template data_ptr<T>(), k.alpha, k.tcol, k.c_t, k.win, k.margins, k.neg, k.lse, k.q,
               r.w_p.data(),
               r.w_k.data(), r.w_t.data(), r.g_lse.data(), r.w_ts.data(), dbp, dap};
  const bool need_dc = k.need_x || k.need_weight;
  at::parallel_for(0, cc, 256, [&](int64_t j0, int64_t j1) {
    backward_cols(a, j0, j1, need_dc, k.need_bias, k.need_alpha);
  });
  if (k.need_bias) k.gb.narrow(0, c0, cc).copy_(wb.db.narrow(0, 0, cc));
  if (k.need_alpha) {
    for (int64_t j = 0; j < cc; ++j) *dalpha += dap[j];  // z = alpha g + b: dalpha = sum dz g
  }
  if (k.x_lp.defined() && (k.need_x || k.need_weight)) {
    // bf16 products: dC' rounded to bf16 once (plain torch's dZ is bf16), both GEMMs in bf16; each
    // chunk's dC' W_c is rounded to bf16 and added into the fp32 dX_hat
    at::Tensor d_lp = wb.buf.plp.narrow(0, 0, Lv.numel()).view(Lv.sizes());
    d_lp.copy_(Lv);
    if (k.need_x) {
      at::mm_out(wb.dxlp, d_lp, wb.buf.wlp);
      wb.dxw.add_(wb.dxlp);
    }
    if (k.need_weight) weight_rows_backward<T>(k, wb, d_lp, wc, c0, cc);
    return;
  }
  if (k.need_x) wb.dxw.addmm_(Lv, wc);  // dX_hat += dC' W_c  (= dC W_hat_c)
  if (k.need_weight) weight_rows_backward<T>(k, wb, Lv, wc, c0, cc);
}

// Worker w's walk over the chunks of its classes; -> its dX_hat partial sum (dx_hat itself for
// worker 0, which accumulates into it; undefined without need_x). Its share of d alpha goes to *dalpha.
template <typename T>
at::Tensor backward_worker(const BackwardCall<T>& k, const Split& split, int64_t w, const at::Tensor& dx_hat,
                           double* dalpha) {
  WorkerBuffers<T> wb(k, split.max_chunk(w, k.C));
  if (k.need_x) wb.dxw = w == 0 ? dx_hat : at::zeros(dx_hat.sizes(), k.opt);
  const auto range = split.classes(w, k.C);
  for (int64_t c0 = range.first; c0 < range.second; c0 += split.chunk) {
    backward_chunk<T>(k, wb, c0, std::min(split.chunk, range.second - c0), dalpha);
  }
  return wb.dxw;
}

// dX: the workers' dX_hat partial sums added in worker order (deterministic), x's normalization
// backward on dX_hat in place, then into gx (x's dtype).
template <typename T>
void features_backward(at::Tensor& dx_hat, const std::vector<at::Tensor>& dx_part, const at::Tensor& x_hat,
                       const at::Tensor& x_norm, double eps, at::Tensor& gx) {
  const int64_t nw = int64_t(dx_part.size()), B = x_hat.size(0), D = x_hat.size(1);
  for (int64_t w = 1; w < nw; ++w) dx_hat.add_(dx_part[w]);
  T* gp = dx_hat.data_ptr<T>();
  const T* hp = x_hat.data_ptr<T>();
  const T* np = x_norm.data_ptr<T>();
  at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) { normalize_rows_backward<T>(gp, hp, np, r0, r1, D, eps); });
  gx.copy_(dx_hat);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& margin_table, double s, const at::Tensor& lse_in, const at::Tensor& aux,
    bool normalize_weight, c10::string_view kind, bool detached, int64_t K, int64_t C, int64_t ignore_index,
    double eps, const c10::optional<at::Tensor>& negatives_table, c10::string_view negatives, bool need_x,
    bool need_weight, bool need_bias, bool need_alpha) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = x.size(0), D = x.size(1);
  const auto opt = x.options().dtype(ct);
  const Margins<T> margins(kind, detached, margin_table, B);

  // outputs: in each input's dtype, contiguous; an empty tensor for each one not asked for
  const at::ScalarType bias_dt = bias.has_value() ? bias->scalar_type() : x.scalar_type();
  at::Tensor gx = need_x ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = need_weight ? at::empty({C * K, D}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor gb = need_bias ? at::empty({C}, x.options().dtype(bias_dt)) : at::empty({0}, x.options().dtype(bias_dt));
  at::Tensor ga = need_alpha ? at::empty({}, alpha.options()) : at::empty({0}, alpha.options());
  if (!(need_x || need_weight || need_bias || need_alpha)) return {gx, gw, gb, ga};
  if (B == 0) {  // no rows: every gradient is zero
    gx.zero_();
    gw.zero_();
    gb.zero_();
    ga.zero_();
    return {gx, gw, gb, ga};
  }

  at::Tensor valid, bad;
  at::Tensor tcol = target_columns(target, C, ignore_index, &valid, &bad);
  at::Tensor x_hat, x_norm;
  normalized_features<T>(x, eps, &x_hat, &x_norm);
  const RowWeights<T> rows = row_weights<T>(grad_loss, grad_lse, valid, bad, s, C);
  std::vector<T> c_t(B);
  std::vector<int64_t> win(B);
  target_cosines<T>(x, weight, tcol.data_ptr<int64_t>(), K, normalize_weight, eps, c_t.data(), win.data());
  const Negatives<T> neg(negatives, negatives_table, B, tcol.data_ptr<int64_t>(), c_t.data(), margins);
  at::Tensor lse = lse_in.to(ct).contiguous();
  at::Tensor aux_t = aux.to(ct).contiguous();  // as the forward returned it: no copy
  at::Tensor q = aux_t.narrow(0, 0, B);
  const int64_t R = (aux_t.numel() - B) / std::max<int64_t>(C * K, 1);  // kept rows (cpu_backward checked it)
  at::Tensor kept = R > 0 ? aux_t.narrow(0, B, R * C * K).view({R, C * K}) : at::Tensor();
  const bool gw_direct = weight.scalar_type() == ct;  // gw is contiguous: dW rows are written in place
  const at::Tensor x_lp = use_bf16_gemm(x, weight, ct) ? x_hat.to(at::kBFloat16) : at::Tensor();
  const BackwardCall<T> k{weight, bias, x_hat, x_lp, opt, C, K, normalize_weight, eps, need_x, need_weight, need_bias,
                          need_alpha, T(alpha_value(alpha)), &margins, &neg, tcol.data_ptr<int64_t>(), c_t.data(),
                          win.data(),
                          lse.data_ptr<T>(),
                          q.data_ptr<T>(), &rows, kept, gw, gb, gw_direct};

  const Split split(B, C, D, sizeof(T), K);
  // per worker: dX_hat partial sums (worker 0 accumulates into dx_hat itself) and d alpha
  at::Tensor dx_hat = need_x ? at::zeros({B, D}, opt) : at::Tensor();
  std::vector<at::Tensor> dx_part(split.workers);
  std::vector<double> dalpha(split.workers, 0.0);
  split.run([&](int64_t w) { dx_part[w] = backward_worker<T>(k, split, w, dx_hat, &dalpha[w]); });

  if (need_x) features_backward<T>(dx_hat, dx_part, x_hat, x_norm, eps, gx);
  if (need_alpha) {
    double total = 0.0;
    for (int64_t w = 0; w < split.workers; ++w) total += dalpha[w];
    ga.fill_(total);
  }
  return {gx, gw, gb, ga};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& margins, const c10::optional<at::Tensor>& label_smoothing,
    const c10::optional<at::Tensor>& negatives_table, const at::Tensor& lse, const at::Tensor& aux,
    bool normalize_weight, c10::string_view margin_kind, bool margin_detached, int64_t subcenters,
    int64_t ignore_index, double eps, c10::string_view negatives, c10::optional<int64_t> max_logits_bytes,
    bool need_x, bool need_weight, bool need_bias, bool need_alpha) {
  const int64_t C = check_inputs(x, weight, target, alpha, bias, subcenters);
  const int64_t B = x.size(0);
  TORCH_CHECK(grad_loss.numel() == B && grad_lse.numel() == B && lse.numel() == B,
              "l2sm::cpu_backward: grad_loss, grad_lse and lse must have B = ", B, " elements");
  const int64_t CK = C * subcenters;
  const int64_t extra = aux.numel() - B;  // the kept block: R rows of C K products
  TORCH_CHECK(aux.dim() == 1 && at::isFloatingType(aux.scalar_type()) && extra >= 0 &&
                  (CK == 0 ? extra == 0 : extra % CK == 0 && extra / CK <= B),
              "l2sm::cpu_backward: aux must be the (B + R C K,) tensor cpu_forward returned (1 - p_y per row, then ",
              "the kept products of R <= B rows), got shape ", aux.sizes(), " for B = ", B, ", C K = ", CK);
  TORCH_CHECK(!need_bias || bias.has_value(), "l2sm::cpu_backward: need_bias without a bias");
  const KernelGuard guard;
  const double s = smoothing_value(label_smoothing);
  if (compute_type(x, weight, bias) == at::kDouble) {
    return backward_impl<double>(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, s, lse, aux,
                                 normalize_weight, margin_kind, margin_detached, subcenters, C, ignore_index, eps,
                                 negatives_table, negatives, need_x, need_weight, need_bias, need_alpha);
  }
  return backward_impl<float>(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, s, lse, aux,
                              normalize_weight, margin_kind, margin_detached, subcenters, C, ignore_index, eps,
                              negatives_table, negatives, need_x, need_weight, need_bias, need_alpha);
}

}  // namespace l2sm_cpu
