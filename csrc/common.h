// Shared helpers of the C++ CPU kernels (loss.h has the overview): the float32 exp, the target-column
// margin (the per-row margin table rounded to the compute dtype), the sub-center maximum, row
// normalization and its backward, and the checks and set-up that the forward and the backward share.
//
// Numerics: everything is computed in the compute dtype T (float64 if any of x, W, b is float64,
// else float32; fp16 / bf16 inputs are converted a chunk at a time). Accumulated in double: the
// norms, the per-row sums of exponentials (the non-target columns apart from the target's logit, so
// that a confident row's loss and 1 - p_y keep their relative precision; loss_forward.cpp), the sums
// of logits (label smoothing), and the sums over the B rows of the bias gradient and of the alpha
// gradient's per-class terms (and their sum over the classes). The BLAS products (logits, dX, dW)
// accumulate in T, as plain torch's do. Every output element is computed in a fixed order that
// depends only on the chunk size and the number of threads: results are bitwise reproducible.
//
// Everything here is inline (or a template) in namespace l2sm_cpu: one definition shared by every
// translation unit. The multiversioned hot loops (L2SM_CLONES) are defined in the .cpp files only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// Hot loops are compiled for AVX-512 and AVX2 as well as the baseline and picked at load time
// (GCC function multiversioning); the loops are written so that GCC vectorizes them. Only on
// non-inline functions of a .cpp file: target_clones on inline / header functions is not reliable.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(L2SM_NO_CLONES)
#define L2SM_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define L2SM_CLONES
#endif
#if defined(__GNUC__)
#define L2SM_INLINE inline __attribute__((always_inline))
#else
#define L2SM_INLINE inline
#endif

namespace l2sm_cpu {

constexpr double kArcfaceClamp = 1e-7;  // l2sm_kernels/options.py: ARCFACE_CLAMP

// ---------------------------------------------------------------------------------------------
// exp: float32 in vectorizable plain C++ (Cephes' expf polynomial); float64 through std::exp
// (gradcheck precision, speed does not matter there). Accuracy: at most 0.992 ulp over every float
// input in [-110, 90] with a normal result (swept exhaustively against a double exp, GCC 12, baseline
// and x86-64-v4 code alike). That needs setup.py's -ffp-contract=off: with a * b + c contracted to
// FMAs in the AVX2 / AVX-512 clones it reaches 1.023 ulp (tests/test_cpu_backend.py checks such points).
// Always inline: each caller (a clone for one target) gets its own copy, compiled for its target.
// ---------------------------------------------------------------------------------------------
L2SM_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

L2SM_INLINE float exp_f32(float x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in a
  // hi part exact in n * hi and a lo correction). x is first clamped to [-104, 88.8] (NaN -> -104,
  // restored at the end): exp(-104) rounds to 0, exp(88.8) overflows to inf, so -inf -> 0 and
  // +inf -> inf come out of the same arithmetic. 2^n is applied in two halves so that results in
  // the subnormal range are rounded, not flushed, and n = 128 overflows to inf correctly.
  float xc = x > -104.0f ? x : -104.0f;
  xc = xc < 88.8f ? xc : 88.8f;
  // round to nearest by the 1.5 * 2^23 trick (exact for |v| < 2^22; vectorizes without SSE4.1)
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);  // in [-150, 128]
  int32_t n1 = ni >> 1, n2 = ni - n1;    // each in [-75, 64]: a normal power of two
  y = y * bits_to_float((n1 + 127) << 23) * bits_to_float((n2 + 127) << 23);
  return x != x ? x : y;
}

template <typename T>
L2SM_INLINE T vexp(T x);
template <>
L2SM_INLINE float vexp<float>(float x) {
  return exp_f32(x);
}
template <>
L2SM_INLINE double vexp<double>(double x) {
  return std::exp(x);
}

// ---------------------------------------------------------------------------------------------
// the target-column margin f(c) and f'(c) (backends/eager.py: margin_value_and_slope), from the
// per-row margin table of l2sm_kernels/margins.py
// ---------------------------------------------------------------------------------------------
enum MarginKind { kNone = 0, kAdditive = 1, kAngular = 2 };

// The table's columns (margins.MARGIN_COLUMNS): cos m2, sin m2, threshold, m2 sin m2 + m3, m3.
constexpr int64_t kMarginColumns = 5;

