// Backend "cpu": the L2-constrained softmax loss, fused, for CPU tensors (docs/design.md, "The
// operation", "The margins"; "Backends").
//
//   l2sm::cpu_forward  -> (loss (B,), lse (B,), aux (B,): q_i = 1 - p_iy)
//   l2sm::cpu_backward -> (grad_x, grad_weight, grad_bias, grad_alpha)
// with the schemas of l2sm_kernels/backends/contract.py (FORWARD_SCHEMA / BACKWARD_SCHEMA); the Python side
// (l2sm_kernels/backends/cpu.py) attaches the fake kernels (aux_meta: (B,) in the compute dtype) and
// the autograd formula.
//
// Inputs besides x (B, D), weight (C K, D), target, alpha and bias (C,): the margin table (R, 5)
// float64 of l2sm_kernels/margins.py (R = 1 or B; read on the host and rounded to the compute dtype
// once, common.h: Margins), margin_kind ("none" | "additive" | "angular": which part of it applies),
// margin_detached (f' taken as 1), the label smoothing (None or a 0-d CPU tensor, read on the host),
// the non-target transform (negatives "none" | "mv" | "curricular" | "filter" and its (R, 2) float64
// table [t, threshold], common.h: Negatives),
// K = subcenters (class j's cosine is the max over W's rows [jK, jK + K), ties to the lowest; its
// gradient goes to that winner only).
//
// How: the classes are walked in chunks of `cc` classes (cc K contiguous rows of W). For each
// chunk, ATen's BLAS-backed at::mm computes the chunk's products x_hat . W_r (B x cc K) into a
// workspace buffer; everything else is a fused epilogue on that buffer while it is in cache:
//   forward:  the class cosines (max over K), z = alpha g + b on the chunk (f(c) on the target
//             column), online logsumexp per row over the non-target columns (running max, rescaled
//             sum), z at the target kept apart: lse, the loss and q in double at the end.
//   backward: recompute the chunk's products, p = exp(z - lse), dz (the target's from q), then
//             dC' = alpha dz f'(c) / |W_r| in place at each class's winning sub-center (0 at the
//             others); dX_hat += dC' W_c (at::addmm_), dW_c = dC'^T X_hat (at::mm straight into the
//             output rows), then the normalization backward of W on those rows.
// That is 4 GEMM-equivalents (forward products; backward recompute + dX + dW) and no B x C buffer:
// the workspace is per thread B x cc K values (+ cc K x D when W is converted to the compute dtype)
// plus vectors, bounded by the budget (chunking.h). The memory dial (max_logits_bytes; chunking.h,
// kept_rows) trades the recomputation for memory: the forward keeps the products of the first R rows
// (an (R, C K) block returned in aux), the backward recomputes only the other B - R rows.
//
// Files: common.h (exp, margin, sub-center max, normalization, input checks; the numerics),
// chunking.h (chunk size, workspace, the split of the classes over threads), loss_forward.cpp,
// loss_backward.cpp, register.cpp (the op schemas, the CPU kernels' registration and the Python
// module l2sm_kernels._C).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace l2sm_cpu {

// (loss, lse, aux) of the op l2sm::cpu_forward (loss_forward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& margins,
    const c10::optional<at::Tensor>& label_smoothing, const c10::optional<at::Tensor>& negatives_table,
    bool normalize_weight, c10::string_view margin_kind, bool margin_detached, int64_t subcenters,
    int64_t ignore_index, double eps, c10::string_view negatives, c10::optional<int64_t> max_logits_bytes,
    bool need_x, bool need_weight, bool need_bias, bool need_alpha);

// (grad_x, grad_weight, grad_bias, grad_alpha) of the op l2sm::cpu_backward (loss_backward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& margins, const c10::optional<at::Tensor>& label_smoothing,
    const c10::optional<at::Tensor>& negatives_table, const at::Tensor& lse, const at::Tensor& aux,
    bool normalize_weight, c10::string_view margin_kind, bool margin_detached, int64_t subcenters,
    int64_t ignore_index, double eps, c10::string_view negatives, c10::optional<int64_t> max_logits_bytes,
    bool need_x, bool need_weight, bool need_bias, bool need_alpha);

}  // namespace l2sm_cpu
