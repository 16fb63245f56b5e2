"""The curated one-line mutations of tests/mutation_audit.py: each names its file, the exact text it
changes (occurring once), the change, why a user would care, and the test subset (and backends) that
must catch it. Keep the list honest: a mutation that survives is a missing test, not a list to edit."""

_EAGER = {"L2SM_TEST_BACKENDS": "eager"}
_CPU = {"L2SM_TEST_BACKENDS": "cpu"}
_TRITON = {"L2SM_TEST_BACKENDS": "triton"}
_SUITE = ["tests/test_margins.py", "tests/test_l2_softmax.py"]


def _m(id, file, find, replace, why, tests=None, env=None):
    return {"id": id, "file": file, "find": find, "replace": replace, "why": why,
            "tests": tests or _SUITE, "env": env or _EAGER}


MUTATIONS = [
    # ------------------------------------------------------------------ the margin table (all backends read it)
    _m("margins-threshold-sign", "l2sm_kernels/margins.py", "-cos, torch.where(a < 0", "cos, torch.where(a < 0",
       "the arcface switch point cos(pi - m) taken as cos(m)"),
    _m("margins-offset-no-sin", "l2sm_kernels/margins.py", "a * sin + b", "a + b",
       "the fallback c - m sin m - m3 becomes c - m - m3"),
    _m("margins-zero-m2-clamped", "l2sm_kernels/margins.py", "torch.where(a < 0, -inf, inf))",
       "torch.where(a < 0, -inf, -inf))", "m2 = 0 rows take the angular (clamped) branch instead of c - m3"),
    # ------------------------------------------------------------------ options
    _m("options-combined-drop-m3", "l2sm_kernels/options.py", "m2, m3 = m[1], m[2]", "m2, m3 = m[1], None",
       "combined margins lose their additive part"),
    _m("options-detached-ignored", "l2sm_kernels/options.py", 'self.margin_grad == "detached"', "False",
       "margin_grad='detached' silently computes the exact gradient", tests=["tests/test_margins.py"]),
    # ------------------------------------------------------------------ eager backend
    _m("eager-fallback-value", "l2sm_kernels/backends/eager.py", "value = torch.where(hard, phi, c - tab[:, OFFSET])",
       "value = torch.where(hard, phi, c - tab[:, M3])", "the fallback c - m sin m becomes c - m3"),
    _m("eager-clamp-removed", "l2sm_kernels/backends/eager.py",
       "cc = c.clamp(-1 + ARCFACE_CLAMP, 1 - ARCFACE_CLAMP)", "cc = c.clamp(-1.0, 1.0)",
       "no clamp: the slope divides by 0 at c = 1"),
    _m("eager-switch-inclusive", "l2sm_kernels/backends/eager.py", "hard = c > tab[:, THRESHOLD]",
       "hard = c >= tab[:, THRESHOLD] - 1e-7", "the switch point moved by 1e-7"),
    _m("eager-detached-ignored", "l2sm_kernels/backends/eager.py", "return value, (one if detached else slope)",
       "return value, slope", "the detached mode keeps f'"),
    _m("eager-slope-fallback", "l2sm_kernels/backends/eager.py", "slope = torch.where(hard, dphi, one)",
       "slope = torch.where(hard, dphi, one * 0.99)", "the fallback's slope is not 1"),
    _m("eager-subcenter-loser-grad", "l2sm_kernels/backends/eager.py", "2, L[\"win\"][:, :, None], dc[:, :, None])",
       "2, torch.zeros_like(L[\"win\"])[:, :, None], dc[:, :, None])",
       "every class's gradient goes to sub-center 0, not the winner"),
    _m("eager-smoothing-sign", "l2sm_kernels/backends/eager.py", "dz = w_p[:, None] * p - (w_t * (s / C))[:, None]",
       "dz = w_p[:, None] * p + (w_t * (s / C))[:, None]", "label smoothing's gradient with the wrong sign"),
    _m("eager-norm-backward-branch", "l2sm_kernels/backends/eager.py",
       "return torch.where(norm >= eps, (grad_hat - v_hat * proj) / norm.clamp_min(eps), grad_hat / eps)",
       "return torch.where(norm > eps, (grad_hat - v_hat * proj) / norm.clamp_min(eps), grad_hat / eps)",
       "a row of norm exactly eps takes the wrong branch", tests=["tests/test_l2_softmax.py"]),
    _m("eager-norm-fp32", "l2sm_kernels/backends/eager.py",
       "wide = torch.float64 if v.dtype == torch.float32 else v.dtype", "wide = v.dtype",
       "float32 norms overflow past 1.8e19", tests=["tests/test_l2_softmax.py"]),
    # ------------------------------------------------------------------ the public API
    _m("loss-ignore-index-range", "l2sm_kernels/loss.py",
       "bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))",
       "bad = ((target < 0) & (target != ignore_index)) | (target >= num_classes)",
       "ignore_index >= C rejected again", tests=["tests/test_api.py"]),
    _m("loss-mean-denominator", "l2sm_kernels/loss.py", "return loss.sum() / (target != ignore_index).sum()",
       "return loss.sum() / target.numel()", "'mean' divides by every row, ignored ones included",
       tests=["tests/test_l2_softmax.py"]),
    _m("loss-partial-fc-local-target", "l2sm_kernels/loss.py",
       "return w, b, torch.where(valid, local, torch.full_like(local, -1)), sampled",
       "return w, b, torch.where(valid, local + 0 * local, local), sampled",
       "ignored rows keep their (global) target in the sample's index space", tests=["tests/test_loss_module.py"]),
    # ------------------------------------------------------------------ the module and the heads
    _m("module-alpha-floor", "l2sm_kernels/loss_module.py", 'return module._parameters["alpha_raw"].exp() + module.alpha_min',
       'return module._parameters["alpha_raw"].exp()', "a learned alpha loses its floor",
       tests=["tests/test_loss_module.py"]),
    _m("module-extra-state-ignored", "l2sm_kernels/loss_module.py", "        if diffs:\n            raise RuntimeError(",
       "        if False:\n            raise RuntimeError(", "checkpoints with other options load silently",
       tests=["tests/test_loss_module.py"]),
    _m("heads-adaface-sign", "l2sm_kernels/heads.py", "return (1.0, -self.m * g, self.m + self.m * g)",
       "return (1.0, self.m * g, self.m + self.m * g)", "AdaFace's angular margin with the wrong sign",
       tests=["tests/test_heads.py"]),
    _m("heads-magface-slope", "l2sm_kernels/heads.py",
       "return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m",
       "return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_m) + self.l_m",
       "MagFace's margin line shifted", tests=["tests/test_heads.py"]),
]

