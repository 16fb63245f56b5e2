// Registration of backend "cpu" (loss.h has the overview): the op schemas (TORCH_LIBRARY_FRAGMENT),
// the CPU kernels (TORCH_LIBRARY_IMPL) and the Python module l2sm_kernels._C. The only translation
// unit with these blocks.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "chunking.h"
#include "common.h"
#include "loss.h"

namespace l2sm_cpu {
namespace {

// exp_f32 over an array, dispatched like the kernels' loops (for tests: l2sm_kernels._C._exp_f32)
L2SM_CLONES void exp_f32_array(const float* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_f32(in[i]);
}

}  // namespace
}  // namespace l2sm_cpu

// Schemas: textually those of l2sm_kernels/backends/contract.py (tests/test_cpu_backend.py asserts it). FRAGMENT:
// the l2sm namespace also holds the ops that Python defines (eager, triton).
TORCH_LIBRARY_FRAGMENT(l2sm, m) {
  m.def(
      "cpu_forward(Tensor x, Tensor weight, Tensor target, Tensor alpha, Tensor? bias, Tensor? margins, "
      "Tensor? label_smoothing, Tensor? negatives_table, bool normalize_weight, str margin_kind, "
      "bool margin_detached, int subcenters, int ignore_index, float eps, str negatives, int? max_logits_bytes, "
      "bool need_x, bool need_weight, bool need_bias, bool need_alpha) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpu_backward(Tensor grad_loss, Tensor grad_lse, Tensor x, Tensor weight, Tensor target, Tensor alpha, "
      "Tensor? bias, Tensor? margins, Tensor? label_smoothing, Tensor? negatives_table, Tensor lse, Tensor aux, "
      "bool normalize_weight, str margin_kind, bool margin_detached, int subcenters, int ignore_index, float eps, "
      "str negatives, int? max_logits_bytes, bool need_x, bool need_weight, bool need_bias, bool need_alpha) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(l2sm, CPU, m) {
  m.impl("cpu_forward", &l2sm_cpu::cpu_forward);
  m.impl("cpu_backward", &l2sm_cpu::cpu_backward);
}

// The Python module l2sm_kernels._C: importing it registers the ops above; its functions set the
// workspace (l2sm_kernels.cpu wraps them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "l2sm_kernels C++ CPU kernels (ops: torch.ops.l2sm.cpu_forward / cpu_backward)";
  m.def(
      "set_chunk_classes", [](int64_t n) {
        TORCH_CHECK(n >= 0 && n <= l2sm_cpu::kMaxChunkClasses, "chunk_classes must be in [0, ",
                    l2sm_cpu::kMaxChunkClasses, "] (0: from the workspace budget), got ", n);
        l2sm_cpu::g_chunk_classes.store(n);
      },
      "Classes per chunk; 0 (default) derives it from the workspace budget.");
  m.def("get_chunk_classes", []() { return l2sm_cpu::g_chunk_classes.load(); });
  m.def(
      "set_workspace_bytes", [](int64_t n) {
        TORCH_CHECK(n > 0 && n <= l2sm_cpu::kMaxWorkspaceBytes, "workspace_bytes must be in [1, ",
                    l2sm_cpu::kMaxWorkspaceBytes, "], got ", n);
        l2sm_cpu::g_workspace_bytes.store(n);
      },
      "Byte budget of one chunk's working set, (B + D + 1) x chunk x K values, when chunk_classes is 0.");
  m.def("get_workspace_bytes", []() { return l2sm_cpu::g_workspace_bytes.load(); });
  m.def(
      "chunk_for",
      [](int64_t B, int64_t C, int64_t D, int64_t element_size, int64_t K) {
        TORCH_CHECK(K >= 1, "subcenters must be >= 1");
        return l2sm_cpu::chunk_classes(B, C, D, element_size, K);
      },
      py::arg("B"), py::arg("C"), py::arg("D"), py::arg("element_size"), py::arg("K") = 1,
      "The chunk size (classes) of a call with B rows, C classes of K sub-centers, D features and a compute "
      "dtype of element_size bytes.");
  m.attr("DEFAULT_WORKSPACE_BYTES") = l2sm_cpu::kDefaultWorkspaceBytes;
  m.attr("DEFAULT_MAX_LOGITS_BYTES") = l2sm_cpu::kDefaultMaxLogitsBytes;
  m.def(
      "set_bf16_gemm", [](bool on) { l2sm_cpu::g_bf16_gemm.store(on); },
      "bf16 x and W: the three products by bf16 GEMM (true, the default) or in fp32 (false).");
  m.def("get_bf16_gemm", []() { return l2sm_cpu::g_bf16_gemm.load(); });
  m.def(
      "kept_rows",
      [](int64_t B, int64_t C, int64_t K, int64_t element_size, c10::optional<int64_t> max_logits_bytes,
         bool bf16_inputs) { return l2sm_cpu::kept_rows(B, C, K, element_size, max_logits_bytes, bf16_inputs); },
      py::arg("B"), py::arg("C"), py::arg("K"), py::arg("element_size"), py::arg("max_logits_bytes"),
      py::arg("bf16_inputs") = false,
      "Rows of the batch whose products the forward keeps for the backward (the memory dial; for tests).");
  m.attr("MAX_WORKSPACE_BYTES") = l2sm_cpu::kMaxWorkspaceBytes;
  m.attr("MAX_CHUNK_CLASSES") = l2sm_cpu::kMaxChunkClasses;
  m.def(
      "_split",
      [](int64_t B, int64_t C, int64_t D, int64_t element_size, int64_t threads, int64_t K) {
        TORCH_CHECK(threads >= 1, "threads must be >= 1");
        TORCH_CHECK(K >= 1, "subcenters must be >= 1");
        const l2sm_cpu::Split sp(B, C, D, element_size, K, threads);
        std::vector<std::pair<int64_t, int64_t>> out;
        for (int64_t w = 0; w < sp.workers; ++w) out.push_back(sp.classes(w, C));
        return std::make_pair(sp.chunk, out);
      },
      py::arg("B"), py::arg("C"), py::arg("D"), py::arg("element_size"), py::arg("threads"), py::arg("K") = 1,
      "(chunk, [(first class, end class) per worker]) of a call with B rows, C classes of K sub-centers, D "
      "features, a compute dtype of element_size bytes and `threads` threads (for tests).");
  m.def(
      "_exp_f32",
      [](const std::vector<float>& in) {
        std::vector<float> out(in.size());
        l2sm_cpu::exp_f32_array(in.data(), out.data(), int64_t(in.size()));
        return out;
      },
      "The kernels' float32 exp (tests compare it with a float64 exp).");
}
