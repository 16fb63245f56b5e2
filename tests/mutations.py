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
       "float32 norms overflow past 1.8e19", tests=["tests/test_l2_softmax.py", "tests/test_api.py"]),
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
       "ignored rows keep their (global) target in the sample's index space", tests=["tests/test_module.py"]),
    # ------------------------------------------------------------------ the module and the heads
    _m("module-alpha-floor", "l2sm_kernels/module.py", 'return self._parameters["alpha_raw"].exp() + self.alpha_min',
       'return self._parameters["alpha_raw"].exp()', "a learned alpha loses its floor",
       tests=["tests/test_module.py"]),
    _m("module-extra-state-ignored", "l2sm_kernels/module.py", "        if diffs:\n            raise RuntimeError(",
       "        if False:\n            raise RuntimeError(", "checkpoints with other options load silently",
       tests=["tests/test_module.py"]),
    _m("heads-adaface-sign", "l2sm_kernels/heads.py", "return (1.0, -self.m * g, self.m + self.m * g)",
       "return (1.0, self.m * g, self.m + self.m * g)", "AdaFace's angular margin with the wrong sign",
       tests=["tests/test_heads.py"]),
    _m("heads-magface-slope", "l2sm_kernels/heads.py",
       "return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m",
       "return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_m) + self.l_m",
       "MagFace's margin line shifted", tests=["tests/test_heads.py"]),
]
