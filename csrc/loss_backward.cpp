// The backward of backend "cpu" (loss.h has the overview; chunking.h the chunks and threads;
// docs/design.md, "The backward", the formulas).
//
// The forward saves only lse. Per chunk the cosines are recomputed (BLAS) and the epilogue
// (backward_cols) turns them in place into dC' = alpha dz f'(c) / max(|W_j|, eps), with
// dz = w_p p - w_k - [j = y] w_t and p = exp(z - lse), summing db and d alpha's per-column terms
// over the rows in double. Two more BLAS products per chunk: dX_hat += dC' W_c (one partial sum per
// worker, added in worker order at the end) and G = dC'^T X_hat straight into the chunk's rows of
// dW, which then get W's normalization backward.
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
// backward epilogue: columns [j0, j1) of one chunk, all rows
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  T* L;              // (B x cc) chunk of cosines (unscaled); overwritten with dC' when need_dc
  int64_t B, cc, c0;
  const T* inv_wn;   // (cc) 1 / max(|W_j|, eps), or ones
  const T* bias;     // (cc) or zeros
  T alpha;
  const int64_t* tcol;  // (B) target class or -1
  const Margin* margin;
  const T* lse;      // (B)
  const T* w_p;      // (B) grad_loss + grad_lse (grad_loss taken as 0 on ignored rows)
  const T* w_k;      // (B) grad_loss * s / C: subtracted from every column
  const T* w_t;      // (B) grad_loss * (1 - s): subtracted from the target column as well
  double* db;        // (cc) sum_i dz_ij, accumulated in double (B rows one at a time: fp32 would drift)
  double* da;        // (cc) sum_i dz_ij g_ij, in double
};

// dz_ij = w_p p_ij - w_k - [j = y_i] w_t (backends/contract.py), p = exp(z - lse);
// dC'_ij = alpha dz_ij f'(c_ij) / max(|W_j|, eps) (dloss/dc, pre-scaled by W's inverse norm so that
// dC' W = dC W_hat and dC'^T X_hat = dW_hat / |W|, see weight_norm_backward).
template <typename T, bool DC, bool DB, bool DA>
L2SM_INLINE void backward_span(T* Lr, const BwdArgs<T>& a, int64_t ja, int64_t jb, T lse, T wp, T wk) {
  const T* inv = a.inv_wn;
  const T* b = a.bias;
  const T al = a.alpha;
  double* db = a.db;
  double* da = a.da;
#pragma omp simd
  for (int64_t j = ja; j < jb; ++j) {
    const T c = Lr[j] * inv[j];
    const T p = vexp<T>(al * c + b[j] - lse);
    const T dz = wp * p - wk;
    if (DB) db[j] += double(dz);
    if (DA) da[j] += double(dz) * double(c);
    if (DC) Lr[j] = al * dz * inv[j];
  }
}

