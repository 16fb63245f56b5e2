"""Checks specific to backend "cpu" (csrc/*.cpp, l2sm_kernels/backends/cpu.py); the shared suite
(test_l2_softmax.py) runs it against the float64 reference like every backend.

Here: the C++ schemas are the op boundary's; results do not depend on the chunk size (a tiny chunk,
a chunk that does not divide C, several threads' shares; with sub-centers too) beyond rounding and
are bitwise reproducible; confident rows (1 - p_y down to 1e-13) keep their loss and target gradient
to a small relative error; the workspace stays within its documented bound (no B x C buffer); the
thread-local state (autograd, autocast) reaches the worker threads; a bad environment knob never
breaks the import; the package works, and says why, without the extension. "Reliability case N"
refers to the numbered cases of docs/reliability.md."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.backends import registry as backends
from l2sm_kernels.backends import contract
from l2sm_kernels.options import L2SMOptions
from l2sm_kernels.testing import (ATOL_REL, available_bytes, check_case, cpu_peak_bytes, make_case, max_err, run,
                                  run_reference)

ROOT = Path(__file__).resolve().parents[1]
CPU_INFO = L.available_backends()["cpu"]

if not CPU_INFO.available:
    if "cpu" in os.environ.get("L2SM_REQUIRE_BACKENDS", "").split(","):
        pytest.fail(f"backend cpu is required (L2SM_REQUIRE_BACKENDS) but unavailable: {CPU_INFO.reason}",
                    pytrace=False)
    pytestmark = pytest.mark.skipif(True, reason=f"backend cpu unavailable: {CPU_INFO.reason}")
else:
    from l2sm_kernels import cpu


@pytest.fixture
def chunk():
    """Set the chunk size for one test, and restore the default afterwards."""
    old = cpu.get_chunk_classes()
    yield cpu.set_chunk_classes
    cpu.set_chunk_classes(old)


def _run_with_chunk(case, n, set_chunk, grad_output=None):
    set_chunk(n)
    return run(case, "cpu", grad_output)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def test_schemas_are_the_op_boundary():
    """The C++ TORCH_LIBRARY schemas are textually contract.FORWARD_SCHEMA / BACKWARD_SCHEMA."""
    assert str(torch.ops.l2sm.cpu_forward.default._schema) == "l2sm::cpu_forward" + contract.FORWARD_SCHEMA
    assert str(torch.ops.l2sm.cpu_backward.default._schema) == "l2sm::cpu_backward" + contract.BACKWARD_SCHEMA
    assert contract.OPS["cpu"] == (torch.ops.l2sm.cpu_forward.default, torch.ops.l2sm.cpu_backward.default)


@pytest.mark.parametrize("dtypes", [{torch.float32}, {torch.float64}, {torch.bfloat16, torch.float32},
                                    {torch.float16}])
def test_auto_picks_cpu_for_cpu_tensors(dtypes):
    assert backends.resolve("auto", "cpu", dtypes) == "cpu"
    assert CPU_INFO.devices == ("cpu",)


def test_op_rejects_bad_arguments_clearly():
    """Called below the public API, the op still names what is wrong instead of reading out of bounds."""
    fwd, bwd = torch.ops.l2sm.cpu_forward.default, torch.ops.l2sm.cpu_backward.default
    x, w, t, a = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), torch.tensor(2.0)
    needs = (False, False, False, False)  # no gradient hints
    tensors, args = (None, None, None), L2SMOptions().op_args()  # margins, smoothing, negatives; the options

    def call(x=x, w=w, t=t, a=a, b=None, tensors=tensors, args=args):
        return fwd(x, w, t, a, b, *tensors, *args, *needs)

    with pytest.raises(RuntimeError, match="weight must be"):
        call(w=torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="target must be int64"):
        call(t=t.int())
    with pytest.raises(RuntimeError, match="bias must be"):
        call(b=torch.randn(4))
    with pytest.raises(RuntimeError, match="margin_kind must be"):
        call(args=(False, "sphereface") + args[2:])
    # alpha of one element but not 0-d: grad_alpha would not have alpha's shape (the fake kernel's)
    with pytest.raises(RuntimeError, match=r"alpha must be a 0-d floating tensor, got shape \[1\]"):
        call(a=a.reshape(1))
    with pytest.raises(RuntimeError, match="alpha must be a 0-d floating tensor"):
        call(a=torch.tensor(2))
    # the margin table: present for a margin, float64 (1, 5) or (B, 5); sub-centers divide W's rows
    angular = L2SMOptions(margin_type="arcface", margin=0.5)
    table, _, _ = angular.op_tensors(3, "cpu")
    with pytest.raises(RuntimeError, match="margin_kind 'angular' needs the margins table"):
        call(args=angular.op_args())
    for bad in (table.float(), table[:, :4], torch.cat([table] * 2)):
        with pytest.raises(RuntimeError, match=r"margins must be a float64 CPU tensor of shape \(1, 5\) or \(3, 5\)"):
            call(tensors=(bad, None, None), args=angular.op_args())
    with pytest.raises(RuntimeError, match="label_smoothing must be None or a 0-d floating CPU tensor"):
        call(tensors=(None, torch.tensor([0.1]), None))
    with pytest.raises(RuntimeError, match="not a multiple of subcenters = 2"):
        call(args=(False, "none", False, 2, -100, 1e-12, "none", None))
    with pytest.raises(RuntimeError, match=r"bias must be \(5,\) \(one per class\)"):
        call(w=torch.randn(10, 4), b=torch.randn(10), args=(False, "none", False, 2, -100, 1e-12, "none", None))
    with pytest.raises(RuntimeError, match="max_logits_bytes must be None or >= 0"):
        call(args=args[:-1] + (-1,))
    loss, lse, aux = call()
    assert aux.shape == (3,) and aux.dtype == torch.float32  # q = 1 - p_y per row (nothing kept: no gradient)
    with pytest.raises(RuntimeError, match=r"alpha must be a 0-d floating tensor, got shape \[1\]"):
        bwd(torch.ones(3), torch.zeros(3), x, w, t, a.reshape(1), None, *tensors, lse, aux, *args, True, True, False,
            True)
    with pytest.raises(RuntimeError, match=r"aux must be the \(B \+ R C K,\) tensor cpu_forward returned"):
        bwd(torch.ones(3), torch.zeros(3), x, w, t, a, None, *tensors, lse, aux[:0], *args, True, True, False, True)


# ---------------------------------------------------------------------------------------------
# chunking: results independent of the chunk size (reliability case 16), deterministic (21)
# ---------------------------------------------------------------------------------------------
CHUNKS = [1, 7, 64, 0]  # 1 class; 7 does not divide C = 257; 64; the default (one chunk here)


@pytest.mark.parametrize("n", CHUNKS)
@pytest.mark.parametrize("combo", [
    dict(margin_type="arcface", margin=0.5, normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=2,
         alpha_grad=True, reduction="none"),
    dict(margin_type="cosface", margin=0.35, normalize_weight=False, bias=False, reduction="sum"),
    dict(margin_type="none", margin=0.0, normalize_weight=True, bias=True, alpha_grad=True, reduction="mean"),
], ids=["arcface-nw-b-ls", "cosface", "none-nw-b"])
def test_chunk_size_against_reference(chunk, n, combo):
    """Every chunk size meets the accuracy relation against the float64 reference, including one
    class per chunk (257 chunks) where dW, db and the row statistics are assembled from the most
    pieces."""
    chunk(n)
    case = make_case(11, 24, 257, seed=31, **combo)
    g = torch.randn(11, generator=torch.Generator().manual_seed(2)) if combo["reduction"] == "none" else None
    check_case(case, "cpu", g)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                          (torch.float16, torch.float16)])
def test_chunk_size_independence(chunk, dtype, wdtype):
    """The same call with chunks of 1, 7, 64 and the default: equal up to rounding, at the level of
    the compute dtype (float64: ~1e-14; float32: ~1e-6 relative)."""
    case = make_case(13, 40, 263, dtype=dtype, wdtype=wdtype, seed=32, bias=True, alpha_grad=True,
                     normalize_weight=True, margin_type="arcface", margin=0.3, label_smoothing=0.1,
                     ignore_rows=1, reduction="none")
    go = torch.randn(13, generator=torch.Generator().manual_seed(3))
    base_out, base_g = _run_with_chunk(case, 0, chunk, go)
    tol = 1e-12 if torch.float64 in (dtype, wdtype) else 2e-5
    for n in (1, 7, 64):
        out, grads = _run_with_chunk(case, n, chunk, go)
        assert out.dtype == base_out.dtype
        assert max_err(out, base_out) <= tol * base_out.abs().max(), n
        for k, g in grads.items():
            assert g.dtype == base_g[k].dtype
            # low-precision gradients: one rounding of a value that differs in the last fp32 bits
            rel = tol if g.dtype in (torch.float32, torch.float64) else 2 ** -7
            assert max_err(g, base_g[k]) <= rel * base_g[k].abs().max() + 1e-30, (n, k)


@pytest.mark.parametrize("n", [1, 7, 0])
def test_subcenters_chunked_against_reference(chunk, n):
    """K = 3 sub-centers with per-row margins: a chunk of 1 class (3 rows of W), 7 classes (not
    dividing C = 61) and the default, against the float64 reference; and the chunks agree with each
    other up to fp32 rounding."""
    m2 = torch.rand(11, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.5
    case = make_case(11, 24, 61, seed=36, subcenters=3, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="combined", margin=(1.0, m2, 0.15), label_smoothing=0.1, ignore_rows=1,
                     reduction="none")
    go = torch.randn(11, generator=torch.Generator().manual_seed(7))
    chunk(n)
    check_case(case, "cpu", go)
    out, grads = run(case, "cpu", go)
    base_out, base_g = _run_with_chunk(case, 0, chunk, go)
    assert max_err(out, base_out) <= 2e-5 * base_out.abs().max()
    for k in grads:
        assert max_err(grads[k], base_g[k]) <= 2e-5 * base_g[k].abs().max(), k


def test_subcenter_losers_get_exactly_zero(chunk):
    """Only each class's winning sub-center (per row) receives gradient: the sub-centers that no row
    picks (those with an exactly zero row in the float64 reference's dW, autograd through max) get an
    exactly zero dW row, and the others do not, whatever the chunking."""
    K, C, D = 4, 40, 16
    case = make_case(6, D, C, seed=37, subcenters=K, normalize_weight=True, margin_type="arcface", margin=0.3)
    # the winners are decided on computed cosines: no two sub-centers of a class within fp32 rounding of
    # each other for any row, so every BLAS (and the float64 reference) picks the same winner
    cos = (torch.nn.functional.normalize(case.x.double(), dim=1)
           @ torch.nn.functional.normalize(case.weight.double(), dim=1).T).view(6, C, K)
    top2 = cos.topk(2, dim=2).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-5
    for n in (1, 7, 0):
        chunk(n)
        _, grads = run(case, "cpu")
        _, ref = run_reference(case, True)
        dw, rdw = grads["weight"].view(C, K, D), ref["weight"].view(C, K, D)
        zero_ref = rdw.abs().amax(dim=2) == 0
        assert torch.equal(dw.abs().amax(dim=2) == 0, zero_ref), n
        assert zero_ref.any()


def test_bias_and_alpha_grads_at_large_batch():
    """db and d alpha sum B = 65536 rows per class (C = 16, mean reduction: grad_loss = 1/B): the
    per-class sums are accumulated in double, so their error stays at plain torch's (summed in fp32
    they were 100-1000x plain torch's error, failing the relation)."""
    case = make_case(65536, 8, 16, seed=40, bias=True, alpha_grad=True, normalize_weight=True, weight_scale=1.0,
                     alpha=10.0, reduction="mean")
    check_case(case, "cpu")


def test_weight_rows_of_huge_norm():
    """normalize_weight with weight rows of norm 1e25 and 1e20 (targets of some rows): their dW (about
    1e-25 / 1e-20) keeps fp32's relative accuracy, row by row: the normalization backward goes
    through W_hat, never through 1 / |W|^2 (which underflowed in fp32, losing the projection: relative
    error 0.4). Plain torch in fp32 returns zero rows there (|W|^2 overflows), so these rows are held to
    the relation's atol alone, relative to each row's own scale, as assert_accurate does when plain
    torch breaks; the rest of the call to the accuracy relation."""
    case = make_case(12, 32, 53, seed=41, bias=True, normalize_weight=True, reduction="none")
    rows = {5: 1e25, 17: 1e20}
    with torch.no_grad():
        for j, n in rows.items():
            case.weight[j] *= n / case.weight[j].norm()
    case.target[:3] = torch.tensor([5, 17, 5])
    go = torch.randn(12, generator=torch.Generator().manual_seed(5))
    check_case(case, "cpu", go)
    _, grads = run(case, "cpu", go)
    _, ref = run_reference(case, True, go)
    for j in rows:
        scale = float(ref["weight"][j].abs().max())
        assert scale > 0
        assert max_err(grads["weight"][j], ref["weight"][j]) <= ATOL_REL[torch.float32] * scale, j


@pytest.mark.parametrize("K", [1, 3])
def test_bitwise_deterministic(chunk, K):
    """Reliability case 21: the same inputs twice give bitwise-identical outputs, whatever the chunk size
    (several threads' shares included); with sub-centers and per-row margins too."""
    margin = (1.0, torch.linspace(0.1, 0.5, 16, dtype=torch.float64), 0.1) if K > 1 else 0.4
    case = make_case(16, 24, 301, seed=33, bias=True, alpha_grad=True, normalize_weight=True, subcenters=K,
                     margin_type="combined" if K > 1 else "arcface", margin=margin, label_smoothing=0.1,
                     ignore_rows=2)
    for n in (0, 7, 50):
        o1, g1 = _run_with_chunk(case, n, chunk, torch.tensor(2.0))
        o2, g2 = _run_with_chunk(case, n, chunk, torch.tensor(2.0))
        assert torch.equal(o1, o2)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), (n, k)


