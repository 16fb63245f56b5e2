// The forward of backend "cpu" (loss.h has the overview; chunking.h the chunks and threads).
//
// Per chunk: the BLAS product gives the chunk's products x_hat . W_r (B x cc K), then the epilogue
// (forward_rows) turns each row's segment into the cc class logits z = alpha g + b in place (g: the
// class cosine, the maximum over its K sub-centers, through the non-target transform N when one is
// set (common.h, Negatives: its per-row threshold is known before the walk); on the target column
// f(c) of the target's cosine
// computed in double beforehand, common.h: target_cosines) and folds them into
// per-row statistics of the worker: an online logsumexp of the NON-target logits (running max of
// all logits, rescaled sum of the non-target exponentials in double), the sum of the logits (label
// smoothing) and z at the target. After the walk the workers' statistics are combined in worker
// order into lse, the loss and aux.
//
// Confident rows. The target's logit is kept apart from the sum of the others, so that
// lse_nt = logsumexp_{j != y} z_j and z_y meet only in (all in double, d = lse_nt - z_y,
// v = exp(-|d|) in [0, 1]):
//     lse     = max(lse_nt, z_y) + log1p(v)
//     loss_t  = lse - z_y = log1p(v)  (d <= 0: the target leads)   or   d + log1p(v)  (d > 0)
//     q       = 1 - p_y   = v / (1 + v)                                 or   1 / (1 + v)
// No two large numbers cancel: for a row with 1 - p_y = 1e-13 the loss (about q) keeps the relative
// precision of the non-target exponentials (an fp32 exp each, <= 1 ulp) instead of being the
// difference of two rounded logsumexps (0 in fp32; a relative error of 1e-2 in fp64). Rows without a
// target sum every column; non-finite logits take the plain lse - z_y (NaN / inf as F.cross_entropy).
//
// aux (B + R C K,) in the compute dtype: first q_i = 1 - p_iy of each row with a target (0 elsewhere).
// The backward forms the target column's dz from it (dz_y = grad_lse p_y - grad_loss q + ...) instead
// of p_y - 1, which cancels: the backward's own p_y = exp(z_y - lse) sees lse rounded to T. Then the
// memory dial's kept products (chunking.h, kept_rows): the (R, C K) block of x_hat . W_r of the first R
// rows, R = 0 when max_logits_bytes allows no row or no gradient is asked for (then aux is (B,)).
// Returning the block as part of the op's output is what lets autograd save it for the backward; its
// size is a function of the metadata and the budget, which the fake kernel (cpu.py: aux_meta) mirrors.
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
// forward epilogue: rows [r0, r1) of one chunk
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
  T* L;              // (B x cc K) products x_hat . W_r (unscaled by 1/|W_r|); row i's first cc values
                     // are overwritten with its class logits z
  int64_t cc, c0, K;  // chunk width in classes, first class of the chunk, sub-centers per class
  const T* inv_wn;   // (cc K) 1 / max(|W_r|, eps), or all ones without normalize_weight
  const T* bias;     // (cc) bias of the chunk's classes, or zeros
  T alpha;
  const int64_t* tcol;  // (B) the row's target class, or -1 where the row has no valid target
  const T* c_t;         // (B) the target class's cosine (common.h: target_cosines)
  const Margins<T>* margins;
  const Negatives<T>* neg;  // the non-target transform (common.h), per-row thresholds and t
  bool smoothing;
  T* row_max;          // (B) running max of z over all columns (the target's included)
  double* row_sum;     // (B) sum_{j != y} exp(z_ij - shift(row_max)), shift(m) = m if finite else 0
  double* row_zsum;    // (B) sum_j z_ij (label smoothing)
  T* row_zt;           // (B) z at the target column
};

// sum_{j in [ja, jb)} exp(z_j - sh), each exponential in T, summed in double
template <typename T>
L2SM_INLINE double sum_exp(const T* z, int64_t ja, int64_t jb, T sh) {
  double sc = 0.0;
#pragma omp simd reduction(+ : sc)
  for (int64_t j = ja; j < jb; ++j) sc += double(vexp<T>(z[j] - sh));
  return sc;
}

