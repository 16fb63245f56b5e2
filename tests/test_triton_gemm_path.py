"""The triton backend's GEMM path (l2sm_kernels/backends/triton/gemm_path.py): library GEMMs per class chunk
with Triton row kernels, its logits kept while max_logits_bytes allows. Without CUDA it runs under the Triton
interpreter with CPU GEMMs (conftest sets TRITON_INTERPRET=1), in chunks of 16 classes, so the tests' C = 37
takes three chunks (a ragged last one) and two column splits of the statistics kernel.

- the option matrix (the interpreter's all-pairs subset of tests/test_l2_softmax.py) against float64 with the
  dial at 0 (every chunk recomputed), partial (the first chunk kept) and all; the non-target transforms
  (tests/test_negatives.py's matrix) at 0 and all, and in bf16
- bf16, fp16 and mixed dtypes against float64; the three dials agree with each other
- what is kept is what the dial allows (aux's size), nothing else grows with B x C, W is never copied whole
- the backward never writes into aux (a second backward gives the same gradients), nor into the inputs
- an aux of another path or plan is a clear error; the public keyword max_logits_bytes reaches the path
- on CUDA: a training step captured in a CUDA graph and replayed matches the eager step
"""
import os
import subprocess
import sys

import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.testing import check_case, make_case, max_err
from test_l2_softmax import _case_from_combo, _combo_id, _grad_output, _pairwise_combos
from test_negatives import PAIRWISE as NEG_PAIRWISE
from test_negatives import _case as _neg_case
from test_negatives import _grad_output as _neg_grad_output
from test_negatives import _id as _neg_id
from test_triton_backend import _TRACE_SCRIPT, _unrecorded

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter",
                                        "ignore::DeprecationWarning:triton.runtime.interpreter",
                                        "ignore:.*normalize_weight=False takes arccos.*:UserWarning")
CUDA = torch.cuda.is_available()
DIALS = ("zero", "partial", "all")


@pytest.fixture(scope="module")
def G():
    info = L.available_backends()["triton"]
    if not info.available:
        pytest.skip(f"backend triton unavailable: {info.reason}")
    from l2sm_kernels.backends.triton import config, gemm_path
    return config, gemm_path


@pytest.fixture
def gemm(G, monkeypatch):
    """The GEMM path for the test's calls through the public API; -> a record of the chunks each forward kept."""
    config, gemm_path = G
    monkeypatch.setattr(config, "_PATH", "gemm")
    kept = []
    real = gemm_path.kept_chunks

    def spy(*a, **k):
        kept.append(real(*a, **k))
        return kept[-1]

    monkeypatch.setattr(gemm_path, "kept_chunks", spy)
    return kept


def _dev():
    from l2sm_kernels.backends import triton_interpreted
    return "cpu" if triton_interpreted() else "cuda"


def _set_dial(G, monkeypatch, dial, B, C, K, esize):
    """The default budget for this test (the public API passes None): 0, about half of B x C (the first
    16-class chunk of three fits), or everything."""
    _, gemm_path = G
    value = {"zero": 0, "partial": B * C * K * esize // 2, "all": 1 << 62}[dial]
    monkeypatch.setattr(gemm_path, "DEFAULT_MAX_LOGITS_BYTES", value)


def _expected_kept(dial, n_chunks):
    return {"zero": 0, "partial": 1, "all": n_chunks}[dial]


# ---------------------------------------------------------------------------------------------
# the option matrix against float64, at each dial
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dial", DIALS)
@pytest.mark.parametrize("combo", _pairwise_combos(), ids=_combo_id)
def test_options_match_reference(G, gemm, monkeypatch, combo, dial):
    dev = _dev()
    case = _case_from_combo(combo, dev)
    _set_dial(G, monkeypatch, dial, 9, 37, combo["subcenters"], 4)
    check_case(case, "triton", _grad_output(case))
    if dev == "cpu":  # the interpreter's chunks of 16 classes: 3 chunks at C = 37
        assert gemm and gemm[0] == _expected_kept(dial, 3), gemm


@pytest.mark.parametrize("dial", DIALS)
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, None), (torch.float16, None),
                                          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtypes_match_reference(G, gemm, monkeypatch, dtype, wdtype, dial):
    """bf16 x bf16 runs the products in bf16 (the kept logits and dloss/dc in bf16, 2 bytes each), everything
    else in fp32; each gradient in its input's dtype."""
    B, C = 12, 41
    es = 2 if dtype == (wdtype or dtype) == torch.bfloat16 else 4
    _set_dial(G, monkeypatch, dial, B, C, 1, es)
    case = make_case(B, 32, C, dtype=dtype, wdtype=wdtype, device=_dev(), seed=5, bias=True, alpha_grad=True,
                     margin_type="arcface", margin=0.5, normalize_weight=True, label_smoothing=0.05, ignore_rows=1)
    check_case(case, "triton", torch.tensor(3.0, device=_dev()))