// The margin of one call in the compute dtype T: the (R, 5) float64 table read once on the host and
// each value rounded to T once (as eager's table.to(dtype)), so that the switch c > th compares two
// values of T exactly as eager and the reference expect (tests/test_margins.py: one ulp either side
// of the switch point). R = 1: every row uses row 0; R = B: row i uses row i.
template <typename T>
struct Margins {
  int kind = kNone;
  bool detached = false;
  int64_t rows = 0;
  std::vector<T> cos_m, sin_m, th, offset, m3;  // (R) each

  Margins(c10::string_view kind_name, bool detached_, const c10::optional<at::Tensor>& table, int64_t B)
      : detached(detached_) {
    const std::string name(kind_name);
    if (name == "none") {
      kind = kNone;
    } else if (name == "additive") {
      kind = kAdditive;
    } else if (name == "angular") {
      kind = kAngular;
    } else {
      TORCH_CHECK(false, "l2sm::cpu: margin_kind must be 'none', 'additive' or 'angular', got '", name, "'");
    }
    if (kind == kNone) return;  // a table, if any, has no effect (as in eager)
    TORCH_CHECK(table.has_value(), "l2sm::cpu: margin_kind '", name,
                "' needs the margins table (l2sm_kernels.margins.margin_table), got None");
    const at::Tensor& t = *table;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 2 &&
                    t.size(1) == kMarginColumns && (t.size(0) == 1 || t.size(0) == B),
                "l2sm::cpu: margins must be a float64 CPU tensor of shape (1, 5) or (", B,
                ", 5) (l2sm_kernels.margins.margin_table), got ", t.scalar_type(), " of shape ", t.sizes(),
                " on ", t.device());
    rows = t.size(0);
    const at::Tensor tc = t.contiguous();
    const double* p = tc.data_ptr<double>();
    for (std::vector<T>* v : {&cos_m, &sin_m, &th, &offset, &m3}) v->resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const double* q = p + r * kMarginColumns;
      cos_m[r] = T(q[0]);
      sin_m[r] = T(q[1]);
      th[r] = T(q[2]);
      offset[r] = T(q[3]);
      m3[r] = T(q[4]);
    }
  }

  // f(c) and f'(c) of row i's target cosine c; each step rounds in T in eager's order (no FMA:
  // setup.py's -ffp-contract=off).
  L2SM_INLINE void apply(int64_t i, T c, T& f, T& slope) const {
    slope = T(1);
    if (kind == kNone) {
      f = c;
      return;
    }
    const int64_t r = rows == 1 ? 0 : i;
    if (kind == kAdditive) {
      f = c - m3[r];  // c - m3 (cosface)
      return;
    }
    // angular: cos(theta + m2) - m3 = c~ cos m2 - sin(theta) sin m2 - m3, sin(theta) = sqrt(1 - c~^2);
    // d/dc = cos m2 + c~ sin m2 / sin(theta), both at the clamped c~ (the clamp keeps sin(theta) > 0
    // at c = +-1). Where c <= th (arccos(c) + m2 >= pi; th = +inf where m2 = 0, -inf where m2 < 0)
    // the monotonic fallback c - (m2 sin m2 + m3), slope 1 (docs/design.md, "The margins").
    if (c > th[r]) {
      const T lo = T(-1 + kArcfaceClamp), hi = T(1 - kArcfaceClamp);
      const T cc = c < lo ? lo : (c > hi ? hi : c);
      const T sin_t = std::sqrt(T(1) - cc * cc);
      f = cc * cos_m[r] - sin_t * sin_m[r] - m3[r];
      if (!detached) slope = cos_m[r] + cc * sin_m[r] / sin_t;
    } else {
      f = c - offset[r];
    }
  }
};

// The non-target transform (docs/design.md, "The non-target transforms"): on row i's columns j != y_i
// with c_ij > thr_i ("hard"), N(c) replaces c before the scale alpha:
//     mv          t c + t - 1   slope t        (MV-Softmax)
//     curricular  c (t + c)     slope t + 2c   (CurricularFace)
//     filter      0             slope 0        (InsightFace's inter-class filtering)
// The mask is a constant and t has no gradient. thr_i is the table's threshold (l2sm_kernels/margins.py:
// negatives_table, [t, threshold] per row, R = 1 or B), or where that is NaN the row's margined target
// cosine f_i = f(c_iy), computed before the class pass from the target's precise cosine; +inf on a row
// without a valid target (no hard column). Per-row t and thr are rounded to T once.
enum NegativesKind { kNegNone = 0, kNegMv = 1, kNegCurricular = 2, kNegFilter = 3 };

