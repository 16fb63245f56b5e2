// The forward of backend "cpu" (loss.h has the overview; chunking.h the chunks and threads).
//
// Per chunk: the BLAS product gives the chunk's cosines, then the epilogue (forward_rows) turns them
// into logits z = alpha f(c) + b in place and folds them into per-row statistics of the worker: an
// online logsumexp (running max, rescaled sum of exponentials in double), the sum of the logits
// (label smoothing) and z at the target. After the walk the workers' statistics are combined in
// worker order into lse and the loss. aux is empty: the backward recomputes the logits from lse.
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
  T* L;              // (B x cc) chunk of cosines x_hat . W_j (unscaled by 1/|W_j|); overwritten with z
  int64_t cc, c0;    // chunk width, first class of the chunk
  const T* inv_wn;   // (cc) 1 / max(|W_j|, eps), or all ones without normalize_weight
  const T* bias;     // (cc) bias of the chunk, or zeros
  T alpha;
  const int64_t* tcol;  // (B) the row's target class, or -1 where the row has no valid target
  const Margin* margin;
  bool smoothing;
  T* row_max;          // (B) running max of z
  double* row_sum;     // (B) sum_j exp(z_ij - shift(row_max)), shift(m) = m if finite else 0
  double* row_zsum;    // (B) sum_j z_ij (label smoothing)
  T* row_zt;           // (B) z at the target column
};

template <typename T>
L2SM_INLINE void forward_rows_impl(const FwdArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t cc = a.cc;
  const T* inv = a.inv_wn;
  const T* b = a.bias;
  const T al = a.alpha;
  for (int64_t i = r0; i < r1; ++i) {
    T* z = a.L + i * cc;
    const int64_t t = a.tcol[i] - a.c0;
    const bool has_t = a.tcol[i] >= 0 && t >= 0 && t < cc;
    const T c_t = has_t ? z[t] * inv[t] : T(0);
    for (int64_t j = 0; j < cc; ++j) z[j] = al * (z[j] * inv[j]) + b[j];
    if (has_t) {
      T f, slope;
      a.margin->apply(c_t, f, slope);
      z[t] = al * f + b[t];
      a.row_zt[i] = z[t];
    }
    T mc = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mc)
    for (int64_t j = 0; j < cc; ++j) mc = z[j] > mc ? z[j] : mc;
    // online logsumexp. The shift is the running max unless that is +-inf (then 0, as
    // torch.logsumexp does): an all -inf row gives lse = -inf, a +inf logit gives +inf, and NaN
    // logits reach the sum (exp(NaN) = NaN) whatever the max reduction made of them.
    const T m_old = a.row_max[i];
    const T m_new = mc > m_old ? mc : m_old;
    const T sh_old = std::isfinite(m_old) ? m_old : T(0);
    const T sh_new = std::isfinite(m_new) ? m_new : T(0);
    double sc = 0.0;
#pragma omp simd reduction(+ : sc)
    for (int64_t j = 0; j < cc; ++j) sc += double(vexp<T>(z[j] - sh_new));
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
// forward
// ---------------------------------------------------------------------------------------------
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& target, const at::Tensor& alpha,
                                                           const c10::optional<at::Tensor>& bias,
                                                           bool normalize_weight, const Margin& margin,
                                                           int64_t ignore_index, double s, double eps) {
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t B = x.size(0), C = weight.size(0), D = x.size(1);
  const auto opt = x.options().dtype(ct);
  at::Tensor loss = at::empty({B}, opt), lse = at::empty({B}, opt), aux = at::empty({0}, opt);
  if (B == 0) return {loss, lse, aux};

  at::Tensor valid, bad;
  at::Tensor tcol = target_columns(target, C, ignore_index, &valid, &bad);
  at::Tensor x_hat, x_norm;
  normalized_features<T>(x, eps, &x_hat, &x_norm);
  const T al = T(alpha_value(alpha));
  const Split split(B, C, D, sizeof(T));
  const int64_t nw = split.workers;

  // per worker and row: running max, rescaled sum of exponentials, sum of logits; z at the target
  // (each row's target lies in one worker's range: written once)
  std::vector<T> row_max(nw * B, -std::numeric_limits<T>::infinity()), row_zt(B, T(0));
  std::vector<double> row_sum(nw * B, 0.0), row_zsum(nw * B, 0.0);

  split.run([&](int64_t w) {
    ChunkBuffers<T> buf(weight, B, D, split.max_chunk(w, C), opt);
    const auto range = split.classes(w, C);
    for (int64_t c0 = range.first; c0 < range.second; c0 += split.chunk) {
      const int64_t cc = std::min(split.chunk, range.second - c0);
      at::Tensor Lv;
      buf.load(weight, bias, x_hat, normalize_weight, eps, c0, cc, &Lv);
      FwdArgs<T> a{Lv.data_ptr<T>(), cc, c0, buf.inv_wn.template data_ptr<T>(), buf.bbuf.template data_ptr<T>(), al,
                   tcol.data_ptr<int64_t>(), &margin, s > 0, row_max.data() + w * B, row_sum.data() + w * B,
                   row_zsum.data() + w * B, row_zt.data()};
      at::parallel_for(0, B, 8, [&](int64_t r0, int64_t r1) { forward_rows(a, r0, r1); });
    }
  });

  // lse_i = shift + log(sum_w s_w exp(shift_w - shift)), shift = max over workers (0 when infinite);
  // loss_i = (1 - s)(lse_i - z_iy) + s (lse_i - mean_j z_ij); 0 on ignored rows, NaN on rows whose
  // target is out of range.
  T* lp = loss.data_ptr<T>();
  T* sp = lse.data_ptr<T>();
  const bool* vp = valid.data_ptr<bool>();
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
    sp[i] = T(sh + std::log(sum));
    double li = (1.0 - s) * (double(sp[i]) - double(row_zt[i]));
    if (s > 0) li += s * (double(sp[i]) - zsum / double(C));
    lp[i] = bdp[i] ? std::numeric_limits<T>::quiet_NaN() : (vp[i] ? T(li) : T(0));
  }
  return {loss, lse, aux};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& bias, bool normalize_weight, c10::string_view margin_type, double margin,
    int64_t ignore_index, double label_smoothing, double eps, bool need_x, bool need_weight, bool need_bias,
    bool need_alpha) {
  // need_* are hints for aux; this backend's aux is empty (the backward recomputes from lse)
  check_inputs(x, weight, target, alpha, bias);
  const KernelGuard guard;
  const Margin mg(std::string(margin_type), margin);
  if (compute_type(x, weight, bias) == at::kDouble) {
    return forward_impl<double>(x, weight, target, alpha, bias, normalize_weight, mg, ignore_index,
                                label_smoothing, eps);
  }
  return forward_impl<float>(x, weight, target, alpha, bias, normalize_weight, mg, ignore_index, label_smoothing,
                             eps);
}

}  // namespace l2sm_cpu