template <typename T, bool DC, bool DB, bool DA>
L2SM_INLINE void backward_cols_impl(const BwdArgs<T>& a, int64_t j0, int64_t j1) {
  // sub-blocks of columns keep the db / da accumulators and the rows' segments in L1 / L2
  constexpr int64_t kBlock = 512;
  for (int64_t jb0 = j0; jb0 < j1; jb0 += kBlock) {
    const int64_t jb1 = std::min(j1, jb0 + kBlock);
    for (int64_t i = 0; i < a.B; ++i) {  // rows in order: each column's sums have a fixed order
      T* Lr = a.L + i * a.cc;
      const T lse = a.lse[i], wp = a.w_p[i], wk = a.w_k[i];
      const int64_t t = a.tcol[i] - a.c0;
      if (a.tcol[i] >= 0 && t >= jb0 && t < jb1) {
        backward_span<T, DC, DB, DA>(Lr, a, jb0, t, lse, wp, wk);
        // the target column: z = alpha f(c) + b, and the target term of dz
        const T c = Lr[t] * a.inv_wn[t];
        T f, slope;
        a.margin->apply(c, f, slope);
        const T p = vexp<T>(a.alpha * f + a.bias[t] - lse);
        // the target term: dz = w (p - 1) for the plain loss. A confident row has p close to 1; the
        // difference is formed here in T (fp32 even for fp16 / bf16 inputs), where it keeps its
        // digits: in a 16-bit type it would round to 0 or to a few bits.
        const T dz = (wp * p - wk) - a.w_t[i];
        if (DB) a.db[t] += double(dz);
        if (DA) a.da[t] += double(dz) * double(f);
        if (DC) Lr[t] = a.alpha * dz * slope * a.inv_wn[t];
        backward_span<T, DC, DB, DA>(Lr, a, t + 1, jb1, lse, wp, wk);
      } else {
        backward_span<T, DC, DB, DA>(Lr, a, jb0, jb1, lse, wp, wk);
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
// Per-row weights of the softmax and target terms (backends/contract.py), in T: w_t = grad_loss (0 on ignored
// rows, NaN on rows with an out-of-range target: never a plausible gradient), w_p = w_t + grad_lse;
// with label smoothing s the epilogue takes w_k = w_t s / C and w_t (1 - s) (see BwdArgs).
template <typename T>
struct RowWeights {
  std::vector<T> w_p, w_k, w_t;  // (B) each
};

template <typename T>
RowWeights<T> row_weights(const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& valid,
                          const at::Tensor& bad, double s, int64_t C) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = valid.size(0);
  at::Tensor gl = grad_loss.to(ct).contiguous(), gs = grad_lse.to(ct).contiguous();
  RowWeights<T> r{std::vector<T>(B), std::vector<T>(B), std::vector<T>(B)};
  const T* glp = gl.data_ptr<T>();
  const T* gsp = gs.data_ptr<T>();
  const bool* vp = valid.data_ptr<bool>();
  const bool* bdp = bad.data_ptr<bool>();
  for (int64_t i = 0; i < B; ++i) {
    T wt = vp[i] ? glp[i] : T(0);
    if (bdp[i]) wt = std::numeric_limits<T>::quiet_NaN();
    r.w_p[i] = wt + gsp[i];
    r.w_k[i] = wt * T(s / double(C));
    r.w_t[i] = wt * T(1.0 - s);
  }
  return r;
}

// What the chunks of one backward call share: the inputs, in T where the epilogue reads them, and
// the outputs of which each chunk writes its rows [c0, c0 + cc).
template <typename T>
struct BackwardCall {
  const at::Tensor& weight;  // (C x D), any floating dtype and strides
  const c10::optional<at::Tensor>& bias;
  const at::Tensor& x_hat;  // (B x D) in T
  at::TensorOptions opt;    // of T
  bool normalize_weight;
  double eps;
  bool need_x, need_weight, need_bias, need_alpha;
  T alpha;
  const Margin* margin;
  const int64_t* tcol;  // (B) target class or -1
  const T* lse;         // (B)
  const RowWeights<T>* rows;
  at::Tensor gw, gb;  // (C x D) and (C) outputs in the inputs' dtypes, or empty when not asked for
  bool gw_direct;     // gw is in T (and contiguous): the chunks' dW rows are computed in place
};

// One worker's buffers: the chunk workspace, dW rows in T when gw is not (gbuf), the per-column
// sums over the B rows in double (db, and da: sum_i dz_ij g_ij of d alpha), and the worker's
// dX_hat partial sum dxw.
template <typename T>
struct WorkerBuffers {
  ChunkBuffers<T> buf;
  at::Tensor gbuf, db, da, dxw;
  WorkerBuffers(const BackwardCall<T>& k, int64_t chunk)
      : buf(k.weight, k.x_hat.size(0), k.x_hat.size(1), chunk, k.opt) {
    if (k.need_weight && !k.gw_direct) gbuf = at::empty({chunk, k.x_hat.size(1)}, k.opt);
    const auto opt64 = k.opt.dtype(at::kDouble);
    db = at::empty({chunk}, opt64);
    da = at::empty({chunk}, opt64);
  }
};

// The normalization backward of W, in place on one chunk's cc rows of g (D columns). On entry g
// holds G = dC'^T X_hat, which is dW_hat / max(|W_j|, eps) row-wise: dC' carries W's inverse norm
// (backward_span). With W_hat = W / max(|W|, eps) the normalization backward is then
//   dW = (dW_hat - W_hat (W_hat . dW_hat)) / |W| = G - W_hat (W_hat . G)   where |W_j| >= eps,
//   dW = dW_hat / eps = G                                                   where |W_j| < eps,
// as normalize_rows_backward does for x. w: the chunk's rows of W in T; inv, nrm: their
// 1 / max(|W_j|, eps) and |W_j|.
template <typename T>
void weight_norm_backward(T* g, const T* w, const T* inv, const T* nrm, int64_t cc, int64_t D, double eps) {
  at::parallel_for(0, cc, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t j = r0; j < r1; ++j) {
      if (!(nrm[j] >= T(eps))) continue;
      T* gr = g + j * D;
      const T* wr = w + j * D;
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < D; ++k) acc += double(wr[k]) * double(gr[k]);
      // W_hat (W_hat . G), formed through W_hat = W / |W| (as eager does): inv^2 would underflow
      // in fp32 for |W| >~ 1e19
      const T proj = T(acc * double(inv[j]));
      const T iv = inv[j];
      for (int64_t k = 0; k < D; ++k) gr[k] -= (wr[k] * iv) * proj;
    }
  });
}