@pytest.mark.parametrize("dial", ("zero", "all"))
@pytest.mark.parametrize("combo", NEG_PAIRWISE, ids=_neg_id)
def test_negatives_match_reference(G, gemm, monkeypatch, combo, dial):
    """The non-target transforms (negatives mv / curricular / filter) in the row kernels: pass 1's statistics
    and pass 2's dloss/dc read N(c) and N'(c) (row_kernels._nontarget_cos), against float64 over
    test_negatives.py's option matrix, every chunk recomputed or every chunk kept."""
    dev = _dev()
    case = _neg_case(combo, dev)
    _set_dial(G, monkeypatch, dial, 9, 37, combo["subcenters"], 4)
    check_case(case, "triton", _neg_grad_output(case))
    if dev == "cpu":
        assert gemm and gemm[0] == _expected_kept(dial, 3), gemm


@pytest.mark.parametrize("kind,t", [("mv", 1.2), ("curricular", 0.3), ("filter", 0.2)])
def test_negatives_bf16_match_reference(G, gemm, monkeypatch, kind, t):
    """bf16 products (the kept logits and dloss/dc in bf16) with each transform, against float64."""
    _set_dial(G, monkeypatch, "partial", 6, 37, 1, 2)
    combo = dict(negatives=(kind, t), margin=("arcface", 0.5), subcenters=1, normalize_weight=True, bias=True,
                 label_smoothing=0.1, ignore_rows=1, reduction="none", alpha_grad=True)
    case = _neg_case(combo, _dev(), dtype=torch.bfloat16, B=6, D=16, C=37)
    check_case(case, "triton", _neg_grad_output(case))


@pytest.mark.parametrize("subc", [1, 2])
def test_dials_agree(G, gemm, monkeypatch, subc):
    """Kept or recomputed, a chunk's cosines are the same GEMM's: the three dials give the same loss and
    gradients up to the summation order of the library GEMMs (not compared bit for bit)."""
    case = make_case(9, 20, 37, device=_dev(), seed=7, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="combined", margin=(1.0, 0.3, 0.1), label_smoothing=0.1, ignore_rows=2,
                     subcenters=subc, reduction="sum")
    from l2sm_kernels.testing import run
    results = []
    for dial in DIALS:
        _set_dial(G, monkeypatch, dial, 9, 37, subc, 4)
        out, grads = run(case, "triton", torch.tensor(2.0, device=_dev()))
        results.append([out] + [grads[k] for k in sorted(grads)])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert max_err(a, b) <= 2e-5 * max(float(b.abs().max()), 1e-30)


def test_public_api_default_reaches_the_gemm_path(G, gemm):
    """With the path chosen, l2_softmax_loss(backend="triton") runs the GEMM path (the spy saw its forward)."""
    case = make_case(5, 8, 20, device=_dev(), seed=2)
    check_case(case, "triton")
    assert len(gemm) == 1


# ---------------------------------------------------------------------------------------------
# memory: what is kept, and nothing that grows with B x C besides it
# ---------------------------------------------------------------------------------------------
def _launch_args(opts, x):
    return opts.op_tensors(x.shape[0], x.device), opts.op_args()