template <typename T>
struct Negatives {
  int kind = kNegNone;
  std::vector<T> t, thr;  // (B) each, when kind != kNegNone

  // tcol: (B) target class or -1; c_t: (B) the target's cosine (target_cosines); margins: its f.
  Negatives(c10::string_view kind_name, const c10::optional<at::Tensor>& table, int64_t B, const int64_t* tcol,
            const T* c_t, const Margins<T>& margins) {
    const std::string name(kind_name);
    if (name == "none") {
      kind = kNegNone;
    } else if (name == "mv") {
      kind = kNegMv;
    } else if (name == "curricular") {
      kind = kNegCurricular;
    } else if (name == "filter") {
      kind = kNegFilter;
    } else {
      TORCH_CHECK(false, "l2sm::cpu: negatives must be 'none', 'mv', 'curricular' or 'filter', got '", name, "'");
    }
    if (kind == kNegNone) return;
    TORCH_CHECK(table.has_value(), "l2sm::cpu: negatives '", name,
                "' needs the negatives table (l2sm_kernels.margins.negatives_table), got None");
    const at::Tensor& tb = *table;
    TORCH_CHECK(tb.device().is_cpu() && tb.scalar_type() == at::kDouble && tb.dim() == 2 && tb.size(1) == 2 &&
                    (tb.size(0) == 1 || tb.size(0) == B),
                "l2sm::cpu: negatives_table must be a float64 CPU tensor of shape (1, 2) or (", B,
                ", 2) (l2sm_kernels.margins.negatives_table), got ", tb.scalar_type(), " of shape ", tb.sizes(),
                " on ", tb.device());
    const at::Tensor tc = tb.contiguous();
    const double* p = tc.data_ptr<double>();
    const int64_t R = tb.size(0);
    t.resize(B);
    thr.resize(B);
    for (int64_t i = 0; i < B; ++i) {
      const double* q = p + (R == 1 ? 0 : i) * 2;
      t[i] = T(q[0]);
      if (!std::isnan(q[1])) {
        thr[i] = T(q[1]);
      } else if (tcol[i] >= 0) {
        T f, slope;
        margins.apply(i, c_t[i], f, slope);
        thr[i] = f;
      } else {
        thr[i] = std::numeric_limits<T>::infinity();
      }
    }
  }
  bool on() const { return kind != kNegNone; }
};

// N(c) of a non-target column and its slope (see Negatives); branch-free selects for the simd loops.
template <typename T>
L2SM_INLINE T negative_value(int kind, T c, T thr, T t, T* slope) {
  const bool hard = c > thr;
  T v = T(0), s = T(0);  // filter
  if (kind == kNegMv) {
    v = t * c + t - T(1);
    s = t;
  } else if (kind == kNegCurricular) {
    v = c * (t + c);
    s = t + T(2) * c;
  }
  *slope = hard ? s : T(1);
  return hard ? v : c;
}

// The label smoothing s: None (0) or a 0-d floating CPU tensor, read on the host (a CPU scalar: no
// device synchronization). Used in double.
inline double smoothing_value(const c10::optional<at::Tensor>& s) {
  if (!s.has_value()) return 0.0;
  TORCH_CHECK(s->dim() == 0 && at::isFloatingType(s->scalar_type()) && s->device().is_cpu(),
              "l2sm::cpu: label_smoothing must be None or a 0-d floating CPU tensor, got ", s->scalar_type(),
              " of shape ", s->sizes(), " on ", s->device());
  return s->to(at::kDouble).item<double>();
}

// The class cosine of K sub-centers: max_k cos[k] inv[k] (cos: the unscaled products x_hat . W_k,
// inv: 1 / max(|W_k|, eps)), ties to the lowest k, NaN wins (as torch.max: the first NaN).
// *win: the winning k. Branch-free selects (the comparisons of random cosines would mispredict
// half the time); the NaN case takes a second, rare pass.
template <typename T>
L2SM_INLINE T class_max(const T* cos, const T* inv, int64_t K, int64_t* win) {
  T best = cos[0] * inv[0];
  int64_t w = 0;
  bool nan = best != best;
  for (int64_t k = 1; k < K; ++k) {
    const T v = cos[k] * inv[k];
    const bool gt = v > best;  // strict: a tie keeps the lower k
    best = gt ? v : best;
    w = gt ? k : w;
    nan |= v != v;
  }
  if (nan) {
    for (int64_t k = 0; k < K; ++k) {
      const T v = cos[k] * inv[k];
      if (v != v) {
        best = v;
        w = k;
        break;
      }
    }
  }
  *win = w;
  return best;
}