// The chunk's rows of dW: G = dC'^T X_hat by BLAS, straight into gw's rows when gw is in T (else
// through gbuf, then converted), and W's normalization backward on them.
template <typename T>
void weight_rows_backward(const BackwardCall<T>& k, WorkerBuffers<T>& wb, const at::Tensor& Lv, const at::Tensor& wc,
                          int64_t c0, int64_t cc) {
  at::Tensor g = k.gw_direct ? k.gw.narrow(0, c0, cc) : wb.gbuf.narrow(0, 0, cc);
  at::mm_out(g, Lv.t(), k.x_hat);
  if (k.normalize_weight) {
    weight_norm_backward<T>(g.data_ptr<T>(), wc.data_ptr<T>(), wb.buf.inv_wn.template data_ptr<T>(),
                            wb.buf.wnorm.template data_ptr<T>(), cc, k.x_hat.size(1), k.eps);
  }
  if (!k.gw_direct) k.gw.narrow(0, c0, cc).copy_(g);
}

// One chunk [c0, c0 + cc): recompute its logits, run the epilogue (dC' in place of the logits; the
// column sums db and da), then the chunk's share of each gradient: its rows of grad_bias, its terms
// of d alpha (added to *dalpha), dX_hat += dC' W_c into the worker's partial sum, its rows of dW.
template <typename T>
void backward_chunk(const BackwardCall<T>& k, WorkerBuffers<T>& wb, int64_t c0, int64_t cc, double* dalpha) {
  at::Tensor Lv;
  at::Tensor wc = wb.buf.load(k.weight, k.bias, k.x_hat, k.normalize_weight, k.eps, c0, cc, &Lv);  // recompute
  double* dbp = wb.db.template data_ptr<double>();
  double* dap = wb.da.template data_ptr<double>();
  std::fill(dbp, dbp + cc, 0.0);
  std::fill(dap, dap + cc, 0.0);
  const RowWeights<T>& r = *k.rows;
  BwdArgs<T> a{Lv.data_ptr<T>(), k.x_hat.size(0), cc, c0, wb.buf.inv_wn.template data_ptr<T>(),
               wb.buf.bbuf.template data_ptr<T>(), k.alpha, k.tcol, k.margin, k.lse, r.w_p.data(), r.w_k.data(),
               r.w_t.data(), dbp, dap};
  const bool need_dc = k.need_x || k.need_weight;
  at::parallel_for(0, cc, 256, [&](int64_t j0, int64_t j1) {
    backward_cols(a, j0, j1, need_dc, k.need_bias, k.need_alpha);
  });
  if (k.need_bias) k.gb.narrow(0, c0, cc).copy_(wb.db.narrow(0, 0, cc));
  if (k.need_alpha) {
    for (int64_t j = 0; j < cc; ++j) *dalpha += dap[j];  // z = alpha g + b: dalpha = sum dz g
  }
  if (k.need_x) wb.dxw.addmm_(Lv, wc);  // dX_hat += dC' W_c  (= dC W_hat_c)
  if (k.need_weight) weight_rows_backward<T>(k, wb, Lv, wc, c0, cc);
}

