// Shared helpers of the C++ CPU kernels (loss.h has the overview): the float32 exp, the target-column
// margin, row normalization and its backward, and the checks and set-up that the forward and the
// backward share.
//
// Numerics: everything is computed in the compute dtype T (float64 if any of x, W, b is float64,
// else float32; fp16 / bf16 inputs are converted a chunk at a time). Accumulated in double: the
// norms, the per-row sums of exponentials (and of logits, for label smoothing), and the sums over the
// B rows of the bias gradient and of the alpha gradient's per-class terms (and their sum over the
// classes). The BLAS products (logits, dX, dW) accumulate in T, as plain torch's do. Every output
// element is computed in a fixed order that depends only on the chunk size and the number of threads:
// results are bitwise reproducible.
//
// Everything here is inline (or a template) in namespace l2sm_cpu: one definition shared by every
// translation unit. The multiversioned hot loops (L2SM_CLONES) are defined in the .cpp files only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

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
// the target-column margin f(c) and f'(c) (backends/eager.py: margin_value_and_slope)
// ---------------------------------------------------------------------------------------------
enum MarginType { kNone = 0, kCosface = 1, kArcface = 2 };

struct Margin {
  int type = kNone;
  double m = 0.0, cos_m = 1.0, sin_m = 0.0, threshold = -1.0;

  Margin(const std::string& name, double margin) : m(margin) {
    if (name == "none") {
      type = kNone;
    } else if (name == "cosface") {
      type = kCosface;
    } else if (name == "arcface") {
      type = kArcface;
    } else {
      TORCH_CHECK(false, "l2sm::cpu: margin_type must be 'none', 'cosface' or 'arcface', got '", name, "'");
    }
    cos_m = std::cos(margin);
    sin_m = std::sin(margin);
    threshold = std::cos(3.14159265358979323846 - margin);
  }

  template <typename T>
  L2SM_INLINE void apply(T c, T& f, T& slope) const {
    if (type == kNone) {
      f = c;
      slope = T(1);
    } else if (type == kCosface) {
      f = c - T(m);
      slope = T(1);
    } else {
      // arcface: cos(theta + m) = c~ cos m - sin(theta) sin m, sin(theta) = sqrt(1 - c~^2);
      // d/dc = cos m + c~ sin m / sin(theta), both at the clamped c~ (docs/design.md, "The operation"
      // and "The backward"). Beyond theta = pi - m the monotonic fallback c - m sin m (slope 1).
      const T lo = T(-1 + kArcfaceClamp), hi = T(1 - kArcfaceClamp);
      T cc = c < lo ? lo : (c > hi ? hi : c);
      T sin_t = std::sqrt(T(1) - cc * cc);
      if (c > T(threshold)) {
        f = cc * T(cos_m) - sin_t * T(sin_m);
        slope = T(cos_m) + cc * T(sin_m) / sin_t;
      } else {
        f = c - T(m * sin_m);
        slope = T(1);
      }
    }
  }
};

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

inline void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const at::Tensor& alpha,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "l2sm::cpu: x must be 2-D (B, D), got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "l2sm::cpu: weight must be (C, ", x.size(1), "), got ",
              w.sizes());
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
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "l2sm::cpu: bias must be (", w.size(0),
                ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->device().is_cpu(),
                "l2sm::cpu: bias must be a floating CPU tensor");
  }
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