// ---------------------------------------------------------------------------------------------
// row and column normalization helpers
// ---------------------------------------------------------------------------------------------
// out_j = v_j / max(|v_j|, eps), norm_j = |v_j| (accumulated in double), for rows [r0, r1) of a
// contiguous (n x D) matrix; inv_j = 1 / max(|v_j|, eps) when inv != nullptr.
template <typename T>
void normalize_rows(const T* v, T* out, T* norm, T* inv, int64_t r0, int64_t r1, int64_t D, double eps) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = v + i * D;  // int64 offsets: n * D may exceed 2^31
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < D; ++k) acc += double(row[k]) * double(row[k]);
    T n = T(std::sqrt(acc));
    if (norm) norm[i] = n;
    T den = std::max<T>(n, T(eps));
    if (inv) inv[i] = T(1) / den;
    if (out) {
      T* o = out + i * D;
      for (int64_t k = 0; k < D; ++k) o[k] = row[k] / den;
    }
  }
}

// d/dv of v_hat = v / max(|v|, eps) applied to rows [r0, r1) of g in place (backends/eager.py: normalize_rows_backward):
// |v| >= eps: (g - v_hat (v_hat . g)) / |v|;  |v| < eps: g / eps.
template <typename T>
void normalize_rows_backward(T* g, const T* v_hat, const T* norm, int64_t r0, int64_t r1, int64_t D, double eps) {
  for (int64_t i = r0; i < r1; ++i) {
    T* gr = g + i * D;
    const T* vr = v_hat + i * D;
    if (norm[i] >= T(eps)) {
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < D; ++k) acc += double(vr[k]) * double(gr[k]);
      const T proj = T(acc), n = norm[i];
      for (int64_t k = 0; k < D; ++k) gr[k] = (gr[k] - vr[k] * proj) / n;
    } else {
      for (int64_t k = 0; k < D; ++k) gr[k] = gr[k] / T(eps);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// shared set-up
// ---------------------------------------------------------------------------------------------
inline at::ScalarType compute_type(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  bool f64 = x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble ||
             (bias.has_value() && bias->scalar_type() == at::kDouble);
  return f64 ? at::kDouble : at::kFloat;
}

// Checks the tensors and K; -> C, the number of classes (weight has C K rows: rows [jK, jK + K) are
// class j's sub-centers).
inline int64_t check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                            const at::Tensor& alpha, const c10::optional<at::Tensor>& bias, int64_t K) {
  TORCH_CHECK(x.dim() == 2, "l2sm::cpu: x must be 2-D (B, D), got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "l2sm::cpu: weight must be (C K, ", x.size(1), "), got ",
              w.sizes());
  TORCH_CHECK(K >= 1, "l2sm::cpu: subcenters must be >= 1, got ", K);
  TORCH_CHECK(w.size(0) % K == 0, "l2sm::cpu: weight has ", w.size(0), " rows, not a multiple of subcenters = ", K);
  const int64_t C = w.size(0) / K;
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), "l2sm::cpu: target must be (", x.size(0),
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "l2sm::cpu: target must be int64, got ", target.scalar_type());
  // 0-d exactly: grad_alpha is 0-d, like the fake kernel's empty_like(alpha)
  TORCH_CHECK(alpha.dim() == 0 && at::isFloatingType(alpha.scalar_type()),
              "l2sm::cpu: alpha must be a 0-d floating tensor, got shape ", alpha.sizes(), " and dtype ",
              alpha.scalar_type());
  for (const at::Tensor* t : {&x, &w}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "l2sm::cpu: x and weight must be floating, got ",
                t->scalar_type());
  }
  for (const at::Tensor* t : {&x, &w, &target, &alpha}) {
    TORCH_CHECK(t->device().is_cpu(), "l2sm::cpu: all tensors must be CPU tensors, got one on ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "l2sm::cpu: bias must be (", C, ",) (one per class), got ",
                bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->device().is_cpu(),
                "l2sm::cpu: bias must be a floating CPU tensor");
  }
  return C;
}

