// Backend "cpu": the L2-constrained softmax loss, fused, for CPU tensors (docs/design.md, "The
// operation"; "Backends").
//
//   l2sm::cpu_forward  -> (loss (B,), lse (B,), aux (0,))
//   l2sm::cpu_backward -> (grad_x, grad_weight, grad_bias, grad_alpha)
// with the schemas of l2sm_kernels/backends/contract.py (FORWARD_SCHEMA / BACKWARD_SCHEMA); the Python side
// (l2sm_kernels/backends/cpu.py) attaches the fake kernels and the autograd formula.
//
// How: the classes are walked in chunks of `cc` classes. For each chunk, ATen's BLAS-backed at::mm
// computes the chunk's cosines (B x cc) into a workspace buffer; everything else is a fused
// epilogue on that buffer while it is in cache:
//   forward:  z = alpha f(c) + b on the chunk, online logsumexp per row (running max, rescaled sum).
//   backward: recompute the chunk's logits, p = exp(z - lse), dz, then dC' = alpha dz f'(c) / |W_j|
//             in place; dX_hat += dC' W_c (at::addmm_), dW_c = dC'^T X_hat (at::mm straight into the
//             output rows), then the normalization backward of W on those rows.
// That is 4 GEMM-equivalents (forward logits; backward recompute + dX + dW) and no B x C buffer.
//
// Files: common.h (exp, margin, normalization, input checks; the numerics), chunking.h (chunk size,
// workspace, the split of the classes over threads), loss_forward.cpp, loss_backward.cpp,
// register.cpp (the op schemas, the CPU kernels' registration and the Python module l2sm_kernels._C).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace l2sm_cpu {

// (loss, lse, aux) of the op l2sm::cpu_forward (loss_forward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& bias, bool normalize_weight, c10::string_view margin_type, double margin,
    int64_t ignore_index, double label_smoothing, double eps, bool need_x, bool need_weight, bool need_bias,
    bool need_alpha);

// (grad_x, grad_weight, grad_bias, grad_alpha) of the op l2sm::cpu_backward (loss_backward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& target, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& aux, bool normalize_weight, c10::string_view margin_type, double margin, int64_t ignore_index,
    double label_smoothing, double eps, bool need_x, bool need_weight, bool need_bias, bool need_alpha);

}  // namespace l2sm_cpu