template <typename T>
L2SM_INLINE void forward_rows_impl(const FwdArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t cc = a.cc, K = a.K;
  const T* inv = a.inv_wn;
  const T* b = a.bias;
  const T al = a.alpha;
  for (int64_t i = r0; i < r1; ++i) {
    T* z = a.L + i * cc * K;  // int64: B cc K may exceed 2^31
    const int64_t t = a.tcol[i] - a.c0;
    const bool has_t = a.tcol[i] >= 0 && t >= 0 && t < cc;
    if (K == 1 && !a.neg->on()) {
      for (int64_t j = 0; j < cc; ++j) z[j] = al * (z[j] * inv[j]) + b[j];
    } else if (K == 1) {
      // z = alpha N(c) + b; the target column (transformed here too) is overwritten below
      const int nk = a.neg->kind;
      const T th = a.neg->thr[i], tt = a.neg->t[i];
#pragma omp simd
      for (int64_t j = 0; j < cc; ++j) {
        T sl;
        z[j] = al * negative_value<T>(nk, z[j] * inv[j], th, tt, &sl) + b[j];
      }
    } else {
      // class j's cosine is the max of its K products z[jK .. jK + K) (each times its own inverse
      // norm); z[j] is written after those are read, and j <= jK: compaction in place. The
      // non-target transform applies to that max.
      int64_t win;
      if (a.neg->on()) {
        const int nk = a.neg->kind;
        const T th = a.neg->thr[i], tt = a.neg->t[i];
        T sl;
        for (int64_t j = 0; j < cc; ++j) {
          z[j] = al * negative_value<T>(nk, class_max(z + j * K, inv + j * K, K, &win), th, tt, &sl) + b[j];
        }
      } else {
        for (int64_t j = 0; j < cc; ++j) z[j] = al * class_max(z + j * K, inv + j * K, K, &win) + b[j];
      }
    }
    if (has_t) {
      T f, slope;
      a.margins->apply(i, a.c_t[i], f, slope);  // row i's margins, its target's precise cosine
      z[t] = al * f + b[t];
      a.row_zt[i] = z[t];
    }
    T mc = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mc)
    for (int64_t j = 0; j < cc; ++j) mc = z[j] > mc ? z[j] : mc;
    // online logsumexp of the non-target columns, shifted by the running max of all columns. The
    // shift is that max unless it is +-inf (then 0, as torch.logsumexp does): an all -inf row gives
    // lse = -inf, a +inf logit gives +inf, and NaN logits reach the sum (exp(NaN) = NaN) whatever the
    // max reduction made of them.
    const T m_old = a.row_max[i];
    const T m_new = mc > m_old ? mc : m_old;
    const T sh_old = std::isfinite(m_old) ? m_old : T(0);
    const T sh_new = std::isfinite(m_new) ? m_new : T(0);
    const double sc = has_t ? sum_exp(z, 0, t, sh_new) + sum_exp(z, t + 1, cc, sh_new) : sum_exp(z, 0, cc, sh_new);
    double s = a.row_sum[i];
    if (s != 0.0) s *= std::exp(double(sh_old) - double(sh_new));
    a.row_sum[i] = s + sc;
    a.row_max[i] = m_new;
    if (a.smoothing) {
      double zs = 0.0;
#pragma omp simd reduction(+ : zs)
      for (int64_t j = 0; j < cc; ++j) zs += double(z[j]);
      a.row_zsum[i] += zs;
    }
  }
}

L2SM_CLONES void forward_rows_f32(const FwdArgs<float>& a, int64_t r0, int64_t r1) {
  forward_rows_impl<float>(a, r0, r1);
}
void forward_rows_f64(const FwdArgs<double>& a, int64_t r0, int64_t r1) { forward_rows_impl<double>(a, r0, r1); }
inline void forward_rows(const FwdArgs<float>& a, int64_t r0, int64_t r1) { forward_rows_f32(a, r0, r1); }
inline void forward_rows(const FwdArgs<double>& a, int64_t r0, int64_t r1) { forward_rows_f64(a, r0, r1); }