@pytest.mark.parametrize("subc", [1, 2])
def test_aux_holds_exactly_the_kept_chunks(G, subc):
    config, gemm_path = G
    from l2sm_kernels.backends.triton import kernel_namespace
    K = kernel_namespace()
    dev = _dev()
    B, D, C = 6, 8, 40
    cfg = K.Config(16, 16, 16, 16, gemm=True, chunk_classes=16)
    x = torch.randn(B, D, device=dev)
    w = torch.randn(C * subc, D, device=dev)
    t = torch.randint(0, C, (B,), device=dev)
    a = torch.tensor(8.0, device=dev)
    stats = gemm_path.stats_numel(B)
    chunk = B * 16 * subc  # fp32 elements of a whole kept chunk (the third holds 8 classes)
    # None: at most W's gradient's bytes (C K x D x 4 = 1280 K here), more than B x C K x 4 = 960 K: all kept
    for budget, kept_elems in ((0, 0), (chunk * 4 - 1, 0), (chunk * 4, chunk), (2 * chunk * 4 + 1, 2 * chunk),
                               (None, 2 * chunk + B * 8 * subc), (1 << 40, 2 * chunk + B * 8 * subc)):
        tens, args = _launch_args(L.L2SMOptions(subcenters=subc, max_logits_bytes=budget), x)
        _, _, aux = K.forward(x, w, t, a, None, *tens, *args, True, True, False, False, config=cfg)
        assert aux.numel() == stats + kept_elems, (budget, aux.numel())
    # no gradient asked for (no_grad): nothing is kept whatever the budget
    tens, args = _launch_args(L.L2SMOptions(subcenters=subc, max_logits_bytes=1 << 40), x)
    _, _, aux = K.forward(x, w, t, a, None, *tens, *args, False, False, False, False, config=cfg)
    assert aux.numel() == stats
    # the default budget is W's gradient's size: with D = 4 < B = 6 it holds 4/6 of the logits (one whole chunk)
    w2 = torch.randn(C * subc, 4, device=dev)
    tens, args = _launch_args(L.L2SMOptions(subcenters=subc), x)
    _, _, aux = K.forward(x[:, :4], w2, t, a, None, *tens, *args, True, True, False, False, config=cfg)
    assert aux.numel() == stats + chunk