MUTATIONS += [
    # ------------------------------------------------------------------ the cpu backend (C++, rebuilt)
    _m("cpu-subcenter-tie-highest", "csrc/common.h", "const bool gt = v > best;  // strict: a tie keeps the lower k",
       "const bool gt = v >= best;  // strict: a tie keeps the lower k", "sub-center ties go to the highest row",
       tests=["tests/test_margins.py"], env=_CPU),
    _m("cpu-fallback-offset", "csrc/common.h", "      f = c - offset[r];", "      f = c - m3[r];",
       "the fallback c - m sin m - m3 becomes c - m3", env=_CPU),
    _m("cpu-clamp-removed", "csrc/common.h", "const T lo = T(-1 + kArcfaceClamp), hi = T(1 - kArcfaceClamp);",
       "const T lo = T(-1), hi = T(1);", "no clamp: the slope divides by 0 at c = 1", env=_CPU),
    _m("cpu-detached-ignored", "csrc/common.h", "      if (!detached) slope = cos_m[r] + cc * sin_m[r] / sin_t;",
       "      slope = cos_m[r] + cc * sin_m[r] / sin_t;", "the detached mode keeps f'", tests=["tests/test_margins.py"],
       env=_CPU),
    _m("cpu-loss-cancels", "csrc/loss_forward.cpp", "    const double l1 = std::log1p(v);",
       "    const double l1 = std::log(1.0 + v);", "a confident row's loss from log(1 + v) (cancellation)",
       tests=["tests/test_l2_softmax.py"], env=_CPU),
    _m("cpu-target-dz-from-p", "csrc/loss_backward.cpp", "  const T dz = (a.g_lse[i] * p - a.w_t[i] * a.q[i]) + a.w_ts[i];",
       "  const T dz = (a.g_lse[i] * p + a.w_t[i] * (p - T(1))) + a.w_ts[i];",
       "the target's dz formed as p - 1 (cancels for confident rows)", tests=["tests/test_l2_softmax.py"], env=_CPU),
    _m("cpu-smoothing-target-term", "csrc/loss_backward.cpp", "k_t = T(s * (1.0 - 1.0 / double(C)));",
       "k_t = T(s);", "label smoothing's target-column term misses its 1/C part", env=_CPU),
    # ------------------------------------------------------------------ the class-parallel loss (gloo)
    _m("dist-alpha-not-summed", "l2sm_kernels/distributed/collectives.py",
       "            ga = grad_alpha.clone()\n            dist.all_reduce(ga, group=ctx.group)",
       "            ga = grad_alpha.clone()", "a learnable alpha's gradient is this rank's part only",
       tests=["tests/test_class_parallel.py"], env={"L2SM_TEST_BACKENDS": "eager"}),
    _m("dist-smoothing-weight", "l2sm_kernels/distributed/class_parallel.py",
       "    loss = lse - (1 - s) * z_target", "    loss = lse - z_target",
       "label smoothing's target weight 1 - s dropped", tests=["tests/test_class_parallel.py"],
       env={"L2SM_TEST_BACKENDS": "eager"}),
    _m("dist-per-row-margins-not-gathered", "l2sm_kernels/distributed/class_parallel.py",
       "    m2, m3 = (_gather_rows(v.detach(), sizes, group) if r else",
       "    m2, m3 = (v.detach().repeat(len(sizes))[: sum(sizes)] if r else",
       "per-row margins repeated from this rank instead of gathered", tests=["tests/test_class_parallel.py"],
       env={"L2SM_TEST_BACKENDS": "eager"}),
    # ------------------------------------------------------------------ scoring and metrics
    _m("topk-tie-higher-index", "l2sm_kernels/backends/topk.py",
       "low = LOW_MASK - torch.arange(first_index, first_index + s.shape[1], device=s.device, dtype=torch.int64)",
       "low = torch.arange(first_index, first_index + s.shape[1], device=s.device, dtype=torch.int64)",
       "equal scores go to the higher gallery index", tests=["tests/test_cosine_topk.py"],
       env={"L2SM_TEST_BACKENDS": "eager"}),
    _m("cpu-topk-nan-ignored", "csrc/cosine_topk.cpp",
       "return LARGEST ? ((v > thr) | ((v != v) & (thr == thr))) : ((v < thr) | ((v == v) & (thr != thr)));",
       "return LARGEST ? (v > thr) : ((v < thr) | ((v == v) & (thr != thr)));",
       "a NaN score no longer enters the running top-k (a plausible neighbour instead of NaN)",
       tests=["tests/test_cosine_topk.py"], env=_CPU),
    _m("metrics-tar-far-convention", "l2sm_kernels/metrics.py",
       'i = np.searchsorted(fpr, fars, side="right") - 1', 'i = np.minimum(np.searchsorted(fpr, fars, side="left"), len(fpr) - 1)',
       "TAR at the first FAR at or above the target instead of the largest below it (IJB)",
       tests=["tests/test_metrics.py"]),
    _m("metrics-eer-no-interpolation", "l2sm_kernels/metrics.py",
       "    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))", "    return float(fpr[i])",
       "the EER without interpolating along the ROC segment", tests=["tests/test_metrics.py"]),
]