// Worker w's walk over the chunks of its classes; -> its dX_hat partial sum (dx_hat itself for
// worker 0, which accumulates into it; undefined without need_x). Its share of d alpha goes to *dalpha.
template <typename T>
at::Tensor backward_worker(const BackwardCall<T>& k, const Split& split, int64_t w, const at::Tensor& dx_hat,
                           double* dalpha) {
  const int64_t C = k.weight.size(0);
  WorkerBuffers<T> wb(k, split.max_chunk(w, C));
  if (k.need_x) wb.dxw = w == 0 ? dx_hat : at::zeros(dx_hat.sizes(), k.opt);
  const auto range = split.classes(w, C);
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
    const at::Tensor& lse_in, bool normalize_weight, const Margin& margin, int64_t ignore_index, double s,
    double eps, bool need_x, bool need_weight, bool need_bias, bool need_alpha) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = x.size(0), C = weight.size(0), D = x.size(1);
  const auto opt = x.options().dtype(ct);

  // outputs: in each input's dtype, contiguous; an empty tensor for each one not asked for
  const at::ScalarType bias_dt = bias.has_value() ? bias->scalar_type() : x.scalar_type();
  at::Tensor gx = need_x ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = need_weight ? at::empty({C, D}, weight.options()) : at::empty({0}, weight.options());
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
  at::Tensor lse = lse_in.to(ct).contiguous();
  const bool gw_direct = weight.scalar_type() == ct;  // gw is contiguous: dW rows are written in place
  const BackwardCall<T> k{weight, bias, x_hat, opt, normalize_weight, eps, need_x, need_weight, need_bias, need_alpha,
                          T(alpha_value(alpha)), &margin, tcol.data_ptr<int64_t>(), lse.data_ptr<T>(), &rows, gw,
                          gb, gw_direct};

  const Split split(B, C, D, sizeof(T));
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
    const at::Tensor& target, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& aux, bool normalize_weight, c10::string_view margin_type, double margin, int64_t ignore_index,
    double label_smoothing, double eps, bool need_x, bool need_weight, bool need_bias, bool need_alpha) {
  check_inputs(x, weight, target, alpha, bias);
  const int64_t B = x.size(0);
  TORCH_CHECK(grad_loss.numel() == B && grad_lse.numel() == B && lse.numel() == B,
              "l2sm::cpu_backward: grad_loss, grad_lse and lse must have B = ", B, " elements");
  TORCH_CHECK(!need_bias || bias.has_value(), "l2sm::cpu_backward: need_bias without a bias");
  const KernelGuard guard;
  const Margin mg(std::string(margin_type), margin);
  if (compute_type(x, weight, bias) == at::kDouble) {
    return backward_impl<double>(grad_loss, grad_lse, x, weight, target, alpha, bias, lse, normalize_weight, mg,
                                 ignore_index, label_smoothing, eps, need_x, need_weight, need_bias, need_alpha);
  }
  return backward_impl<float>(grad_loss, grad_lse, x, weight, target, alpha, bias, lse, normalize_weight, mg,
                              ignore_index, label_smoothing, eps, need_x, need_weight, need_bias, need_alpha);
}

}  // namespace l2sm_cpu
