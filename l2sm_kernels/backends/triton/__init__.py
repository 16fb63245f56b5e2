"""Backend "triton": the fused GPU kernels of the loss, by role.

  op.py             the torch.library.triton_op registration (l2sm::triton_forward / _backward)
  loss_forward.py   _fwd_split_kernel, _fwd_combine_kernel and their launcher forward()
  loss_backward.py  _bwd_rows_kernel, _bwd_dw_kernel and their launcher backward()
  norms.py          row inverse norms and column sums of W (kernels + launchers)
  margin.py         the target-column margin (from the per-row margin table), the target rules, the per-row
                    kernels' shared preamble, the checks of the margin table and the label smoothing
  common.py         device helpers shared by the kernels (operands, products, interpreter emulation)
  config.py         tile configurations, the precision plan, grid sizes
  aux_layout.py     what the forward saves for the backward (aux) and the per-row buffers
  gemm_path.py      the GEMM path: library GEMMs (torch.mm: cuBLAS) per class chunk, the logits kept in aux while
                    max_logits_bytes allows; the default on a GPU (config.default_path), see its docstring
  row_kernels.py    the GEMM path's Triton row kernels (chunk statistics, dloss/dc in place, row normalization
                    and its backward) and their launchers
Nothing here imports triton at package import: the registry loads op.py when the backend is asked for.
The rest of this docstring is the fused kernels' design.

Notation (docs/design.md, "The operation"): x_hat_i = x_i / max(|x_i|, eps); W_hat_j = W_j / max(|W_j|, eps) when normalize_weight,
else W_j; c_ij = x_hat_i . W_hat_j; z_ij = alpha c_ij + b_j, with f(c_iy) instead of c_iy on a row's target
column y = y_i; p = softmax_j(z); lse_i = logsumexp_j z_ij. The backward of every output is
    dz_ij = w_p p_ij - w_t ((1 - s) [j = y] + s / C),   w_t = grad_loss (0 on ignored rows), w_p = w_t + grad_lse.
The margin f (none, additive c - m3, angular cos(arccos c + m2) - m3 with its fallback; slope 1 when
detached) is evaluated from each row's entry of the float64 margin table (margins.margin_table, one row
for all or one per row, rounded to fp32 in the kernel, as eager rounds it); the label smoothing s is read
from its 0-d tensor by the kernels (no host synchronization). Sub-centers (K > 1): W has C K rows, class j's
cosine is c_ij = max_k x_hat_i . W_hat_{jK+k} (ties to the lowest k), and every gradient of c_ij goes to
the winning row win(i, j) only; below, W_hat_j stands for W_hat_{j, win(i, j)} of the row at hand.

Design: four GEMM-equivalents of matrix work (the 3-GEMM floor needs three; an exact method that stores
no B x C values needs at least four, docs/design.md, "The roofline"), a constant number of launches, no B x C
buffer, no atomics, deterministic.

  forward   _fwd_split_kernel     grid (row blocks, class splits[, D chunks]). Walks its classes once:
            S = x W^T tile by tile, online logsumexp over the non-target columns, and, flash-attention style
            (V = W, online rescaling), O'_i = sum_{j != y_i} p_ij W_hat_j when the dX hint is set. That is
            the forward's 2 GEMM-equivalents; without the hint only S is computed (1).
            _fwd_combine_kernel   grid (row blocks, D chunks of O'; 1 without the dX hint). Per row: merges
            the class splits' partial (max, sum, O' of the program's D chunk), adds the target
            column (its cosine c_iy = x_y . W_y / (|x_i| |W_y|) from one dot and two norms per row in fp64,
            rounded once: the angular margin amplifies c's error near c = +-1; with sub-centers the
            maximum of K such, its k recorded in aux), then the margin, writes loss, lse and aux. The
            per-row scalars are computed by each D chunk's program alike (B D x 2 reads of x and W_y per
            chunk, from L2) and written by chunk 0's: 4 D chunks at D = 512 raise the grid from B/16 to
            B/4 programs (64 -> 256 at B = 1024) with a quarter of the O' partials each.
  backward  _bwd_rows_kernel      per row: dX needs no pass over the classes, because
              dx_hat_i = alpha [w_p O'_i - w_t (s/C) (sum_j W_hat_j - W_hat_y) + dz_iy f'(c_iy) W_hat_y]
            (K > 1: sum_j W_hat_{j, win(i, j)} depends on the row, see "Sub-centers" below)
            (O' excludes the target column, so a confident row's p_iy - 1 = -q_i never cancels; q_i is the
            merged non-target mass, exact in fp32), then the normalization backward. d alpha likewise:
              sum_j dz_ij g_ij = w_p PC_i - w_t (s/C) SC_i + dz_iy f(c_iy),
            PC_i = sum_{j != y} p_ij c_ij and SC_i = sum_{j != y} c_ij accumulated by the forward.
            _bwd_dw_kernel        persistent, one program per multiprocessor, each owning class blocks in
            turn: walks the rows, recomputes S, forms dz (the target entry from the per-row value),
            accumulates dW_hat += dz^T x_hat and db += sum_i dz, then the normalization backward of W in
            the epilogue (w_hat . dw_hat from the finished row where one program holds all of D: with
            w_hat correctly rounded in a tile of <= 128, as eager, else as (W_j . dw_hat_j) / |W_j|; where
            D is split over programs, sum_i dc_ij c_ij, accumulated alongside). 2 GEMM-equivalents.
            When the forward ran without the dX / alpha hints (e.g. under no_grad, or the op called
            directly), the backward reruns the forward kernels to get O' / PC (the contract allows it).

Sub-centers (K > 1), in GEMM-equivalents G of the C K-row problem (G = 2 B C K D flops; the floor, three
GEMMs over W's C K rows as eager computes them, is 3 G). Estimates, unmeasured:
  forward   per class tile, K products (sub-center k's rows jK + k, row stride K) with a running
            elementwise maximum and argmax (a runtime loop over k: unrolled, the K tiles' registers would be
            live at once and the default tiles spill 12 KiB), the online logsumexp over the class logits,
            and O' = sum_k (p masked to the columns k won) @ W_hat_k: 2 G, as for K = 1, but W_k is read a
            second time for O' (from L2: all of D for K sub-centers cannot stay on chip). Without the dX
            hint the logsumexp-only tiles are 64 x 256 (the running maximum is one more fp32 tile).
  smoothing with the dX hint: dX's smoothing term sum_{j != y_i} W_hat_{j, win(i, j)} is per row (B x D in
            aux), no longer one column sum: the split kernel runs once more with weight 1 instead of p (ONES),
            its partials summed over the splits by torch (fixed order), before the main pass (so the two
            passes' partials never coexist). +2 G, only in this combination.
  backward  _bwd_dw_kernel's blocks are (class block, sub-center kk) pairs (K per class block when dW is
            asked for): a block owns W's rows jK + kk, and to know where kk won it recomputes all K cosines
            per row tile (W_k from L2; inverse norms from a 1/|W| buffer of C K floats), then one dW
            product masked to those entries (the target column: the forward's winner from aux): K S + 1
            dW products per block, (K + 1) G in all, against 2 G for K = 1. Total (K + 3) G + 2 G with
            smoothing: 6 G at K = 3, 2x the floor's 3 G (K = 1: 4 G against 3 G).
            Not taken: a per-program cache of the winners (B x BLOCK_C bytes per program, growing with B)
            would recompute the K cosines once per class block, ((2K - 1) / K + 1) G; tiles that hold a
            class's K sub-centers side by side (one product, the group maximum through a reshape) would
            cost 2 G (rounded up to a power of two of K) but make Triton convert layouts in the products'
            epilogues. Both are unmeasured alternatives.
            The recomputed winners of the non-target columns come from the dW pass's own products: where
            two sub-centers tie to within their rounding, the forward (O') and the dW pass may credit
            different ones of the two (the softmax value is the same).
  Compiled for sm_90 (B=1024, D=512, C=131072, bf16, benchmarks/compile_report.py's Recorder with
  subcenters set; registers / stack bytes): forward split 255 / 128 at K = 3 (232 at K = 2, 120 at K = 4;
  K = 1: 80), its ONES pass 255 / 256, the logsumexp-only split 243 / 0, the dW pass 255 / 416 at K = 3
  (656 at K = 2, 416 at K = 4; K = 1: 352), all options on.

Why the fused kernels next to a bounded workspace with cuBLAS GEMMs (gemm_path.py): within the fused
path's memory target (peak extra <= 1.1 x the gradients: 12.9 MiB beyond the 0.126 GiB of gradients at
C = 131072) chunks could hold at most ~4096 classes: 32+ chunks of several launches each, about 1 ms of host
time per step (estimate). Here the launch count is constant (forward 3-5, backward 2-4) and the workspace
bounded by the gradients; the GEMM path trades ~100 MiB of chunk workspace (and the logits its budget keeps)
for fewer launches and cuBLAS's GEMMs (docs/design.md, "The roofline").
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
computed twice: 3 GEMM-equivalents of tensor work per pass), "split_d" (one warpgroup, two programs
per multiprocessor, a 256-wide accumulator chunk per program: S once per chunk, also 3) and "fused_tma"
(the default tiles with the streamed tile, W in the forward and x in the dW pass, loaded by TMA through a
host-side tensor descriptor: global -> shared memory without passing through registers; the scratch
barrier still keeps Triton from pipelining it, so each copy is waited on where it is issued). The
descriptor path (Config.tma, the kernels' TMA) is taken where TMA can read the tensor (unit D stride,
16-byte aligned rows, one tile over D, not W's rows of one sub-center); the interpreter runs it too (CI
checks it bit-identical to the pointer loads), the compiled one is checked only to compile for sm_90 with
TMA loads in its main loops: its numerics and speed on a GPU are unmeasured, and the default does not use it.

Workspace (besides outputs, aux and O(B + C K + D) vectors), all bounded independently of C except as noted
(K sub-centers change none of the bounds below: the ONES pass's partials, the same size as the main pass's,
are freed before it runs; K adds B x D to aux with smoothing and the dX hint, and C K floats of 1/|W| in the
backward with normalize_weight):
  forward: the class-split partials, n_splits x B x (4 + D) fp32 (4 + 0 without the dX hint), with
    n_splits <= max(1, 2 P / row_blocks), P = SMs x programs resident per SM (num_splits): at most
    (2 P x BLOCK_B + B) x (4 + D) x 4 bytes (H100, B = 1024, D = 512: 16 splits, 32 MiB); the chain-break
    scratch, 2 slots x BLOCK_B x BLOCK_C per program (4.1 MiB there); both freed when the forward returns,
    before the backward allocates dW (also when the backward reruns the forward), so they
    do not set the training step's peak. normalize_weight: 1/|W_j| (C floats); label smoothing: one
    column-sum pass over W (D floats kept in aux).
  backward: per-row values (B x 8 fp32), the dW pass's chain-break scratch (SMs x 2 x 64 x 64 x 2 bytes
    = 2.1 MiB on an H100). The peak of a training step is the gradients + aux (B x (7 + D) x 4 bytes with
    the dX hint) + that.

Precision: every accumulation in fp32 but the norms and the target cosine (fp64, below). Matrix products
take the inputs as stored (bf16, fp16 or fp32, mixed allowed; W is never copied or cast in memory: tiles are
converted in registers):
  bf16 x and W: bf16 tensor-core products; the derived operand (p for O', dz for dW) rounded to bf16,
    as eager bf16 torch rounds its dz (bf16 has fp32's range, so nothing underflows).
  fp16 x and W: fp16 products for S; the derived operands in tf32 (fp16 would underflow p ~ 1/C).
  mixed (e.g. fp32 master W with bf16 features): tf32 (the 16-bit operand is exact in tf32).
  fp32 x and W: IEEE fp32 (as torch's default fp32 matmul), tf32 when
    torch.get_float32_matmul_precision() is "high" or "medium".
Logits in log2 units inside the two class walks: z2 = log2(e) z, so that p = exp2(z2 - m2) (exp would cost a
multiply per element more); with K = 1, alpha log2(e) / |x_i| is one per-row scale rs_i, rounded once from
fp64, and z2_ij = (x_i . W_j [/ |W_j|]) rs_i (+ log2(e) b_j): the same number of roundings per element as
alpha (x_i . W_j / |x_i|) had. The split partials' maxima stay in log2 units; the combine forms lse in fp64
(the splits' weights exp(m - lse) too, with no rounding of m ln 2 or of lse before the subtraction) and
saves log2(e) lse rounded once, which the dW pass subtracts: where one logit dominates a row, lse2 is its
z2 exactly and its p is 1 exactly, as exp(z - lse) gave (with the fp32 lse converted instead, dx's error at
alpha = 1000 was 3.7x the exp version's and tests/test_l2_softmax.py::test_large_alpha_and_bias_offset failed).
Norms, eps, logsumexp, margins and all per-row work in fp32: zero rows give x_hat = 0, never NaN. Sums of
squares are accumulated in fp64 (norms.py: an fp32 one overflows past |v| ~ 1.8e19 and made such rows zero
vectors), and the target cosine is computed in fp64 (above); the raw products x_i . W_j themselves are
fp32, so |x_i| |W_j| must stay below fp32's 3.4e38 (no normalized copies of x or W exist). Norms,
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

    from . import aux_layout, common, config, gemm_path, loss_backward, loss_forward, margin, norms, row_kernels

    # the launchers forward / backward are loss_forward's and loss_backward's (the GEMM path's own are reached through them)
    mods = (common, margin, norms, aux_layout, config, row_kernels, gemm_path, loss_forward, loss_backward)
    return SimpleNamespace(**{k: v for m in mods for k, v in vars(m).items() if not k.startswith("__")})