MUTATIONS += [
    # ------------------------------------------------------------------ the triton backend (interpreted)
    _m("triton-margin-fallback", "l2sm_kernels/backends/triton/margin.py", "f = tl.where(hard, phi, c - off)",
       "f = tl.where(hard, phi, c - m3)", "the fallback c - m sin m - m3 becomes c - m3", env=_TRITON),
    _m("triton-margin-clamp", "l2sm_kernels/backends/triton/margin.py",
       "cc = tl.minimum(tl.maximum(c, -1.0 + 1e-7), 1.0 - 1e-7)", "cc = tl.minimum(tl.maximum(c, -1.0), 1.0)",
       "no clamp: the slope divides by 0 at c = 1", env=_TRITON),
    _m("triton-margin-detached", "l2sm_kernels/backends/triton/margin.py", "    if DETACHED:\n        fp = one",
       "    if False:\n        fp = one", "the detached mode keeps f'", tests=["tests/test_margins.py"], env=_TRITON),
    _m("triton-subcenter-tie-highest", "l2sm_kernels/backends/triton/common.py", "upd = (c > best) | (",
       "upd = (c >= best) | (", "sub-center ties go to the highest row", tests=["tests/test_margins.py"],
       env=_TRITON),
    _m("triton-log1p-cancels", "l2sm_kernels/backends/triton/common.py",
       "    return tl.where(w == 1.0, v, tl.log(w) * tl.div_rn(v, tl.where(w == 1.0, 1.0, w - 1.0)))",
       "    return tl.log(1.0 + v)", "a confident row's loss from log(1 + v) (cancellation)",
       tests=["tests/test_l2_softmax.py"], env=_TRITON),
    _m("triton-q-from-p", "l2sm_kernels/backends/triton/loss_forward.py",
       "q = tl.where(lead, tl.div_rn(v, 1.0 + v), tl.div_rn(1.0, 1.0 + v))",
       "q = 1.0 - tl.where(lead, tl.div_rn(1.0, 1.0 + v), tl.div_rn(v, 1.0 + v))",
       "q = 1 - p_y formed by subtraction (cancels for confident rows)", tests=["tests/test_l2_softmax.py"],
       env=_TRITON),
    _m("triton-smoothing-target-term", "l2sm_kernels/backends/triton/loss_backward.py",
       "dz_y = -w_t * q + g_lse * p_y + w_t * smoothing * (1.0 - inv_C)",
       "dz_y = -w_t * q + g_lse * p_y + w_t * smoothing",
       "label smoothing's target-column term misses its 1/C part", env=_TRITON),
    _m("triton-smoothing-unmargined-target", "l2sm_kernels/backends/triton/loss_forward.py",
       "gsum = sc + tl.where(has_t, f_y, 0.0)", "gsum = sc + tl.where(has_t, c_y, 0.0)",
       "label smoothing's mean logit takes the target's cosine without its margin", env=_TRITON),
    _m("triton-row-scale-fp32", "l2sm_kernels/backends/triton/loss_backward.py",
       "(alpha.to(tl.float64) * _LOG2E * inv_nx.to(tl.float64)).to(tl.float32)", "alpha * _LOG2E * inv_nx",
       "the dW pass's per-row scale alpha log2(e) / |x_i| rounded twice in fp32 instead of once from fp64",
       tests=["tests/test_l2_softmax.py"], env=_TRITON),
]