// The row's target class where it has a valid one (not ignore_index, inside [0, C)), else -1;
// rows with an out-of-range target are never read at their target and get NaN.
inline at::Tensor target_columns(const at::Tensor& target, int64_t C, int64_t ignore_index, at::Tensor* valid,
                                 at::Tensor* bad) {
  at::Tensor t = target.contiguous();
  const int64_t B = t.size(0);
  at::Tensor tcol = at::empty({B}, t.options());
  *valid = at::empty({B}, t.options().dtype(at::kBool));
  *bad = at::empty({B}, t.options().dtype(at::kBool));
  const int64_t* tp = t.data_ptr<int64_t>();
  int64_t* cp = tcol.data_ptr<int64_t>();
  bool* vp = valid->data_ptr<bool>();
  bool* bp = bad->data_ptr<bool>();
  for (int64_t i = 0; i < B; ++i) {
    const bool v = tp[i] != ignore_index;
    const bool in_range = tp[i] >= 0 && tp[i] < C;
    vp[i] = v;
    bp[i] = v && !in_range;
    cp[i] = (v && in_range) ? tp[i] : -1;
  }
  return tcol;
}

// The target class's cosine of each row with a valid target, computed in double from x and W as
// stored (any dtype and strides): c = (x . W_r / max(|x|, eps)) / max(|W_r|, eps) (W's norm only with
// normalize_weight), the max over the class's K sub-centers (ties to the lowest, NaN wins, as
// class_max), rounded to T once; *win: the winning sub-center (0 where the row has no target).
// The chunk's BLAS value of the same cosine carries the rounding of x_hat, of the dot product in T
// and of 1/|W_r|: a few ulps, which the angular margin amplifies in the target's gradient (f' has
// slope ~ sin m2 / sin^3(theta): ~1e4 near c = -1 with m2 < 0, tests/test_margins.py's fallback
// region). Here the target's c is within half an ulp of the exact one, which the forward and the
// backward both use (the other columns keep the BLAS values). O(B K D) work in all.
template <typename T>
void target_cosines(const at::Tensor& x, const at::Tensor& w, const int64_t* tcol, int64_t K, bool normalize_weight,
                    double eps, T* c_t, int64_t* win) {
  const int64_t B = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2sm_cpu_target_x", [&] {
    using SX = scalar_t;
    const SX* xp = x.data_ptr<SX>();
    const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "l2sm_cpu_target_w", [&] {
      using SW = scalar_t;
      const SW* wp = w.data_ptr<SW>();
      const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
      at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          c_t[i] = T(0);
          win[i] = 0;
          if (tcol[i] < 0) continue;
          const SX* xr = xp + i * xs0;
          double xx = 0.0;
          for (int64_t k = 0; k < D; ++k) {
            const double a = static_cast<double>(xr[k * xs1]);
            xx += a * a;
          }
          const double xn = std::max(std::sqrt(xx), eps);
          double best = 0.0;
          for (int64_t s = 0; s < K; ++s) {
            const SW* wr = wp + (tcol[i] * K + s) * ws0;
            double dot = 0.0, ww = 0.0;
            for (int64_t k = 0; k < D; ++k) {
              const double a = static_cast<double>(xr[k * xs1]), b = static_cast<double>(wr[k * ws1]);
              dot += a * b;
              ww += b * b;
            }
            double c = dot / xn;
            if (normalize_weight) c /= std::max(std::sqrt(ww), eps);
            if (s == 0 || (!(c <= best) && best == best)) {
              best = c;
              win[i] = s;
            }
          }
          c_t[i] = T(best);
        }
      });
    });
  });
}

// x_hat (B x D, contiguous, T) and |x| (B) of the features.
template <typename T>
void normalized_features(const at::Tensor& x, double eps, at::Tensor* x_hat, at::Tensor* x_norm) {
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor xc = x.to(c10::CppTypeToScalarType<T>::value).contiguous();
  *x_hat = at::empty({B, D}, xc.options());
  *x_norm = at::empty({B}, xc.options());
  const T* xp = xc.data_ptr<T>();
  T* hp = x_hat->data_ptr<T>();
  T* np = x_norm->data_ptr<T>();
  at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) { normalize_rows<T>(xp, hp, np, nullptr, r0, r1, D, eps); });
}

// a CPU scalar: no device sync
inline double alpha_value(const at::Tensor& alpha) { return alpha.to(at::kDouble).item<double>(); }

// The kernels' own ATen calls (views of the inputs, BLAS into workspace and outputs) run below
// autograd (the op's autograd formula is registered from Python) and without autocast (the inputs'
// dtypes are taken as given; an autocast mm would round the fp32 logits to bf16).
struct KernelGuard {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

}  // namespace l2sm_cpu