def test_no_bxc_buffer_beyond_the_kept_logits(G):
    """Dial 0, fp32 master weights with bf16 features: every tensor the path creates is below B x C and
    C x D but the gradient of W (once); W is never copied or cast whole (one chunk of its rows at a time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from l2sm_kernels.backends.triton import kernel_namespace
    K = kernel_namespace()
    dev = _dev()
    B, D, C = 40, 24, 300  # B x C 12000 > C x D 7200 > everything else
    cfg = K.Config(16, 16, 16, 16, gemm=True, chunk_classes=64)
    x = torch.randn(B, D, device=dev).to(torch.bfloat16)
    w = torch.randn(C, D, device=dev)
    t = torch.randint(0, C, (B,), device=dev)
    a = torch.tensor(8.0, device=dev)
    opts = L.L2SMOptions(normalize_weight=True, margin_type="cosface", margin=0.2, label_smoothing=0.1,
                         max_logits_bytes=0)
    tens, args = _launch_args(opts, x)
    needs = (True, True, False, True)

    class Rec(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.sizes.append((func.name(), o.numel()))
            return out

    rec = Rec()
    with rec:
        loss, lse, aux = K.forward(x, w, t, a, None, *tens, *args, *needs, config=cfg, launch=_unrecorded)
        gl, gs = torch.ones(B, device=dev), torch.zeros(B, device=dev)
        K.backward(gl, gs, x, w, t, a, None, *tens, lse, aux, *args, *needs, config=cfg, launch=_unrecorded)
    big = [s for s in rec.sizes if s[1] >= C * D]
    assert len(big) == 1 and big[0][1] == C * D, big  # dW, once
    assert max(s for _, s in rec.sizes if s != C * D) < C * D


def test_backward_leaves_aux_and_inputs_untouched(G, gemm, monkeypatch):
    """Kept chunks are read, never overwritten: a second backward through the same graph (retain_graph)
    gives the same gradients, and the inputs are bit-identical after both (reliability cases 19, 20)."""
    _set_dial(G, monkeypatch, "all", 7, 37, 1, 4)
    case = make_case(7, 12, 37, device=_dev(), seed=19, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="arcface", margin=0.5, label_smoothing=0.1, ignore_rows=1)
    before = [u.detach().clone() for u in (case.x, case.weight, case.bias, case.alpha, case.target)]
    out = L.l2_softmax_loss(case.x, case.weight, case.target, case.alpha, case.bias, backend="triton", **case.kwargs)
    leaves = [case.x, case.weight, case.bias, case.alpha]
    g1 = torch.autograd.grad(out, leaves, retain_graph=True)
    g2 = torch.autograd.grad(out, leaves)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)
    for b, u in zip(before, (case.x, case.weight, case.bias, case.alpha, case.target)):
        assert torch.equal(b, u.detach())
    assert gemm == [3]


def test_foreign_aux_is_an_error(G):
    from l2sm_kernels.backends.triton import kernel_namespace
    K = kernel_namespace()
    dev = _dev()
    B, D, C = 4, 8, 40
    cfg = K.Config(16, 16, 16, 16, gemm=True, chunk_classes=16)
    x, w = torch.randn(B, D, device=dev), torch.randn(C, D, device=dev)
    t, a = torch.randint(0, C, (B,), device=dev), torch.tensor(4.0, device=dev)
    tens, args = _launch_args(L.L2SMOptions(), x)
    _, lse, aux = K.forward(x, w, t, a, None, *tens, *args, True, True, False, False, config=cfg)
    gl = torch.ones(B, device=dev)
    with pytest.raises(ValueError, match="not produced by the triton backend's GEMM path"):
        K.backward(gl, gl, x, w, t, a, None, *tens, lse, aux[:-8], *args, True, True, False, False, config=cfg)


def test_public_keyword_sets_the_budget(G, gemm):
    """l2_softmax_loss(..., max_logits_bytes=n) reaches the GEMM path through the op: 0 keeps nothing, one
    chunk's bytes keep one chunk, None the default (W's gradient's bytes: all three chunks here); the
    results agree (bad values are refused before the op: tests/test_memory_dial.py)."""
    from l2sm_kernels.testing import run
    case = make_case(9, 20, 37, device=_dev(), seed=4, bias=True, normalize_weight=True, label_smoothing=0.1)
    outs = []
    for budget in (0, 9 * 16 * 4, None):
        case.kwargs["max_logits_bytes"] = budget
        out, grads = run(case, "triton")
        outs.append([out] + [grads[k] for k in sorted(grads)])
    assert gemm == [0, 1, 3], gemm
    for other in outs[1:]:
        for u, v in zip(other, outs[0]):
            assert max_err(u, v) <= 2e-5 * max(float(v.abs().max()), 1e-30)


def test_path_setting(G, monkeypatch):
    config, _ = G
    with pytest.raises(ValueError, match="path must be one of"):
        config.set_path("cublas")
    monkeypatch.setenv("L2SM_TRITON_PATH", "nonsense")
    with pytest.warns(RuntimeWarning, match="L2SM_TRITON_PATH='nonsense' ignored"):
        assert config._env_path() is None
    monkeypatch.setenv("L2SM_TRITON_PATH", "GEMM")
    assert config._env_path() == "gemm"
    monkeypatch.setattr(config, "_PATH", None)
    assert config.default_path(True) == "gemm" and config.default_path(False) == "fused"
    assert config.forward_config(512, torch.bfloat16, torch.bfloat16, True, True).gemm
    assert config.dw_config(512, torch.float32, torch.float32, True).gemm


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_traces_the_gemm_path_without_graph_break(G, dynamic):
    """torch.compile(fullgraph=True) of a training step on the GEMM path: dynamo takes the op whole and AOT
    autograd decomposes it into the row kernels and the GEMMs (aten ops), with fake tensors and symbolic
    shapes; the script of tests/test_triton_backend.py (stand-in sm_90 driver, nothing launched) with the
    path chosen by L2SM_TRITON_PATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path), L2SM_TRITON_PATH="gemm",
               TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/l2sm-inductor-trace"))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, "1" if dynamic else "0"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("KERNELS")][-1]
    for k in ("_chunk_stats_kernel", "_chunk_dz_kernel", "_normalize_rows_kernel", "_normalize_backward_kernel",
              "_fwd_combine_kernel", "_bwd_rows_kernel"):
        assert k in line, line
    assert "_fwd_split_kernel" not in line and line.endswith("OPAQUE []"), line


# ---------------------------------------------------------------------------------------------
# CUDA: graph capture of a training step (reliability case 23); skipped without CUDA
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dial", DIALS)
def test_cuda_graph_captures_a_training_step(G, gemm, monkeypatch, dial):
    """No host synchronization in either pass: a whole forward + backward is captured in a CUDA graph and
    its replay on new inputs (copied into the captured ones) gives the eager step's loss and gradients."""
    B, D, C = 64, 128, 5000
    _set_dial(G, monkeypatch, dial, B, C, 1, 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(C, D, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, C, (B,), device="cuda", generator=g)
    kw = dict(normalize_weight=True, margin_type="arcface", margin=0.5, backend="triton")

    def step():
        x.grad = w.grad = None
        loss = L.l2_softmax_loss(x, w, t, 16.0, **kw)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (compiles the kernels) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = w.grad = None
    with torch.cuda.graph(graph):
        loss = L.l2_softmax_loss(x, w, t, 16.0, **kw)
        loss.backward()
    with torch.no_grad():
        x.copy_(torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    got = (loss.detach().clone(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ref = step()
    for u, v in zip(got, (ref.detach(), x.grad, w.grad)):
        assert max_err(u, v) <= 1e-2 * max(float(v.abs().max()), 1e-30)