MUTATIONS += [
    _m("triton-fp32-always-tf32", "l2sm_kernels/backends/triton/config.py",
       'tf32 = torch.get_float32_matmul_precision() != "highest"', "tf32 = True",
       "fp32 products in tf32 whatever torch's matmul precision says (GPU-only: a CPU unit test must see it)",
       tests=["tests/test_triton_config.py"], env=_TRITON),
]

# ------------------------------------------------------------------ verification protocols and the training recipe
_VER = ["tests/test_verification.py"]
MUTATIONS += [
    _m("verification-test-not-strict", "l2sm_kernels/verification/protocols.py", "pred = np.less(dt, t)",
       "pred = np.less_equal(dt, t)", "a pair at exactly the threshold distance counted as 'same' (theirs: strict <)",
       tests=_VER),
    _m("verification-last-best-threshold", "l2sm_kernels/verification/protocols.py",
       "best = int(np.argmax((tp + tn) / int(train.sum())))",
       "best = len(tp) - 1 - int(np.argmax(((tp + tn) / int(train.sum()))[::-1]))",
       "the last of equally good thresholds instead of their first", tests=_VER),
    _m("verification-slinear-textbook", "l2sm_kernels/verification/protocols.py",
       "return float((0.0 + y[l - 1] * h0) + y[l] * h1)",
       "return float(y[l - 1] + (y[l] - y[l - 1]) * (xp - xa) / (xb - xa))",
       "VAL's threshold by another linear formula: off in the last bits from theirs", tests=_VER),
    _m("verification-unpickler-open", "l2sm_kernels/verification/bin_files.py",
       "        if (module, name) in _ALLOWED_GLOBALS:", "        if True:",
       "a .bin may name any global: a malicious file runs code", tests=_VER),
    _m("ijb-keep-intermediate", "l2sm_kernels/verification/ijb.py", "    if len(fps) > 2:", "    if False:",
       "their nearest-FPR TAR read from points sklearn's roc_curve drops", tests=_VER),
    _m("train-ddp-averages", "l2sm_kernels/train/loop.py", "        backbone.register_comm_hook(None, _sum_gradients)",
       "        pass", "DDP averages the backbone's gradients: each rank's loss is the global batch's, so the "
       "backbone learns at 1/world of the rate",
       tests=["tests/test_train.py::test_two_ranks_take_the_single_process_step"]),
    _m("train-reshard-order", "l2sm_kernels/train/checkpoint.py",
       'full = {"weight": torch.cat([f["head"]["weight"] for f in files])}',
       'full = {"weight": torch.cat([f["head"]["weight"] for f in files[::-1]])}',
       "a head resumed at another world size gets its shards in the wrong order",
       tests=["tests/test_train.py::test_resume_at_world_size_1_and_3_gives_the_same_loss"]),
]