def test_thread_count_changes_rounding_only(chunk):
    """One thread or several: the same values up to fp32 rounding (the per-thread shares of the
    classes are combined in thread order)."""
    chunk(16)
    case = make_case(10, 32, 200, seed=34, bias=True, alpha_grad=True, normalize_weight=True, reduction="none")
    go = torch.randn(10, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1, g1 = run(case, "cpu", go)
        torch.set_num_threads(max(threads, 2))
        o2, g2 = run(case, "cpu", go)
    finally:
        torch.set_num_threads(threads)
    assert max_err(o1, o2) <= 2e-5 * o1.abs().max()
    for k in g1:
        assert max_err(g1[k], g2[k]) <= 2e-5 * g1[k].abs().max(), k


def test_worker_threads_see_autocast_and_autograd_state(chunk):
    """The worker threads run their ATen calls with the caller's thread-local state: below autograd
    (weights that require grad are fine) and without autocast (fp32 inputs under a bf16 autocast give
    exactly the fp32 result, not bf16-rounded logits)."""
    chunk(8)
    case = make_case(6, 16, 97, seed=35, bias=True)
    out, grads = run(case, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, grads_ac = run(case, "cpu")
    assert torch.equal(out, out_ac)
    for k in grads:
        assert torch.equal(grads[k], grads_ac[k]), k


# Inputs where the float32 exp was 1.0001-1.023 ulp off when its polynomial was contracted to FMAs (the
# AVX2 / AVX-512 clones without -ffp-contract=off), found by an exhaustive sweep of the floats in [-110, 90]
EXP_FMA_WORST = [4.52412748, 15.5983257, 15.6345816, 26.7169456, 26.7384529, 48.1866379, 80.8070602, 80.8105316,
                 -5.83354902, -5.86418819, -5.89112949, -16.9646797, -38.4142113, -49.522274, -59.9042435,
                 -71.0282211, -82.1143112]


def test_exp_f32_accuracy():
    """The kernels' vectorized float32 exp (the variant this CPU dispatches to): within 1 ulp of the
    float64 exp over the whole float range (a grid, and the points where an FMA-contracted build
    exceeded 1 ulp), subnormal results rounded (not flushed), and the special values of torch.exp."""
    from l2sm_kernels import _C

    x = torch.cat([torch.linspace(-110.0, 90.0, 400_001), torch.tensor(EXP_FMA_WORST)])
    y = torch.tensor(_C._exp_f32(x.tolist()), dtype=torch.float32).double()
    ref = torch.exp(x.double())
    normal = (ref > torch.finfo(torch.float32).tiny) & (ref < torch.finfo(torch.float32).max)
    ulp = torch.exp2(torch.floor(torch.log2(ref[normal])) - 23)  # float32 spacing at the value
    assert float(((y[normal] - ref[normal]).abs() / ulp).max()) <= 1.0
    sub = (ref > 0) & ~normal & (ref < 1)
    assert float((y[sub] - ref[sub]).abs().max()) <= 2.0 ** -149  # within one subnormal step
    special = [-math.inf, math.inf, math.nan, 0.0, -104.5, 88.73]
    got = _C._exp_f32(special)
    assert got[:2] == [0.0, math.inf] and math.isnan(got[2]) and got[3:] == [1.0, 0.0, math.inf]


# ---------------------------------------------------------------------------------------------
# the knobs
# ---------------------------------------------------------------------------------------------
def test_chunk_knobs(chunk):
    if not os.environ.get("L2SM_CPU_CHUNK"):
        assert cpu.get_chunk_classes() == 0  # default: from the budget
    if not os.environ.get("L2SM_CPU_WORKSPACE_MB"):
        assert cpu.get_workspace_bytes() == cpu._ext().DEFAULT_WORKSPACE_BYTES == 4 << 20
    old = cpu.get_workspace_bytes()
    try:
        cpu.set_workspace_bytes(4 << 20)
        chunk(0)
        # budget / ((B + D) x 4 bytes), a multiple of 64, at most C
        assert cpu.chunk_for(256, 65536, 512) == (4 << 20) // ((256 + 512 + 1) * 4) // 64 * 64 == 1344
        assert cpu.chunk_for(256, 100, 512) == 100
        assert cpu.chunk_for(100_000, 10**6, 512) == 64
        assert cpu.chunk_for(256, 65536, 512, torch.float64) == 640
        # K sub-centers: the budget counts B x chunk x K values (chunk K rows of W), classes a multiple of 64
        assert cpu.chunk_for(256, 65536, 512, subcenters=3) == (4 << 20) // (769 * 4) // 3 // 64 * 64 == 448
        assert cpu.chunk_for(256, 65536, 512, subcenters=1000) == 64  # at least 64 classes
        assert cpu._ext()._split(256, 65536, 512, 4, 2, 3)[0] == 448
        chunk(7)
        assert cpu.get_chunk_classes() == 7 and cpu.chunk_for(256, 65536, 512) == 7
        assert cpu.chunk_for(256, 65536, 512, subcenters=3) == 7  # a fixed chunk is in classes
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="chunk_classes must be an int >= 0"):
                cpu.set_chunk_classes(bad)
        cpu.set_workspace_bytes(1 << 20)
        chunk(0)
        assert cpu.chunk_for(256, 65536, 512) == (1 << 20) // (769 * 4) // 64 * 64
        with pytest.raises(ValueError, match="workspace_bytes must be an int > 0"):
            cpu.set_workspace_bytes(0)
    finally:
        cpu.set_workspace_bytes(old)


@pytest.mark.parametrize("C,threads,chunk_size", [
    (10000, 16, 0),    # 8 default chunks of 1344 for 16 threads: every thread still gets a share
    (4032, 2, 0),      # 3 chunks for 2 threads: equal shares, not 1 chunk and 2
    (65536, 2, 0), (65536, 16, 0), (257, 4, 7), (100, 16, 0), (31, 8, 0), (33, 8, 0), (16, 4, 0), (1, 4, 0),
    (0, 4, 0),
])
def test_every_thread_gets_an_equal_share(chunk, C, threads, chunk_size):
    """The classes are split into one contiguous share per thread (in units of 16 classes) whatever
    the chunk size; only below 2 units per call does a single worker run (with threaded BLAS)."""
    chunk(chunk_size)
    size, ranges = cpu._ext()._split(256, C, 512, 4, threads)
    assert size == cpu.chunk_for(256, C, 512)
    assert len(ranges) == max(1, min(threads, C // 16))
    assert ranges[0][0] == 0 and ranges[-1][1] == C
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    if C >= 16:
        # whole units of 16 classes each, the last share also takes the C mod 16 left over
        assert min(sizes) >= 16 and max(sizes) - min(sizes) < 32, sizes
        assert all(n % 16 == 0 for n in sizes[:-1])


def _subprocess(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    e.pop("L2SM_REQUIRE_BACKENDS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def test_env_knobs():
    r = _subprocess("import l2sm_kernels.cpu as c, l2sm_kernels; print(c.get_chunk_classes(), c.get_workspace_bytes())",
                    L2SM_CPU_CHUNK="96", L2SM_CPU_WORKSPACE_MB="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["96", str(2 << 20)]
    assert "RuntimeWarning" not in r.stderr


_KNOBS = """
import warnings
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    import torch, l2sm_kernels as L
import l2sm_kernels.backends.cpu as c
print("AVAILABLE", L.available_backends()["cpu"].available)
print("KNOBS", c.get_chunk_classes(), c.get_workspace_bytes())
for name, note in sorted(c.knob_notes.items()):
    print("NOTE", name, "|", note)
for r in rec:
    if issubclass(r.category, RuntimeWarning):
        print("WARNING", r.message)
x, w = torch.randn(4, 8), torch.randn(100, 8)
t = torch.tensor([0, 1, 2, 3])
print("LOSS", bool(torch.isfinite(L.l2_softmax_loss(x, w, t, backend="cpu"))))
"""

DEFAULT_WS = 4 << 20
MAX_WS, MAX_CHUNK = 1 << 40, 1 << 40


# Pairs of (L2SM_CPU_WORKSPACE_MB, L2SM_CPU_CHUNK) values (one process each; "" = unset), the workspace and chunk
# the backend then has, and what the note of each bad one says.
BAD_KNOBS = [
    ("inf", "99999999999999999999", DEFAULT_WS, MAX_CHUNK,
     "ignored (not a finite number of MiB)", f"above the maximum; clamped to {MAX_CHUNK} classes"),
    ("1e20", "-5", MAX_WS, 0,
     "above the maximum of 1048576 MiB (1 TiB); clamped to it", "ignored (negative (0 means: from the workspace budget))"),
    ("nan", "1.5", DEFAULT_WS, 0, "ignored (not a finite number of MiB)", "ignored (not an integer number of classes)"),
    ("-3", "lots", DEFAULT_WS, 0, "ignored (not positive)", "ignored (not an integer number of classes)"),
    ("1e-9", "", DEFAULT_WS, 0, "ignored (less than one byte)", None),
    ("four", "96", DEFAULT_WS, 96, "ignored (not a number of MiB)", None),
]


@pytest.mark.parametrize("ws,chunk_value,workspace,chunk_classes,ws_why,chunk_why", BAD_KNOBS,
                         ids=[f"{w}|{c}" for w, c, *_ in BAD_KNOBS])
def test_bad_env_knob_never_breaks_the_import(ws, chunk_value, workspace, chunk_classes, ws_why, chunk_why):
    """Issue 11 item 9: a bad tuning variable leaves `import l2sm_kernels` working and the cpu backend
    available, with that knob at its default (or clamped to its documented maximum, for a valid but
    too large value); a RuntimeWarning at load names the variable and the value, and
    l2sm_kernels.backends.cpu.knob_notes keeps the reason. (Before: inf raised OverflowError, 1e20 and
    the 20-digit chunk a TypeError from pybind, text made the backend unavailable.)"""
    r = _subprocess(_KNOBS, L2SM_CPU_WORKSPACE_MB=ws, L2SM_CPU_CHUNK=chunk_value)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "AVAILABLE True" in out and "LOSS True" in out, out
    assert f"KNOBS {chunk_classes} {workspace}" in out, out
    for name, value, why in (("L2SM_CPU_WORKSPACE_MB", ws, ws_why), ("L2SM_CPU_CHUNK", chunk_value, chunk_why)):
        note = f"{name}={value!r}"
        if why is None:
            assert f"NOTE {name}" not in out and note not in out, out
            continue
        assert f"NOTE {name} | {note}" in out and why in out, out
        assert f"WARNING l2sm_kernels: {note}" in out, out


def test_bad_env_knob_under_warnings_as_errors():
    """-W error: the warning cannot be shown (it would raise inside the import); the import still
    succeeds and knob_notes says what was ignored."""
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             L2SM_CPU_WORKSPACE_MB="inf")
    e.pop("L2SM_REQUIRE_BACKENDS", None)
    code = ("import l2sm_kernels as L, l2sm_kernels.backends.cpu as c; "
            "print(L.available_backends()['cpu'].available, c.get_workspace_bytes(), sorted(c.knob_notes))")
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", str(DEFAULT_WS), "['L2SM_CPU_WORKSPACE_MB']"]


def test_knob_setters_refuse_out_of_range(chunk):
    """The Python setters raise a ValueError naming the knob for values beyond the maxima (pybind
    would raise a TypeError past 2^63)."""
    old = cpu.get_workspace_bytes()
    try:
        cpu.set_workspace_bytes(cpu.MAX_WORKSPACE_BYTES)
        cpu.set_chunk_classes(cpu.MAX_CHUNK_CLASSES)
        assert cpu.chunk_for(256, 1000, 512) == 1000
        for big in (cpu.MAX_WORKSPACE_BYTES + 1, 10**20):
            with pytest.raises(ValueError, match="workspace_bytes must be an int > 0"):
                cpu.set_workspace_bytes(big)
        with pytest.raises(ValueError, match="chunk_classes must be an int >= 0"):
            cpu.set_chunk_classes(10**20)
        assert cpu.MAX_WORKSPACE_BYTES == cpu._ext().MAX_WORKSPACE_BYTES
        assert cpu.MAX_CHUNK_CLASSES == cpu._ext().MAX_CHUNK_CLASSES
    finally:
        cpu.set_workspace_bytes(old)


# ---------------------------------------------------------------------------------------------
# without the extension: importable, says why, "auto" falls back once
# ---------------------------------------------------------------------------------------------
_MISSING = """
import sys, warnings
sys.modules["l2sm_kernels._C"] = None  # as if it had not been built
import torch, l2sm_kernels as L
info = L.available_backends()["cpu"]
assert not info.available and info.devices == (), info
print("REASON", info.reason)
x, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    a = L.l2_softmax_loss(x, w, t)
    b = L.l2_softmax_loss(x, w, t)
msgs = [str(r.message) for r in rec if "eager fallback" in str(r.message)]
assert len(msgs) == 1, msgs
print("WARNING", msgs[0])
assert torch.equal(a, L.l2_softmax_loss(x, w, t, backend="eager")) and torch.equal(a, b)
try:
    L.l2_softmax_loss(x, w, t, backend="cpu")
except ValueError as e:
    print("ERROR", e)
"""


def test_missing_extension_is_reported_once():
    r = _subprocess(_MISSING)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "REASON BackendUnavailable: l2sm_kernels._C is not built: run `pip install --no-build-isolation -e .`" in out
    assert "WARNING l2sm_kernels: backend 'auto' uses the eager fallback for cpu tensors" in out
    assert "not built" in out.split("WARNING", 1)[1]
    assert "ERROR backend='cpu' cannot run on cpu tensors here" in out


_BROKEN = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "l2sm_kernels._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c106detail14torchCheckFail (test)")
sys.meta_path.insert(0, Broken())
import l2sm_kernels as L
print("REASON", L.available_backends()["cpu"].reason)
"""


def test_broken_extension_says_rebuild():
    r = _subprocess(_BROKEN)
    assert r.returncode == 0, r.stderr
    assert "l2sm_kernels._C is built but cannot be loaded" in r.stdout
    assert "undefined symbol" in r.stdout and "rebuild it against torch" in r.stdout


# ---------------------------------------------------------------------------------------------
# memory: the workspace, never a B x C buffer (reliability case 22)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 3])
def test_peak_memory_is_the_workspace(chunk, K):
    """Forward + backward allocate the gradients plus the documented workspace: per thread a
    B x chunk x K buffer, chunk-length vectors and (backward) a (B, D) dX accumulator, plus x_hat and
    B-vectors (lse, aux, the per-row statistics). With B x C four times larger than that, any B x C
    buffer would show. K = 3 sub-centers: a chunk of 256 classes is 768 rows of W. max_logits_bytes=0:
    nothing kept between the passes (tests/test_memory_dial.py bounds what the dial adds)."""
    B, D, C = 64, 32, 20000 // K
    chunk(256)
    g = torch.Generator().manual_seed(36)
    x = torch.randn(B, D, generator=g).requires_grad_()
    w = torch.randn(C * K, D, generator=g).requires_grad_()
    t = torch.randint(0, C, (B,), generator=g)

    def step():
        L.l2_softmax_loss(x, w, t, backend="cpu", normalize_weight=True, subcenters=K, margin_type="arcface",
                          margin=0.5, max_logits_bytes=0).backward()

    step()
    x.grad = w.grad = None
    peak = cpu_peak_bytes(step)
    grads = (x.numel() + w.numel()) * 4
    threads = torch.get_num_threads()
    # per thread and row of W in a chunk: inverse norm, norm (4 bytes each); per class: bias (4), the
    # db and d alpha sums (8 bytes each): 4 x (2 K + 5) bytes
    bound = threads * (B * 256 * K + (2 * K + 5) * 256 + B * D) * 4 + 4 * B * D * 4 + 64 * B * 8 + (1 << 16)
    assert peak - grads <= bound, (peak - grads, bound)
    assert bound < B * C * K * 4 / 4


# ---------------------------------------------------------------------------------------------
# int64 indexing (reliability case 1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_more_than_2_pow_31_weight_elements():
    """W of 4,194,320 x 512 bf16 (C * D > 2^31 elements, 4.3 GB): rows whose targets lie past element
    2^31 get the right loss and feature gradient (the reference is computed a slice at a time)."""
    C, D, B = 4_194_320, 512, 3
    if available_bytes() < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free memory")
    g = torch.Generator().manual_seed(37)
    w = torch.empty(C, D, dtype=torch.bfloat16).uniform_(-0.1, 0.1, generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([C - 1, C - 2, (1 << 31) // D + 5])
    out = L.l2_softmax_loss(x, w, t, backend="cpu", normalize_weight=True, reduction="sum")
    (gx,) = torch.autograd.grad(out, [x])
    # float64 reference in one pass over slices of classes (|z| <= 16: no max shift needed):
    # lse_i = log sum_j e^z_ij; dx_hat_i = 16 (sum_j p_ij W_hat_j - W_hat_t)
    xd = x.detach()
    x_norm = xd.norm(dim=1, keepdim=True)
    x_hat = xd / x_norm
    sum_e = torch.zeros(B, dtype=torch.float64)
    sum_ew = torch.zeros(B, D, dtype=torch.float64)
    for c0 in range(0, C, 1 << 16):
        w_hat = torch.nn.functional.normalize(w[c0:c0 + (1 << 16)].double(), dim=1)
        e = torch.exp(16.0 * x_hat @ w_hat.T)
        sum_e += e.sum(1)
        sum_ew += e @ w_hat
    w_hat_t = torch.nn.functional.normalize(w[t].double(), dim=1)
    ref = (torch.log(sum_e) - 16.0 * (x_hat * w_hat_t).sum(1)).sum()
    assert abs(float(out.detach()) - float(ref)) <= 1e-9 * abs(float(ref))
    dx_hat = 16.0 * (sum_ew / sum_e[:, None] - w_hat_t)
    ref_dx = (dx_hat - x_hat * (x_hat * dx_hat).sum(1, keepdim=True)) / x_norm
    assert max_err(gx, ref_dx) <= 1e-9 * float(ref_dx.abs().max())