// ---------------------------------------------------------------------------------------------
// one row's lse, target loss and q from its combined statistics (in double; see the file comment)
// ---------------------------------------------------------------------------------------------
struct RowResult {
  double lse, loss_t, q;
};

// sh: the shift (the row's max logit, 0 where that is infinite); sum_nt: sum_{j != y} exp(z_j - sh);
// zt: the target's logit.
inline RowResult target_row(double sh, double sum_nt, double zt) {
  const double inf = std::numeric_limits<double>::infinity();
  if (std::isfinite(zt) && sum_nt < inf) {  // sum_nt >= 0 and finite (not NaN): no +inf / NaN logit
    const double lse_nt = sum_nt > 0.0 ? sh + std::log(sum_nt) : -inf;  // -inf: no other column
    const double d = lse_nt - zt;
    const double v = std::exp(-std::fabs(d));  // in [0, 1]; 0 where d = -inf
    const double l1 = std::log1p(v);
    const bool leads = d <= 0.0;
    return {std::max(lse_nt, zt) + l1, leads ? l1 : d + l1, leads ? v / (1.0 + v) : 1.0 / (1.0 + v)};
  }
  // a non-finite logit: the plain formulas, which give F.cross_entropy's inf / NaN
  const double lse = sh + std::log(sum_nt + std::exp(zt - sh));
  return {lse, lse - zt, 1.0 - std::exp(zt - lse)};
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& target, const at::Tensor& alpha,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const c10::optional<at::Tensor>& margin_table,
                                                           double s, bool normalize_weight, c10::string_view kind,
                                                           bool detached, int64_t K, int64_t C,
                                                           int64_t ignore_index, double eps,
                                                           const c10::optional<at::Tensor>& negatives_table,
                                                           c10::string_view negatives, int64_t R) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = x.size(0), D = x.size(1);
  const auto opt = x.options().dtype(ct);
  const Margins<T> margins(kind, detached, margin_table, B);
  at::Tensor loss = at::empty({B}, opt), lse = at::empty({B}, opt), aux = at::empty({B + R * C * K}, opt);
  if (B == 0) return {loss, lse, aux};
  const at::Tensor kept = R > 0 ? aux.narrow(0, B, R * C * K).view({R, C * K}) : at::Tensor();

  at::Tensor valid, bad;
  at::Tensor tcol = target_columns(target, C, ignore_index, &valid, &bad);
  at::Tensor x_hat, x_norm;
  normalized_features<T>(x, eps, &x_hat, &x_norm);
  // bf16 x and W: the products by bf16 GEMM on x_hat rounded to bf16 (chunking.h, use_bf16_gemm)
  const at::Tensor x_lp = use_bf16_gemm(x, weight, ct) ? x_hat.to(at::kBFloat16) : at::Tensor();
  std::vector<T> c_t(B);
  std::vector<int64_t> win(B);
  target_cosines<T>(x, weight, tcol.data_ptr<int64_t>(), K, normalize_weight, eps, c_t.data(), win.data());
  const Negatives<T> neg(negatives, negatives_table, B, tcol.data_ptr<int64_t>(), c_t.data(), margins);
  const T al = T(alpha_value(alpha));
  const Split split(B, C, D, sizeof(T), K);
  const int64_t nw = split.workers;

  // per worker and row: running max, rescaled sum of the non-target exponentials, sum of logits; z at
  // the target (each row's target lies in one worker's range: written once)
  std::vector<T> row_max(nw * B, -std::numeric_limits<T>::infinity()), row_zt(B, T(0));
  std::vector<double> row_sum(nw * B, 0.0), row_zsum(nw * B, 0.0);

  split.run([&](int64_t w) {
    ChunkBuffers<T> buf(weight, B, D, split.max_chunk(w, C), K, opt, x_lp);
    const auto range = split.classes(w, C);
    for (int64_t c0 = range.first; c0 < range.second; c0 += split.chunk) {
      const int64_t cc = std::min(split.chunk, range.second - c0);
      at::Tensor Lv;
      buf.load(weight, bias, x_hat, normalize_weight, eps, c0, cc, &Lv, kept, /*reuse=*/false);
      FwdArgs<T> a{Lv.data_ptr<T>(), cc, c0, K, buf.inv_wn.template data_ptr<T>(), buf.bbuf.template data_ptr<T>(),
                   al, tcol.data_ptr<int64_t>(), c_t.data(), &margins, &neg, s != 0.0, row_max.data() + w * B,
                   row_sum.data() + w * B, row_zsum.data() + w * B, row_zt.data()};
      at::parallel_for(0, B, 8, [&](int64_t r0, int64_t r1) { forward_rows(a, r0, r1); });
    }
  });

  // per row, in double: the shift = max over workers (0 when infinite), the workers' sums rescaled to
  // it, then lse, the target term and q (target_row); loss_i = (1 - s) loss_t + s (lse_i - mean_j z_ij);
  // 0 on ignored rows, NaN on rows whose target is out of range.
  T* lp = loss.data_ptr<T>();
  T* sp = lse.data_ptr<T>();
  T* qp = aux.data_ptr<T>();
  const int64_t* tp = tcol.data_ptr<int64_t>();
  const bool* bdp = bad.data_ptr<bool>();
  for (int64_t i = 0; i < B; ++i) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t w = 0; w < nw; ++w) m = row_max[w * B + i] > m ? row_max[w * B + i] : m;
    const double sh = std::isfinite(m) ? double(m) : 0.0;
    double sum = 0.0, zsum = 0.0;
    for (int64_t w = 0; w < nw; ++w) {
      const T mw = row_max[w * B + i];
      const double sw = row_sum[w * B + i];
      if (sw != 0.0) sum += sw * std::exp((std::isfinite(mw) ? double(mw) : 0.0) - sh);
      zsum += row_zsum[w * B + i];
    }
    if (tp[i] >= 0) {
      const RowResult r = target_row(sh, sum, double(row_zt[i]));
      double li = (1.0 - s) * r.loss_t;
      if (s != 0.0) li += s * (r.lse - zsum / double(C));
      sp[i] = T(r.lse);
      lp[i] = T(li);
      qp[i] = T(r.q);
    } else {  // no valid target: every column is in the sum
      sp[i] = T(sh + std::log(sum));
      lp[i] = bdp[i] ? std::numeric_limits<T>::quiet_NaN() : T(0);  // ignored: 0
      qp[i] = T(0);
    }
  }
  return {loss, lse, aux};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& margins,
    const c10::optional<at::Tensor>& label_smoothing, const c10::optional<at::Tensor>& negatives_table,
    bool normalize_weight, c10::string_view margin_kind, bool margin_detached, int64_t subcenters,
    int64_t ignore_index, double eps, c10::string_view negatives, c10::optional<int64_t> max_logits_bytes,
    bool need_x, bool need_weight, bool need_bias, bool need_alpha) {
  // need_* are hints for aux: without any gradient to come, nothing is kept
  const int64_t C = check_inputs(x, weight, target, alpha, bias, subcenters);
  TORCH_CHECK(!max_logits_bytes.has_value() || *max_logits_bytes >= 0,
              "l2sm::cpu_forward: max_logits_bytes must be None or >= 0, got ", *max_logits_bytes);
  const KernelGuard guard;
  const double s = smoothing_value(label_smoothing);
  const bool dbl = compute_type(x, weight, bias) == at::kDouble;
  const bool any_need = need_x || need_weight || need_bias || need_alpha;
  const bool bf16_inputs = x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16;
  const int64_t R = any_need ? kept_rows(x.size(0), C, subcenters, dbl ? 8 : 4, max_logits_bytes, bf16_inputs) : 0;
  if (dbl) {
    return forward_impl<double>(x, weight, target, alpha, bias, margins, s, normalize_weight, margin_kind,
                                margin_detached, subcenters, C, ignore_index, eps, negatives_table, negatives, R);
  }
  return forward_impl<float>(x, weight, target, alpha, bias, margins, s, normalize_weight, margin_kind,
                             margin_detached, subcenters, C, ignore_index, eps, negatives_table, negatives, R);
}

}  // namespace l2sm_cpu