_GEMM = ["tests/test_triton_gemm_path.py"]
MUTATIONS += [
    # ------------------------------------------------------------------ the triton backend's GEMM path (interpreted)
    _m("triton-gemm-stats-target-in-lse", "l2sm_kernels/backends/triton/row_kernels.py",
       "keep = cmask[None, :] & (cols[None, :] != tcol[:, None])", "keep = cmask[None, :] & (tcol[:, None] > -2)",
       "pass 1 counts the target column among the non-target logits (the combine adds it again)",
       tests=_GEMM, env=_TRITON),
    _m("triton-gemm-dz-smoothing", "l2sm_kernels/backends/triton/row_kernels.py",
       "w_p[:, None] * p - wts[:, None]", "w_p[:, None] * p",
       "pass 2's dz loses label smoothing's -w_t s / C on the non-target columns", tests=_GEMM, env=_TRITON),
    _m("triton-gemm-kept-offset", "l2sm_kernels/backends/triton/gemm_path.py",
       "                s = _chunk_view(aux, off, B, m * K, cdt)\n                off += regions[i]",
       "                s = _chunk_view(aux, off, B, m * K, cdt)\n                off += 0",
       "the backward reads every kept chunk's logits from the first chunk's place", tests=_GEMM, env=_TRITON),
]

# the non-target transform (issue 20): each backend's mask and slope, the class-parallel thresholds
_NEG = ["tests/test_negatives.py"]
MUTATIONS += [
    _m("eager-negatives-inclusive", "l2sm_kernels/backends/eager.py", "hard = (c > thr) & ~is_t",
       "hard = (c >= thr) & ~is_t", "a negative exactly at the row's margined target counts as hard", tests=_NEG),
    _m("eager-negatives-curricular-slope", "l2sm_kernels/backends/eager.py",
       "value, slope = c * (t + c), t + 2 * c", "value, slope = c * (t + c), t + c",
       "CurricularFace's hard-negative gradient misses a term", tests=_NEG),
    _m("cpu-negatives-inclusive", "csrc/common.h", "const bool hard = c > thr;", "const bool hard = c >= thr;",
       "a negative exactly at the row's margined target counts as hard", tests=_NEG, env=_CPU),
    _m("triton-negatives-o-unweighted", "l2sm_kernels/backends/triton/loss_forward.py",
       "                p = p * slope\n", "                p = p * 1.0\n",
       "dX ignores the transform's slope on hard negatives", tests=_NEG, env=_TRITON),
    _m("class-parallel-thresholds-local", "l2sm_kernels/distributed/class_parallel.py",
       "        dist.all_reduce(f, group=group)\n", "        pass\n",
       "shards that do not own a row's target use threshold 0 instead of its margined target cosine",
       tests=["tests/test_class_parallel.py::test_negatives_match_single_process"], env=_CPU),
]
