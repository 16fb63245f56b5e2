"""Backend "triton": the fused GPU kernels of the loss, by role.

  op.py             the torch.library.triton_op registration (l2sm::triton_forward / _backward)
  loss_forward.py   _fwd_split_kernel, _fwd_combine_kernel and their launcher forward()
  loss_backward.py  _bwd_rows_kernel, _bwd_dw_kernel and their launcher backward()
  norms.py          row inverse norms and column sums of W (kernels + launchers)
  margin.py         the target-column margin and target rules (device functions + launch arguments)
  common.py         device helpers shared by the kernels (operands, products, interpreter emulation)
  config.py         tile configurations, the precision plan, grid sizes
  aux_layout.py     what the forward saves for the backward (aux) and the per-row buffers
Nothing here imports triton at package import: the registry loads op.py when the backend is asked for.

Notation (docs/design.md, "The operation"): x_hat_i = x_i / max(|x_i|, eps); W_hat_j = W_j / max(|W_j|, eps) when normalize_weight,
else W_j; c_ij = x_hat_i . W_hat_j; z_ij = alpha c_ij + b_j, with f(c_iy) instead of c_iy on a row's target
column y = y_i; p = softmax_j(z); lse_i = logsumexp_j z_ij. The backward of every output is
    dz_ij = w_p p_ij - w_t ((1 - s) [j = y] + s / C),   w_t = grad_loss (0 on ignored rows), w_p = w_t + grad_lse.

Design: four GEMM-equivalents of matrix work (the 3-GEMM floor needs three; an exact method that stores
no B x C values needs at least four, docs/design.md, "The roofline"), a constant number of launches, no B x C
buffer, no atomics, deterministic.

  forward   _fwd_split_kernel     grid (row blocks, class splits[, D chunks]). Walks its classes once:
            S = x W^T tile by tile, online logsumexp over the non-target columns, and, flash-attention style
            (V = W, online rescaling), O'_i = sum_{j != y_i} p_ij W_hat_j when the dX hint is set. That is
            the forward's 2 GEMM-equivalents; without the hint only S is computed (1).
            _fwd_combine_kernel   per row: merges the class splits' partial (max, sum, O'), adds the target
            column (its cosine c_iy = x_hat_i . W_hat_y computed as one exact fp32 dot per row, then the
            margin), writes loss, lse and the aux statistics.
  backward  _bwd_rows_kernel      per row: dX needs no pass over the classes, because
              dx_hat_i = alpha [w_p O'_i - w_t (s/C) (sum_j W_hat_j - W_hat_y) + dz_iy f'(c_iy) W_hat_y]
            (O' excludes the target column, so a confident row's p_iy - 1 = -q_i never cancels; q_i is the
            merged non-target mass, exact in fp32), then the normalization backward. d alpha likewise:
              sum_j dz_ij g_ij = w_p PC_i - w_t (s/C) SC_i + dz_iy f(c_iy),
            PC_i = sum_{j != y} p_ij c_ij and SC_i = sum_{j != y} c_ij accumulated by the forward.
            _bwd_dw_kernel        persistent, one program per multiprocessor, each owning class blocks in
            turn: walks the rows, recomputes S, forms dz (the target entry from the per-row value),
            accumulates dW_hat += dz^T x_hat and db += sum_i dz, then the normalization backward of W in
            the epilogue (w_hat . dw_hat = sum_i dc_ij c_ij, accumulated alongside). 2 GEMM-equivalents.
            When the forward ran without the dX / alpha hints (e.g. under no_grad, or the op called
            directly), the backward reruns the forward kernels to get O' / PC (the contract allows it).

Why this design and not a bounded dz workspace with cuBLAS GEMMs (both are 4 GEMM-equivalents): the
memory target leaves little room at C = 131072 (peak extra <= 1.1 x the gradients: 12.9 MiB beyond the
0.126 GiB of gradients), so dz chunks could hold at most ~4096 classes: 32+ chunks of 3-4 launches
each, about 1 ms of host time per step (estimate), more than the whole 1.6x-floor budget (1.09 ms on
the H200 anchors). Here the launch count is constant (forward 3-5, backward 2-4).
The cost of this design is register pressure: the D-wide fp32 accumulator of O' (or dW) is 64 x 512 x 4
= 128 KiB, half the register file, which fixes 64-row (or 64-class) tiles with 8 warps. Compiled for
sm_90 (benchmarks/compile_report.py, no GPU needed; B=1024, D=512, bf16): both main kernels use 255
registers, 136 KiB of shared memory and warpgroup MMA (HGMMA); the forward spills 72-80 bytes, the dW
pass 8 bytes (352 with normalize_weight: in its epilogue). Triton's layout rule for chained products
makes both warpgroups of a 64-row tile compute all of S (twice the HGMMA instructions): the default
tiles pass p through a scratch buffer instead (_through_scratch), whose barrier in turn stops Triton's
software pipelining, so each iteration waits for its W (or x) tile from L2. Estimated time (unmeasured):
at e = the kernels' efficiency relative to cuBLAS, 4 / (3 e) of the floor plus ~0.02-0.05 ms of per-row
kernels: 1.6x at e = 0.85, 1.9x at e = 0.7; e is unknown, and the unpipelined loads make e >= 0.85
unlikely. The alternatives in GPU_CONFIGS, timed by the GPU benchmark: "fused_chained" (pipelined, S
computed twice: 3 GEMM-equivalents of tensor work per pass) and "split_d" (one warpgroup, two programs
per multiprocessor, a 256-wide accumulator chunk per program: S once per chunk, also 3).

Workspace (besides outputs, aux and O(B + C + D) vectors), all bounded independently of C except as noted:
  forward: the class-split partials, n_splits x B x (4 + D) fp32 (4 + 0 without the dX hint), with
    n_splits <= max(1, 2 P / row_blocks), P = SMs x programs resident per SM (num_splits): at most
    (2 P x BLOCK_B + B) x (4 + D) x 4 bytes (H100, B = 1024, D = 512: 16 splits, 32 MiB); the chain-break
    scratch, 2 slots x BLOCK_B x BLOCK_C per program (4.1 MiB there); both freed when the forward returns,
    before the backward allocates dW (also when the backward reruns the forward), so they
    do not set the training step's peak. normalize_weight: 1/|W_j| (C floats); label smoothing: one
    column-sum pass over W (D floats kept in aux).
  backward: per-row values (B x 5 fp32), the dW pass's chain-break scratch (SMs x 2 x 64 x 64 x 2 bytes
    = 2.1 MiB on an H100). The peak of a training step is the gradients + aux (B x (5 + D) x 4 bytes with
    the dX hint) + that.

Precision: every accumulation in fp32. Matrix products take the inputs as stored (bf16, fp16 or fp32,
mixed allowed; W is never copied or cast in memory: tiles are converted in registers):
  bf16 x and W: bf16 tensor-core products; the derived operand (p for O', dz for dW) rounded to bf16,
    as eager bf16 torch rounds its dz (bf16 has fp32's range, so nothing underflows).
  fp16 x and W: fp16 products for S; the derived operands in tf32 (fp16 would underflow p ~ 1/C).
  mixed (e.g. fp32 master W with bf16 features): tf32 (the 16-bit operand is exact in tf32).
  fp32 x and W: IEEE fp32 (as torch's default fp32 matmul), tf32 when
    torch.get_float32_matmul_precision() is "high" or "medium".
Norms, eps, logsumexp, margins and all per-row work in fp32: zero rows give x_hat = 0, never NaN. Norms,
their reciprocals and the per-row divisions use correctly rounded sqrt / division (tl.sqrt_rn, tl.div_rn;
off the hot path): the compiled default is an approximate sqrt that flushes subnormals and a 2-ulp
division, which would differ from the interpreter's (CI's) exact numpy ones.

Index arithmetic is int64 (rows and classes are promoted before multiplying by strides: C x D and
B x C exceed 2^31 at the sizes this serves; D indices too where a non-unit D stride needs it, _didx).
Ragged edges are masked: padded classes get z = -inf, padded rows are zeroed before they can reach a product.

Under the Triton interpreter (CI), two of its gaps are bridged in the kernels, nowhere else: its bf16 dot
multiplies raw bits and its fp32 -> bf16 cast truncates, so bf16 operands and outputs are rounded to
nearest even by hand and multiplied in fp32 (EMU), which reproduces the GPU's arithmetic.
"""


def kernel_namespace():
    """Every module of this backend but op.py as one namespace (launchers, configs, layouts, device
    helpers), for tests and tools: kernel_namespace().forward, .Config, .aux_layout, ... Imports triton."""
    from types import SimpleNamespace

    from . import aux_layout, common, config, loss_backward, loss_forward, margin, norms

    mods = (common, margin, norms, aux_layout, config, loss_forward, loss_backward)
    return SimpleNamespace(**{k: v for m in mods for k, v in vars(m).items() if not k.startswith("__")})
