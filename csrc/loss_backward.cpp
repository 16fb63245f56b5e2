// The backward of backend "cpu" (loss.h has the overview; chunking.h the chunks and threads).
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

// dz_ij = w_p p_ij - w_k - [j = y_i] w_t (ops.py), p = exp(z - lse);
// dC'_ij = alpha dz_ij f'(c_ij) / max(|W_j|, eps) (dloss/dc, pre-scaled by W's inverse norm so that
// dC' W = dC W_hat and dC'^T X_hat = dW_hat / |W|, see backward()).
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
        const T dz = (wp * p - wk) - a.w_t[i];  // p - 1 formed in T (fp32 at least): RELIABILITY 12
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
// backward
// ---------------------------------------------------------------------------------------------
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

  // per-row weights of the softmax and target terms (ops.py): w_t = grad_loss (0 on ignored rows,
  // NaN on rows with an out-of-range target: never a plausible gradient), w_p = w_t + grad_lse.
  at::Tensor gl = grad_loss.to(ct).contiguous(), gs = grad_lse.to(ct).contiguous(), lse = lse_in.to(ct).contiguous();
  std::vector<T> w_p(B), w_k(B), w_t(B);
  {
    const T* glp = gl.data_ptr<T>();
    const T* gsp = gs.data_ptr<T>();
    const bool* vp = valid.data_ptr<bool>();
    const bool* bdp = bad.data_ptr<bool>();
    for (int64_t i = 0; i < B; ++i) {
      T wt = vp[i] ? glp[i] : T(0);
      if (bdp[i]) wt = std::numeric_limits<T>::quiet_NaN();
      w_p[i] = wt + gsp[i];
      w_k[i] = wt * T(s / double(C));
      w_t[i] = wt * T(1.0 - s);
    }
  }

  const bool need_dc = need_x || need_weight;
  const T al = T(alpha_value(alpha));
  const bool gw_direct = weight.scalar_type() == ct;  // gw is contiguous: dW rows are written in place
  const Split split(B, C, D, sizeof(T));
  const int64_t nw = split.workers;
  // per worker: dX_hat partial sums (worker 0 accumulates into dx_hat itself) and d alpha
  at::Tensor dx_hat = need_x ? at::zeros({B, D}, opt) : at::Tensor();
  std::vector<at::Tensor> dx_part(nw);
  std::vector<double> dalpha(nw, 0.0);

  split.run([&](int64_t w) {
    const int64_t wc_max = split.max_chunk(w, C);
    ChunkBuffers<T> buf(weight, B, D, wc_max, opt);
    at::Tensor gbuf = (need_weight && !gw_direct) ? at::empty({wc_max, D}, opt) : at::Tensor();
    // per-column sums over the B rows, in double: db, and sum_i dz_ij g_ij of d alpha
    const auto opt64 = opt.dtype(at::kDouble);
    at::Tensor db = at::empty({wc_max}, opt64), da = at::empty({wc_max}, opt64);
    at::Tensor dxw;
    if (need_x) dxw = w == 0 ? dx_hat : at::zeros({B, D}, opt);
    dx_part[w] = dxw;
    const auto range = split.classes(w, C);
    for (int64_t c0 = range.first; c0 < range.second; c0 += split.chunk) {
      const int64_t cc = std::min(split.chunk, range.second - c0);
      at::Tensor Lv;
      at::Tensor wc = buf.load(weight, bias, x_hat, normalize_weight, eps, c0, cc, &Lv);  // recompute
      double* dbp = db.data_ptr<double>();
      double* dap = da.data_ptr<double>();
      std::fill(dbp, dbp + cc, 0.0);
      std::fill(dap, dap + cc, 0.0);
      const T* inv = buf.inv_wn.template data_ptr<T>();
      BwdArgs<T> a{Lv.data_ptr<T>(), B, cc, c0, inv, buf.bbuf.template data_ptr<T>(), al, tcol.data_ptr<int64_t>(),
                   &margin, lse.data_ptr<T>(), w_p.data(), w_k.data(), w_t.data(), dbp, dap};
      at::parallel_for(0, cc, 256, [&](int64_t j0, int64_t j1) {
        backward_cols(a, j0, j1, need_dc, need_bias, need_alpha);
      });
      if (need_bias) gb.narrow(0, c0, cc).copy_(db.narrow(0, 0, cc));
      if (need_alpha) {
        for (int64_t j = 0; j < cc; ++j) dalpha[w] += dap[j];  // z = alpha g + b: dalpha = sum dz g
      }
      if (need_x) dxw.addmm_(Lv, wc);  // dX_hat += dC' W_c  (= dC W_hat_c)
      if (need_weight) {
        // G = dC'^T X_hat = dW_hat / max(|W|, eps) row-wise; the normalization backward of W is then
        // dW = G - W_hat (W_hat . G) where |W_j| >= eps, and G (= dW_hat / eps) where |W_j| < eps.
        at::Tensor g = gw_direct ? gw.narrow(0, c0, cc) : gbuf.narrow(0, 0, cc);
        at::mm_out(g, Lv.t(), x_hat);
        if (normalize_weight) {
          T* gp = g.data_ptr<T>();
          const T* wp = wc.data_ptr<T>();
          const T* nrm = buf.wnorm.template data_ptr<T>();
          at::parallel_for(0, cc, 64, [&](int64_t r0, int64_t r1) {
            for (int64_t j = r0; j < r1; ++j) {
              if (!(nrm[j] >= T(eps))) continue;
              T* gr = gp + j * D;
              const T* wr = wp + j * D;
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
        if (!gw_direct) gw.narrow(0, c0, cc).copy_(g);
      }
    }
  });
  if (need_x) {
    for (int64_t w = 1; w < nw; ++w) dx_hat.add_(dx_part[w]);  // worker order: deterministic
  }

  if (need_x) {
    T* gp = dx_hat.data_ptr<T>();
    const T* hp = x_hat.data_ptr<T>();
    const T* np = x_norm.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) { normalize_rows_backward<T>(gp, hp, np, r0, r1, D, eps); });
    gx.copy_(dx_hat);
  }
  if (need_alpha) {
    double total = 0.0;
    for (int64_t w = 0; w < nw; ++w) total += dalpha[w];
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
