"""Checks specific to the triton backend (the shared suite, test_l2_softmax.py, runs it through every
option too). Without CUDA the kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with CUDA on the GPU, where the CUDA-only tests below also run.

"Reliability case N" refers to docs/reliability.md.

- results do not depend on tile sizes, class splits, K / D chunking or the chain-break scratch path
  (also with sub-centers, per-row margins and a smoothing tensor)
- the margin table read through its strides (column-major, broadcast rows), each row its own margin
- sub-centers at several K with ragged C K against the float64 reference
- ragged shapes (C = 1, prime C, C = 65537, D = 127) against the float64 reference
- rows of norm 1e30 (features; normalized weight rows) against float64 directly
- no B x C buffer and no copy of W (fp32 master weights with bf16 features; K = 1 and 2), by recording
  every tensor the launchers allocate
- the backward works when the forward's hints were off (aux recomputed), bit-identically (K = 1 and 3)
- the aux layout (the target's winning sub-center), the workspace bound of the module docstring
- torch.compile traces a training step through both ops with no graph break (on a CPU-only machine
  through a subprocess that compiles the kernels' IR for sm_90 without running them)
Every test here runs the fused path (fixture fused_path), also on a GPU, whose default is the GEMM path.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import l2sm_kernels as L
from l2sm_kernels.backends import triton_interpreted
from l2sm_kernels.testing import check_case, make_case, max_err, run, run_reference

# the interpreter's numpy evaluates masked-out lanes too (log(0), 0/0 there are discarded by tl.where)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter",
                                        "ignore::DeprecationWarning:triton.runtime.interpreter")

_REQUIRED = [b for b in os.environ.get("L2SM_REQUIRE_BACKENDS", "").split(",") if b]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def K():
    info = L.available_backends()["triton"]
    if not info.available:
        if "triton" in _REQUIRED:
            pytest.fail(f"backend triton is required but unavailable: {info.reason}")
        pytest.skip(f"backend triton unavailable: {info.reason}")
    from l2sm_kernels.backends.triton import kernel_namespace
    return kernel_namespace()


@pytest.fixture(scope="module")
def dev(K):
    return "cpu" if triton_interpreted() else "cuda"


@pytest.fixture(autouse=True)
def fused_path(monkeypatch):
    """These tests are the fused kernels': on a GPU, whose default is the GEMM path (tested in
    tests/test_triton_gemm_path.py), they choose the fused path explicitly, as under the interpreter."""
    from l2sm_kernels.backends.triton import config
    monkeypatch.setattr(config, "_PATH", "fused")


OPTS = L.L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.4, label_smoothing=0.1)
PLAIN = L.L2SMOptions()


def _rows(B, lo, hi, seed):
    return lo + (hi - lo) * torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _subcenter_opts(B, subcenters=3, **kw):
    """Every new path at once: sub-centers, per-row angular and additive margins (one row's m2 = 0, one
    negative), a label smoothing tensor, normalize_weight."""
    m2 = _rows(B, 0.2, 0.6, 1)
    m2[0], m2[1 % B] = 0.0, -0.3
    kw = dict(dict(normalize_weight=True, label_smoothing=torch.tensor(0.1, dtype=torch.float64)), **kw)
    return L.L2SMOptions(margin_type="combined", margin=(1.0, m2, _rows(B, 0.0, 0.4, 2)), subcenters=subcenters, **kw)


def _inputs(B, D, C, dev, dtype=torch.float32, wdtype=None, seed=0, bias=True, ignore_rows=2, subcenters=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dev, dtype)
    w = (torch.randn(C * subcenters, D, generator=g) * 0.05).to(dev, wdtype or dtype)
    t = torch.randint(0, C, (B,), generator=g)
    t[:ignore_rows] = -100
    b = (torch.randn(C, generator=g) * 0.5).to(dev, wdtype or dtype) if bias else None
    alpha = torch.tensor(16.0, device=dev)
    gl = torch.randn(B, generator=g).to(dev)
    gs = torch.randn(B, generator=g).to(dev) * 0.3
    return x, w, t.to(dev), alpha, b, gl, gs


def _op_inputs(opts, x):
    """(margin table, label smoothing, negatives table), the options: what the op takes after bias (contract.py)."""
    return opts.op_tensors(x.shape[0], x.device), opts.op_args()


def _fwd_bwd(K, inp, opts=OPTS, needs=(True, True, True, True), config=None, splits=None, dw_config=None,
             launch=None, tensors=None):
    """The launchers' forward then backward; tensors overrides (margin table, label smoothing)."""
    x, w, t, alpha, b, gl, gs = inp
    kw = {"launch": launch} if launch else {}
    tens, args = _op_inputs(opts, x)
    tens = tensors or tens
    loss, lse, aux = K.forward(x, w, t, alpha, b, *tens, *args, *needs, config=config, splits=splits, **kw)
    grads = K.backward(gl, gs, x, w, t, alpha, b, *tens, lse, aux, *args, *needs, config=dw_config, **kw)
    return (loss, lse) + tuple(grads)


def _close(a, b, rel=2e-5):
    """fp32 results that differ only by summation order: within rel of the tensor's scale."""
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype
        scale = float(v.detach().abs().max()) if v.numel() else 0.0
        assert max_err(u, v) <= rel * max(scale, 1e-30), (max_err(u, v), scale)


# ---------------------------------------------------------------------------------------------
# tiles, splits, chunks (reliability case 16)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", ["all", "plain", "subcenters"])
def test_tiles_splits_and_paths_agree(K, dev, opts, monkeypatch):
    """Tile sizes, the number of class splits, the K loop vs one tile over D, D chunks of the
    accumulator and the chain-break scratch change only the summation order; also with sub-centers
    (K = 3), per-row margins and a smoothing tensor (their extra pass), where W's normalization backward
    takes all three of its forms (w_hat . dw_hat from the finished row with w_hat correctly rounded, from
    the finished row with W as stored (rows wider than PROJ_TILE_MAX_D), or accumulated over D chunks)."""
    subc = 3 if opts == "subcenters" else 1
    B, D, C = (21, 40, 150) if subc == 1 else (13, 40, 41)
    inp = _inputs(B, D, C, dev, seed=1, subcenters=subc)
    opts = {"all": OPTS, "plain": PLAIN}.get(opts) or _subcenter_opts(B, subc)
    base = _fwd_bwd(K, inp, opts)
    variants = [
        dict(config=K.Config(16, 16, 64, 64, chain_break=False), dw_config=K.Config(16, 16, 64, 64)),
        dict(config=K.Config(32, 32, 16, 16, chain_break=True),  # K loop, 3 D chunks, scratch
             dw_config=K.Config(32, 16, 16, 16, chain_break=True)),
        dict(config=K.Config(16, 64, 64, 32), splits=1, dw_config=K.Config(16, 64, 64, 32)),
        dict(config=K.Config(16, 16, 64, 64, chain_break=True), splits=5,
             dw_config=K.Config(64, 32, 64, 64, chain_break=True)),
    ]
    if subc > 1:
        variants = variants[1:]  # (interpreter time; the first is the default's own shape)
    for v in variants:
        _close(_fwd_bwd(K, inp, opts, **v), base)
    from l2sm_kernels.backends.triton import loss_backward
    monkeypatch.setattr(loss_backward, "PROJ_TILE_MAX_D", 0)  # one tile over D takes the PROJ_ROW form
    _close(_fwd_bwd(K, inp, opts), base)


@pytest.mark.parametrize("dtype,wdtype,D,subc", [(torch.bfloat16, None, 40, 1), (torch.float32, None, 40, 1),
                                                   (torch.bfloat16, torch.float32, 40, 1),
                                                   (torch.bfloat16, None, 40, 3), (torch.bfloat16, None, 37, 1)],
                         ids=["bf16", "fp32", "mixed", "bf16-K3", "bf16-D37"])
def test_tma_descriptor_path_matches_pointer_path(K, dev, dtype, wdtype, D, subc):
    """The streamed tiles through tensor descriptors (Config.tma: W in the forward, x in the dW pass; the
    interpreter runs descriptors too) give bit-identical results to the pointer loads, ragged rows and classes
    (zero fill past B, C and D), all options; the launchers take the descriptor path exactly where TMA can
    read the tensor: not W's rows of one sub-center (K = 3: the dW pass's x only), not rows of 74 bytes
    (bf16, D = 37: no 16-byte alignment)."""
    B, C = 21, 150 if subc == 1 else 41
    inp = _inputs(B, D, C, dev, dtype=dtype, wdtype=wdtype, seed=4, subcenters=subc)
    opts = OPTS if subc == 1 else _subcenter_opts(B, subc)
    used = []

    def launch(kernel):  # runs the kernel, recording whether it took the descriptor path
        class _Grid:
            def __getitem__(self, grid):
                def call(**kwargs):
                    if "TMA" in kwargs:
                        desc = kwargs.get("w_desc", kwargs.get("x_desc"))
                        used.append((kernel.__name__, kwargs["TMA"], type(desc).__name__))
                    return kernel[grid](**kwargs)
                return call
        return _Grid()

    ptr = _fwd_bwd(K, inp, opts, config=K.Config(16, 16, 64, 64, chain_break=True),
                   dw_config=K.Config(16, 16, 64, 64, chain_break=True), launch=launch)
    assert used and not any(t for _, t, _ in used)
    used.clear()
    tma = _fwd_bwd(K, inp, opts, config=K.Config(16, 16, 64, 64, chain_break=True, tma=True),
                   dw_config=K.Config(16, 16, 64, 64, chain_break=True, tma=True), launch=launch)
    aligned = D % 8 == 0
    want = {("_fwd_split_kernel", aligned and subc == 1), ("_bwd_dw_kernel", aligned)}
    assert {(k, t) for k, t, _ in used} == want, used
    assert all((d == "TensorDescriptor") == t for _, t, d in used), used
    for u, v in zip(tma, ptr):
        assert torch.equal(u, v)


def test_many_splits_and_class_blocks_match_reference(K, dev):
    """Several class tiles per split and several class blocks per persistent dW program, all options,
    against the float64 reference through the public API."""
    case = make_case(19, 24, 211, device=dev, seed=2, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="cosface", margin=0.3, label_smoothing=0.05, ignore_rows=3, reduction="none")
    check_case(case, "triton", torch.randn(19, generator=torch.Generator().manual_seed(3)).to(dev))


# ---------------------------------------------------------------------------------------------
# the margin table, sub-centers
# ---------------------------------------------------------------------------------------------
def test_margin_table_strides_and_rows(K, dev):
    """The kernels read the (R, 5) table through its strides: a column-major copy and a broadcast
    (stride-0) view give bit-identical results to the contiguous table, and a per-row table whose rows
    are all equal gives what the one-row table gives (stride 0 for R = 1)."""
    B = 9
    inp = _inputs(B, 12, 11, dev, seed=15, ignore_rows=1)
    opts = L.L2SMOptions(normalize_weight=True, margin_type="combined", margin=(1.0, _rows(B, 0.2, 0.6, 3), 0.1),
                         label_smoothing=0.1)
    (table, smooth, _), _ = _op_inputs(opts, inp[0])
    assert table.shape == (B, 5) and table.is_contiguous()
    base = _fwd_bwd(K, inp, opts)
    col_major = table.T.contiguous().T
    assert col_major.stride() == (1, B)
    for u, v in zip(_fwd_bwd(K, inp, opts, tensors=(col_major, smooth, None)), base):
        assert torch.equal(u, v)
    one = L.L2SMOptions(normalize_weight=True, margin_type="combined", margin=(1.0, 0.35, 0.1), label_smoothing=0.1)
    (row, _, _), _ = _op_inputs(one, inp[0])
    assert row.shape == (1, 5)
    ref = _fwd_bwd(K, inp, one)
    for tens in ((row.expand(B, 5), smooth, None), (row.repeat(B, 1), smooth, None)):
        for u, v in zip(_fwd_bwd(K, inp, one, tensors=tens), ref):
            assert torch.equal(u, v)
    # each row reads its own margin: changing row 1's changes row 1's loss alone (row 0 is ignored)
    other = table.clone()
    other[1] = row[0]
    out = _fwd_bwd(K, inp, opts, tensors=(other, smooth, None))
    assert not torch.equal(out[0][1], base[0][1])
    assert torch.equal(out[0][0], base[0][0]) and torch.equal(out[0][2:], base[0][2:])


def test_op_checks_the_margin_inputs(K, dev):
    from l2sm_kernels.backends import ops_for
    fwd, _ = ops_for("triton")
    x, w, t, alpha, b, _, _ = _inputs(3, 4, 5, dev, seed=16)
    args = L.L2SMOptions(margin_type="arcface", margin=0.3).op_args()
    with pytest.raises(ValueError, match="needs the margins table"):
        fwd(x, w, t, alpha, b, None, None, None, *args, True, True, True, True)
    with pytest.raises(ValueError, match="margins must be the"):
        fwd(x, w, t, alpha, b, torch.zeros(2, 5, dtype=torch.float64, device=dev), None, None, *args, True, True, True,
            True)
    with pytest.raises(ValueError, match="label_smoothing must be a 0-d"):
        fwd(x, w, t, alpha, b, torch.zeros(1, 5, dtype=torch.float64, device=dev),
            torch.zeros(3, dtype=torch.float64, device=dev), None, *args, True, True, True, True)


SUBCENTER_SHAPES = [(2, 17, 24), (4, 33, 12), (5, 7, 70)]  # (K, C, D): ragged C K against 16-class tiles


@pytest.mark.parametrize("subc,C,D", SUBCENTER_SHAPES, ids=[f"K{k}-C{c}-D{d}" for k, c, d in SUBCENTER_SHAPES])
def test_subcenter_tiles_match_reference(K, dev, subc, C, D):
    """Sub-centers at several K, C K not a multiple of the class tile (and D = 70: the K loop and D
    chunks), every option on, through the public API against the float64 reference."""
    B = 11
    m2 = _rows(B, 0.2, 0.6, 4)
    m2[0] = 0.0
    case = make_case(B, D, C, device=dev, seed=17 + subc, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="combined", margin=(1.0, m2.to(dev), 0.1), label_smoothing=0.1, subcenters=subc,
                     ignore_rows=2, reduction="none")
    check_case(case, "triton", torch.randn(B, generator=torch.Generator().manual_seed(18)).to(dev))


# ---------------------------------------------------------------------------------------------
# ragged shapes (reliability cases 2, 3)
# ---------------------------------------------------------------------------------------------
RAGGED = [(3, 127, 1), (5, 33, 257), (2, 8, 65537), (1, 1, 2), (17, 130, 61), (33, 16, 5)]


@pytest.mark.parametrize("B,D,C", RAGGED, ids=[f"B{b}-D{d}-C{c}" for b, d, c in RAGGED])
def test_ragged_shapes_match_reference(K, dev, B, D, C):
    case = make_case(B, D, C, device=dev, seed=B + D + C, bias=True, alpha_grad=True, normalize_weight=C > 2,
                     margin_type="arcface", margin=0.3, label_smoothing=0.1, reduction="sum")
    check_case(case, "triton", torch.tensor(1.0, device=dev))


# ---------------------------------------------------------------------------------------------
# memory: no B x C buffer, no copy of W (reliability cases 22, 15: fp32 master weights are read as stored)
# ---------------------------------------------------------------------------------------------
class _RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.shapes.append((func.name(), tuple(o.shape), o.dtype))
        return out


def _unrecorded(kernel):
    """A launch wrapper: the launches themselves (the interpreter copies its arguments) are not ours."""
    class _Grid:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                with _disable_current_modes():
                    return kernel[grid](*args, **kwargs)
            return call
    return _Grid()


@pytest.mark.parametrize("subc", [1, 2], ids=["K1", "K2"])
def test_no_bxc_buffer_and_no_weight_copy(K, dev, subc):
    """fp32 master weights with bf16 features: every tensor the launchers create is far below B x C
    and C K x D, except the gradient of W itself (once, fp32); W is never cast or copied. K = 2 with
    per-row margins and a smoothing tensor: the sub-center paths and the smoothing term's extra pass."""
    # B x C > C K x D > everything else: (40, 24, 300) 12000 > 7200; (32, 12, 150) 4800 > 3600
    B, D, C = (40, 24, 300) if subc == 1 else (32, 12, 150)
    inp = _inputs(B, D, C, dev, dtype=torch.bfloat16, wdtype=torch.float32, seed=4, subcenters=subc)
    opts = OPTS if subc == 1 else _subcenter_opts(B, subc)
    with _RecordAllocations() as rec:
        out = _fwd_bwd(K, inp, opts, launch=_unrecorded)
    big = [s for s in rec.shapes if torch.Size(s[1]).numel() >= C * subc * D]
    assert [s[1:] for s in big] == [((C * subc, D), torch.float32)], big  # dW, allocated once
    assert out[3].shape == (C * subc, D) and out[3].dtype == torch.float32 and out[2].dtype == torch.bfloat16
    assert max(torch.Size(s[1]).numel() for s in rec.shapes if s not in big) < B * C // 2


def test_forward_workspace_is_bounded(K):
    """The module docstring's bound: the split partials stay under (2 slots x BLOCK_B + B) x (4 + D)
    x 4 bytes whatever C is (slots = SMs x programs per SM); the dW pass runs one persistent program
    per multiprocessor."""
    sms = 132
    for D in (64, 512, 1024):
        cfg = K.forward_config(D, torch.bfloat16, torch.bfloat16, True, gpu=True)
        for B in (1, 64, 1000, 1024, 4096, 65536):
            for C in (1, 1000, 131072, 1048576, 4_200_000):
                got = K.forward_workspace_bytes(B, C, D, True, cfg, sms)
                assert got <= (2 * sms * cfg.ctas_per_sm * cfg.block_rows + B) * (K.NPART + D) * 4, (B, C, D, got)
        assert K.dw_programs(sms) == sms
    # B = 1024, D = 512: 16 splits, 32 MiB
    assert K.forward_workspace_bytes(1024, 1048576, 512, True, K.forward_config(512, torch.bfloat16,
                                     torch.bfloat16, True, gpu=True), sms) == 16 * 1024 * 516 * 4


def test_forward_grid_is_whole_waves(K):
    """Every forward program does the same work, so a grid that ends in a partial wave costs a whole
    extra wave: the splits fill at most two waves of resident programs (SMs x ctas_per_sm), D chunks
    (split_d) counted; one split per row block when the row blocks alone fill more."""
    for sms in (132, 114, 78):
        for D, xdt, wdt, acc_o in ((512, torch.bfloat16, torch.bfloat16, True),
                                   (1024, torch.bfloat16, torch.bfloat16, True),  # split_d, 4 D chunks
                                   (512, torch.bfloat16, torch.bfloat16, False),
                                   (512, torch.float16, torch.float16, True),
                                   (512, torch.float32, torch.float32, True),
                                   (512, torch.bfloat16, torch.float32, True)):
            cfg = K.forward_config(D, xdt, wdt, acc_o, gpu=True)
            slots = sms * cfg.ctas_per_sm
            n_d = K.d_chunks(D, cfg, acc_o)
            for B in (1, 64, 300, 1024, 4096, 65536):
                per_split = -(-B // cfg.block_rows) * n_d
                for C in (1, 1000, 131072, 1048576):
                    n = K.forward_splits(B, C, D, acc_o, cfg, sms)
                    assert 1 <= n <= -(-C // cfg.block_cols)
                    assert n == 1 or n * per_split <= 2 * slots, (sms, D, B, C, n, per_split, slots)
    # the GPU benchmark's shape on an H100 / H200 (132 SMs): 16 splits x 16 row blocks = 256 programs
    # for 264 slots (17 splits gave 272: two waves and 8 programs, i.e. three waves)
    fused = K.forward_config(512, torch.bfloat16, torch.bfloat16, True, gpu=True)
    assert [K.forward_splits(1024, C, 512, True, fused, 132) for C in (131072, 1048576)] == [16, 16]
    split_d = K.forward_config(1024, torch.bfloat16, torch.bfloat16, True, gpu=True)
    assert split_d.ctas_per_sm == 2 and K.d_chunks(1024, split_d, True) == 4
    assert K.forward_splits(1024, 1048576, 1024, True, split_d, 132) == 8  # 8 x 16 x 4 = 512 of 528 slots


# ---------------------------------------------------------------------------------------------
# aux: hints off, layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subc", [1, 3], ids=["K1", "K3"])
def test_backward_without_forward_hints_recomputes_aux(K, dev, subc):
    """ops.py's contract: the backward honours its flags even when the forward prepared nothing
    (under no_grad, or the op called directly); the result is bit-identical. K = 3 with per-row margins
    and a smoothing tensor: the rerun also redoes the per-row smoothing term's extra pass."""
    B, D, C = 13, 20, (70 if subc == 1 else 23)
    inp = _inputs(B, D, C, dev, seed=5, subcenters=subc)
    x, w, t, alpha, b, gl, gs = inp
    opts = OPTS if subc == 1 else _subcenter_opts(B, subc)
    full = _fwd_bwd(K, inp, opts)
    tens, args = _op_inputs(opts, x)
    loss, lse, aux = K.forward(x, w, t, alpha, b, *tens, *args, False, False, False, False)
    assert aux.numel() < B * D  # no O' without the dX hint
    with _RecordAllocations() as rec:
        grads = K.backward(gl, gs, x, w, t, alpha, b, *tens, lse, aux, *args, True, True, True, True,
                           launch=_unrecorded)
    for a, r in zip((loss, lse) + tuple(grads), full):
        assert torch.equal(a, r)
    # peak memory: the rerun forward's split partials (B x splits x (4 + D), 3-dim) are allocated, and
    # freed, before the gradients (dW is the first (C K, D) tensor)
    shapes = [s[1] for s in rec.shapes]
    assert (C * subc, D) in shapes and any(len(s) == 3 for s in shapes), shapes
    assert max(i for i, s in enumerate(shapes) if len(s) == 3) < shapes.index((C * subc, D)), shapes


def test_aux_layout(K):
    for B, D in ((0, 5), (1, 1), (7, 13), (1024, 512)):
        for subc in (1, 3):
            for flags in ((a, p, w) for a in (0, 1) for p in (0, 1) for w in (0, 1)):
                n, o_off, ws_off = K.aux_layout(B, D, *map(bool, flags), subc)
                assert K.aux_flags(B, D, torch.empty(n), subc) == tuple(map(bool, flags))
                assert o_off == B * K.NSTAT and ws_off == o_off + flags[0] * B * D
                # label smoothing's dX term: one column sum, or one vector per row with sub-centers
                assert n >= ws_off + flags[2] * (D if subc == 1 else B * D) > n - 16
    with pytest.raises(ValueError, match="not produced by the triton forward"):
        K.aux_flags(4, 3, torch.empty(0))
    with pytest.raises(ValueError, match="subcenters=3"):  # a K = 1 aux read as K = 3's
        K.aux_flags(4, 3, torch.empty(K.aux_layout(4, 3, True, True, True, 1)[0]), 3)


def test_aux_records_the_target_winner(K, dev):
    """The aux statistics hold, per row, the target class's cosine (its best sub-center's) and the
    index of that sub-center, as float64 finds them; K = 1 records 0. Ties (identical sub-centers) go to
    the lowest index."""
    B, D, C, subc = 7, 12, 5, 3
    x, w, t, alpha, b, _, _ = _inputs(B, D, C, dev, seed=13, subcenters=subc, ignore_rows=1)
    w = w.clone()
    w[3 * subc + 2] = w[3 * subc + 1]  # class 3: sub-centers 1 and 2 tie
    t[1:4] = 3
    x[2] = w[3 * subc + 1] * 7.0  # row 2: c = 1 exactly on both, sub-center 1 must win
    opts = L.L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.3, subcenters=subc)
    tens, args = _op_inputs(opts, x)
    _, _, aux = K.forward(x, w, t, alpha, b, *tens, *args, True, True, True, True)
    st = aux[:B * K.NSTAT].view(B, K.NSTAT)
    CY, WIN = K.ST_CY.value, K.ST_WIN.value
    cos = (torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(w.double(), dim=1).T)
    best, win = cos.view(B, C, subc).max(dim=2)
    rows = t != -100
    ty = t[rows]
    assert torch.equal(st[rows, WIN].long(), win[rows, ty]), (st[:, WIN], win[rows, ty])
    assert max_err(st[rows, CY], best[rows, ty]) <= 1e-6
    assert st[2, WIN] == 1 and st[2, CY] == 1.0
    args1 = L.L2SMOptions(normalize_weight=True).op_args()
    _, _, aux1 = K.forward(x, w[::subc].contiguous(), t, alpha, b, None, None, None, *args1, True, True, True, True)
    assert torch.equal(aux1[:B * K.NSTAT].view(B, K.NSTAT)[:, WIN], torch.zeros(B, device=dev))


# ---------------------------------------------------------------------------------------------
# numerics specific to the kernels
# ---------------------------------------------------------------------------------------------
try:  # a module global, so that a test kernel can call the kernels' helpers
    import triton
    import triton.language as tl

    from l2sm_kernels.backends.triton.common import _rne_bf16

    @triton.jit
    def _rne_bf16_test_kernel(src, dst, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst + i, _rne_bf16(tl.load(src + i, mask=i < n)), mask=i < n)
except ImportError:  # the K fixture skips (or fails) with the reason
    pass


def test_bf16_rounding_helper(K, dev):
    """_rne_bf16 (the interpreter's stand-in for the GPU's fp32 -> bf16 rounding) rounds to nearest
    even, as torch does, ties and specials included."""
    _k = _rne_bf16_test_kernel
    g = torch.Generator().manual_seed(6)
    v = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-30, 30, (200,), generator=g),
                   torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 0.0, -0.0, float("inf"),
                                 -float("inf"), 3.3895e38])])
    v = v.to(dev)
    out = torch.empty_like(v)
    _k[(1,)](v, out, v.numel(), BLOCK=256)
    assert torch.equal(out, v.to(torch.bfloat16).to(torch.float32))


def test_confident_rows_exact_target_gradient(K, dev):
    """p_y within 1e-6 of 1 (fp32 cannot hold 1 - p_y as p_y - 1): the target column's dz = -q comes
    from the non-target mass; compare dx with float64 autograd."""
    case = make_case(6, 16, 23, device=dev, seed=7, normalize_weight=True, alpha=64.0, reduction="none")
    with torch.no_grad():
        w_hat = torch.nn.functional.normalize(case.weight.float(), dim=1)
        case.x.copy_(w_hat[case.target] + 0.01 * torch.randn(case.x.shape, generator=torch.Generator()
                                                             .manual_seed(8)).to(dev))
    ref, _ = run_reference(case, True)
    assert ref.max() < 1e-5  # 1 - p_y below fp32's resolution near 1
    check_case(case, "triton", torch.ones(6, device=dev))


@pytest.mark.parametrize("C", [1, 3])
def test_all_logits_neg_inf_give_nan(K, dev, C):
    """A row whose every logit is -inf (every bias -inf, the target's too) has loss -inf - -inf = NaN,
    as in torch: F.cross_entropy on such logits gives NaN, and so does the float64 reference. Only a row
    with no non-target column (C = 1) and a finite target logit has loss 0. An ignored row's loss stays 0,
    its gradients are NaN (p = exp(-inf - -inf)), as torch's log_softmax backward and eager.py give."""
    import math
    assert torch.isnan(torch.nn.functional.cross_entropy(torch.full((1, C), -math.inf), torch.tensor([0])))
    case = make_case(5, 8, C, device=dev, seed=11, bias=True, alpha_grad=True, normalize_weight=True,
                     ignore_rows=1, reduction="none")
    with torch.no_grad():
        case.bias.fill_(-math.inf)
    out, _ = run(case, "triton", torch.ones(5, device=dev))
    ref, _ = run_reference(case, True)
    assert torch.isnan(ref[1:]).all() and ref[0] == 0
    assert torch.isnan(out[1:]).all() and out[0] == 0, out
    check_case(case, "triton", torch.ones(5, device=dev))  # gradients: the same NaN pattern as float64
    if C == 1:  # a finite target logit with no other column: loss 0, as torch
        with torch.no_grad():
            case.bias.fill_(0.0)
        out, _ = run(case, "triton", torch.ones(5, device=dev))
        assert torch.equal(out, torch.zeros(5, device=dev))


def _rowwise_err(got, ref):
    """Largest error of each row relative to that row's largest reference value (a huge row's gradient
    is ~1e-30: one scale for the whole tensor would hide it)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.dim() < 2:
        return max_err(got, ref) / max(float(ref.abs().max()), 1e-300)
    scale = ref.abs().amax(dim=1).clamp_min(1e-300)
    return float(((got - ref).abs().amax(dim=1) / scale).max())


@pytest.mark.parametrize("which,D", [("features", 12), ("weight", 12), ("weight", 70)])
def test_rows_of_huge_norm_match_float64(K, dev, which, D):
    """Reliability case 31: rows of norm 1e30 (features; weight rows, normalized), where an fp32 sum of
    squares overflows (|v| > 1.8e19) and used to make the row a zero vector (its loss log C). Against
    float64 directly, row by row: plain fp32 torch is wrong there, so the accuracy relation would excuse
    a broken kernel. D = 70: W's normalization backward with D in chunks (the projection accumulated during
    the walk), D = 12: from the finished row. (The raw product x_i . W_j must stay within fp32: both at
    1e30 would overflow.)"""
    case = make_case(6, D, 9, device=dev, seed=19, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="arcface", margin=0.3, label_smoothing=0.1, reduction="none")
    with torch.no_grad():
        v = case.x if which == "features" else case.weight
        v[::2] *= 1e30 / v[::2].double().norm(dim=1, keepdim=True).float()
        assert torch.isinf(v[0].square().sum())  # the fp32 sum of squares overflows
    g = torch.randn(6, generator=torch.Generator().manual_seed(20)).to(dev)
    out, grads = run(case, "triton", g)
    ref, rgrads = run_reference(case, True, g)
    assert max_err(out, ref) <= 1e-5 * float(ref.abs().max()), (out, ref)
    for k in grads:
        assert _rowwise_err(grads[k], rgrads[k]) <= 1e-4, k


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
_TRACE_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget

    class _NoGPU:  # the IR of user kernels is generated for sm_90; nothing runs
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(_NoGPU())
    import l2sm_kernels.backends.triton.op as TB
    from l2sm_kernels.backends import ops_for
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    TB._check = lambda *a: None  # CPU tensors stand in for CUDA ones: traced, never launched
    fwd, _ = ops_for("triton")
    joint = []

    class Stop(Exception):
        pass

    def backend(gm, example_inputs):
        def part(g, *a, **k):
            joint.append(g)
            return default_partition(g, *a, **k)
        def stop(g, ins):
            raise Stop()
        return aot_module_simplified(gm, example_inputs, fw_compiler=stop, bw_compiler=stop, partition_fn=part)

    net = torch.nn.Linear(8, 16)
    w = torch.nn.Parameter(torch.randn(37, 16) * 0.1)
    b = torch.nn.Parameter(torch.zeros(37))
    alpha = torch.nn.Parameter(torch.tensor(16.0))

    from l2sm_kernels.options import L2SMOptions
    opts = L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.3, label_smoothing=0.1)

    def step(inp, y):
        loss, lse, aux = fwd(net(inp), w, y, alpha, b, *opts.op_arguments(inp.shape[0], inp.device),
                             True, True, True, True)
        return loss.mean() + 0.01 * lse.square().mean()

    try:
        torch.compile(step, fullgraph=True, backend=backend, dynamic=sys.argv[1] == "1")(
            torch.randn(12, 8), torch.randint(0, 37, (12,)))
    except Exception as e:
        if "Stop" not in repr(e):
            raise
    names = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in joint[0].graph.nodes
             if n.op == "call_function" and "TritonKernelWrapper" in type(n.target).__name__]
    opaque = [str(n.target) for n in joint[0].graph.nodes if "l2sm" in str(n.target)]
    print("KERNELS", sorted(set(names)), "OPAQUE", opaque)
''')


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_traces_both_ops_without_graph_break(K, dynamic):
    """torch.compile(fullgraph=True) of a training step: dynamo takes the op without a graph break and
    AOT autograd decomposes forward and backward into the Triton kernels (triton_op + wrap_triton),
    with fake tensors and, with dynamic=True, symbolic shapes. Runs in a subprocess with a stand-in
    driver that only answers the target (sm_90), so it needs no GPU: nothing is launched."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path),
               TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/l2sm-inductor-trace"))
    env.pop("TRITON_INTERPRET", None)
    env["L2SM_TRITON_PATH"] = "fused"  # (tests/test_triton_gemm_path.py traces the GEMM path)
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, "1" if dynamic else "0"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("KERNELS")][-1]
    for k in ("_fwd_split_kernel", "_fwd_combine_kernel", "_bwd_rows_kernel", "_bwd_dw_kernel"):
        assert k in line, line
    assert line.endswith("OPAQUE []"), line


@pytest.mark.parametrize("options", ["plain", "all"])
def test_gpu_tiles_compile_for_hopper(K, tmp_path, options):
    """The GPU tiles (B=1024, D=512, bf16; with the plain options also the variants the GPU benchmark
    times) compile for sm_90 with no GPU present (triton's bundled ptxas): no compile error, shared
    memory within an H100's 227 KiB, warpgroup MMA in the main kernels, spills bounded, no
    approximate sqrt or division, and the fused_tma variant's main loops load by TMA
    (benchmarks/compile_report.py reports them all). Compiling is all: nothing runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "report.json"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "compile_report.py")
    res = subprocess.run([sys.executable, script, "--options", options, "--json", str(out)]
                         + (["--variants"] if options == "plain" else []), capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} >= {"_fwd_split_kernel", "_fwd_combine_kernel", "_bwd_rows_kernel",
                                          "_bwd_dw_kernel"}
    for r in rows:
        assert "error" not in r, r
        assert r["shared"] <= 227 * 1024, r
        assert r["stack"] <= 1024, r  # a few spilled registers at most, never the accumulator
        assert r["approx_sqrt_div"] == 0, r  # norms and per-row divisions correctly rounded, as interpreted
        if r["kernel"] in ("_fwd_split_kernel", "_bwd_dw_kernel"):
            assert r["hgmma"] > 0, r
            if r["path"] == "fused_tma":  # the compiled descriptor path: TMA loads (UTMALDG) in the main loop
                assert r["async_tile_loads"] and r["async_ops"].get("UTMALDG", 0) > 0, r
    assert options != "plain" or {r["kernel"] for r in rows if r["path"] == "fused_tma"} == {
        "_fwd_split_kernel", "_bwd_dw_kernel"}


def _compile_report_module():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import compile_report
    return compile_report


# a hand-made SASS listing in cuobjdump's format: an outer loop (0x10-0x80) around an inner one (0x20-0x50)
# holding the matrix instructions, a spill in each, an async copy in the inner one, and the trap after EXIT
_SASS = """
        /*0000*/                   STL.128 [R1+0x10], R12 ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   LDL.64 R6, [R1+0x8] ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   STL [R1], R8 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/               @P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_compile_report_main_loop_from_sass(K):
    """The main loop is the smallest loop holding every matrix instruction that is inside a loop: the inner
    loop when all of them are there, the loop around a K loop when the second product is outside it;
    without matrix instructions, the loop with the most global loads. Spill bytes count LDL / STL widths."""
    CR = _compile_report_module()
    inner_only = _SASS.replace("/*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
                               "/*0070*/                   FADD R9, R9, R10")
    r = CR.sass_report(inner_only)
    assert r["loop"] == ["0x20", "0x50"] and r["loop_instructions"] == 4 and r["loop_mma"] == 1
    assert r["loop_spill_bytes"] == 8 and r["spill_bytes"] == 16 + 8 + 4
    assert r["async_tile_loads"] is True and r["async_ops"] == {"LDGSTS": 1} and r["hgmma"] == 1
    r = CR.sass_report(_SASS)  # a product outside the inner (K) loop: the outer loop is the main one
    assert r["loop"] == ["0x10", "0x80"] and r["loop_instructions"] == 8 and r["loop_mma"] == 2
    assert r["loop_spill_bytes"] == 8 + 4
    no_mma = inner_only.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "FFMA R24, R25, R26, R24")
    no_mma = no_mma.replace("LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64]", "FADD R5, R5, R6")
    r = CR.sass_report(no_mma)  # global loads: the inner loop has none, the outer one has one
    assert r["loop"] == ["0x10", "0x80"] and r["loop_mma"] == 0 and r["async_tile_loads"] is False
    assert CR.sass_report(no_mma.replace("LDG.E.128 R4, desc[UR4][R2.64]", "MOV R4, R2"))["loop"] is None


def test_compile_report_fields(K, tmp_path):
    """benchmarks/compile_report.py --json on a tiny shape (sm_90, no GPU: triton's bundled ptxas and
    cuobjdump): every field of every row is there and sane; the main kernels' main loop holds their
    warpgroup MMAs."""
    CR = _compile_report_module()
    missing = CR.bundled_tools_missing()
    if missing:
        pytest.skip(missing)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, CR.__file__, "--B", "64", "--D", "64", "--C", "512", "--options", "plain",
                          "--only", "_fwd_split", "_bwd_dw", "_bwd_rows", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r["path"]) for r in rows} == {
        ("_fwd_split_kernel", "default"), ("_bwd_dw_kernel", "default"), ("_bwd_rows_kernel", "default"),
        ("_fwd_split_kernel", "lse only")}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["shared"] >= 0, r
        assert 0 <= r["loop_spill_bytes"] <= r["spill_bytes"], r
        assert 0 < r["loop_instructions"] < r["instructions"], r
        assert isinstance(r["async_tile_loads"], bool), r
        if r["kernel"] == "_bwd_rows_kernel":
            assert r["loop_mma"] == 0 and r["hgmma"] == 0, r
        else:
            assert 0 < r["loop_mma"] <= r["hgmma"] and r["shared"] > 0, r


_WIDE_D_SCRIPT = textwrap.dedent(r"""
    import json, os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    import compile_report as CR
    from l2sm_kernels.backends.triton import kernel_namespace
    from l2sm_kernels.options import L2SMOptions
    K = kernel_namespace()

    # W stored (D, C) and passed as .T (stride (1, C)), features likewise (stride (1, BIG)): the D-axis
    # offset reaches BIG * (D - 1) > 2^31 elements while each stride still fits an i32 argument.
    # Meta tensors: nothing is allocated, nothing runs.
    B, D, C, BIG = 64, 512, 4_300_000, 4_300_000
    meta = torch.device("meta")
    x = torch.empty(D, BIG, device=meta, dtype=torch.bfloat16)[:, :B].T
    w = torch.empty(D, C, device=meta, dtype=torch.bfloat16).T
    t = torch.empty(B, device=meta, dtype=torch.int64)
    alpha = torch.empty((), device=meta)
    bias = torch.empty(C, device=meta, dtype=torch.bfloat16)
    opts = L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.5, label_smoothing=0.1)
    tens, op_args = opts.op_tensors(B, meta), opts.op_args()
    needs = (True, True, True, True)
    rec = CR.Recorder()
    fcfg = K.forward_config(D, x.dtype, w.dtype, True, gpu=True)
    loss, lse, aux = K.forward(x, w, t, alpha, bias, *tens, *op_args, *needs, launch=rec, config=fcfg,
                               splits=K.forward_splits(B, C, D, True, fcfg, 132))
    g = torch.empty(B, device=meta)
    K.backward(g, g, x, w, t, alpha, bias, *tens, lse, aux, *op_args, *needs, launch=rec,
               config=K.dw_config(D, x.dtype, w.dtype, gpu=True))

    STRIDES = {"stride_d", "stride_xd", "stride_wd"}  # D-axis strides of x / W in every kernel
    PASS = ("tt.splat", "tt.broadcast", "tt.expand_dims", "arith.extsi", "arith.extui", "tt.reshape")
    report = {}
    for kernel, grid, args, kwargs in rec.calls:
        sig, const, attrs, o = CR._spec(kernel, args, kwargs)
        ttir = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options=o).asm["ttir"]
        # values derived from a D stride (splat / broadcast / sign extension of it), then every
        # multiply that takes one: its result type must be 64-bit
        tainted = {"%" + n for n in STRIDES if n in sig and sig[n] != "constexpr"}
        muls = []
        for line in ttir.splitlines():
            m = re.match(r"\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)", line.split(" loc(")[0])
            if not m:
                continue
            res, op, rest = m.groups()
            operands = set(re.findall(r"%[\w.]+", rest.split(" : ")[0]))
            if not operands & tainted:
                continue
            if op in PASS:
                tainted.add(res)
            elif op == "arith.muli":
                muls.append((rest.rsplit(" : ", 1)[1], re.search(r"(: i64|xi64>)$", rest) is not None))
        report.setdefault(kernel.__name__, []).append(
            {"strides": sorted(n for n in STRIDES if n in sig and sig[n] != "constexpr"), "muls": muls,
             "D64": const.get("D64")})
    # _prefetch_l1 assumes rows of 2-byte elements with a unit D stride: the launchers switch it off otherwise
    pf = []
    for wt in (w, torch.empty(C, D, device=meta, dtype=torch.bfloat16), torch.empty(C, D, device=meta)):
        rec = CR.Recorder()
        K.forward(x, wt, t, alpha, None, *tens, *op_args, *needs, launch=rec,
                  config=K.GPU_CONFIGS["fused_prefetch"](D))
        pf.append([c[3]["PREFETCH"] for c in rec.calls if c[0].__name__ == "_fwd_split_kernel"])
    report["prefetch"] = pf
    print("REPORT", json.dumps(report))
""")


def test_wide_d_offsets_are_64bit_in_compiled_kernels(K):
    """Reliability case 1 x 14: a W of 4.3M x 512 stored (D, C) and passed as .T (features likewise) puts D-axis
    offsets past 2^31 elements while the stride itself fits i32, the width Triton gives it. Every kernel
    the launchers start for that case is compiled (sm_90 TTIR, no GPU: meta tensors, nothing runs) and
    every multiply of a D index by a D stride must be 64-bit. This proves the generated address
    arithmetic cannot wrap; it does not run the kernels (that needs an 8 GB W on a GPU)."""
    import json
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path), L2SM_TRITON_PATH="fused")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _WIDE_D_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("REPORT")][-1][len("REPORT "):])
    # the L1 prefetch variant: on for contiguous bf16 W only (not W.T, not fp32 W)
    assert report.pop("prefetch") == [[False], [True], [False]]
    assert set(report) >= {"_inv_norm_kernel", "_colsum_kernel", "_fwd_split_kernel", "_fwd_combine_kernel",
                           "_bwd_rows_kernel", "_bwd_dw_kernel"}, sorted(report)
    for name, launches in report.items():
        for r in launches:
            assert r["strides"], (name, r)  # the transposed layout reached the kernel as a runtime stride
            assert r["muls"], (name, r)  # ... which it multiplies by a D index
            narrow = [ty for ty, wide in r["muls"] if not wide]
            assert not narrow, f"{name}: D index x stride multiplied in 32 bits: {narrow}"


def test_wide_d_path_runs_and_matches(K, dev, monkeypatch):
    """The 64-bit D-index path (D64, taken only past 2^31-element offsets) runs and gives bit-identical
    results on a column-major W and features, all options and a K loop (D = 40 > the interpreter's
    32-wide K tiles)."""
    x, w, t, alpha, b, gl, gs = _inputs(11, 40, 70, dev, seed=12)
    inp = (x.T.contiguous().T, w.T.contiguous().T, t, alpha, b, gl, gs)  # strides (1, B) and (1, C)
    assert inp[1].stride() == (1, 70) and not K.wide_d(40, inp[0], inp[1])
    base = _fwd_bwd(K, inp)
    from l2sm_kernels.backends.triton import loss_backward, loss_forward, norms
    for mod in (loss_forward, loss_backward, norms):  # every launcher that decides D64
        monkeypatch.setattr(mod, "wide_d", lambda D, *tensors: True)
    launched = []

    def launch(kernel):  # runs the kernel, recording its name and whether it took the D64 path
        class _Grid:
            def __getitem__(self, grid):
                def call(**kwargs):
                    launched.append((kernel.__name__, kwargs["D64"]))
                    return kernel[grid](**kwargs)
                return call
        return _Grid()

    for u, v in zip(_fwd_bwd(K, inp, launch=launch), base):
        assert torch.equal(u, v)
    # every kernel that takes x or W ran with 64-bit D indices
    assert {name for name, _ in launched} == {"_inv_norm_kernel", "_fwd_split_kernel", "_fwd_combine_kernel",
                                              "_colsum_kernel", "_bwd_rows_kernel", "_bwd_dw_kernel"}
    assert all(d64 for _, d64 in launched), launched


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compile_training_step(K):
    """On the GPU: a compiled loss step (fullgraph; bf16 features, fp32 master weights, bias, learnable
    alpha, arcface) gives what eager gives: the same kernels run either way."""
    torch.manual_seed(0)
    head = L.L2SoftmaxLoss(512, 4099, bias=True, learn_alpha=True, normalize_weight=True, margin_type="arcface",
                           margin=0.3, backend="triton").cuda()
    feats = torch.randn(96, 512, device="cuda").bfloat16().requires_grad_()
    y = torch.randint(0, 4099, (96,), device="cuda")
    y[:3] = -100
    leaves = [feats] + list(head.parameters())
    out = []
    for fn in (torch.compile(head, fullgraph=True), head):
        for p in leaves:
            p.grad = None
        loss = fn(feats, y)
        loss.backward()
        out.append([loss.detach()] + [p.grad.clone() for p in leaves])
    for a, b in zip(*out):
        assert max_err(a, b) <= 1e-5 * max(float(b.float().abs().max()), 1e-6)


# ---------------------------------------------------------------------------------------------
# GPU-only: the Hopper tile configurations at D = 512, and memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("xdt,wdt,variant", [
    (torch.bfloat16, torch.bfloat16, "default"), (torch.bfloat16, torch.bfloat16, "fused_chained"),
    (torch.bfloat16, torch.bfloat16, "split_d"), (torch.bfloat16, torch.float32, "default"),
    (torch.float16, torch.float16, "default")], ids=["bf16", "bf16-chained", "bf16-split_d", "bf16-fp32W", "fp16"])
def test_cuda_d512_configs_match_reference(K, xdt, wdt, variant):
    """D = 512 takes the one-tile-over-D kernels (chain-break scratch) on the GPU: all options,
    against the float64 reference by the accuracy relation; the alternative tiles agree."""
    case = make_case(300, 512, 5003, dtype=xdt, wdtype=wdt, device="cuda", seed=9, bias=True, alpha_grad=True,
                     normalize_weight=True, margin_type="arcface", margin=0.5, label_smoothing=0.1,
                     ignore_rows=5, reduction="none")
    g = torch.randn(300, device="cuda")
    if variant == "default":
        check_case(case, "triton", g, dtype=xdt)
        return
    inp = (case.x.detach(), case.weight.detach(), case.target, case.alpha.detach(), case.bias.detach(), g,
           torch.zeros_like(g))
    opts = L.L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.5, label_smoothing=0.1)
    base = _fwd_bwd(K, inp, opts)
    cfg = K.forward_config(512, xdt, wdt, True, gpu=True, variant=variant)
    other = _fwd_bwd(K, inp, opts, config=cfg, dw_config=cfg)
    for a, b in zip(other[:2], base[:2]):
        assert max_err(a, b) <= 1e-5 * float(b.abs().max())
    for a, b in zip(other[2:], base[2:]):  # gradients in the input dtype: a few roundings apart
        assert max_err(a, b) <= 2e-2 * float(b.abs().max())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_peak_memory_is_gradients_plus_row_statistics(K):
    """Reliability case 22: fwd + bwd peak beyond the inputs = the gradients + B x D fp32 (O') + small."""
    B, D, C = 1024, 512, 65536
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(C, D, device="cuda") * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, C, (B,), device="cuda")
    L.l2_softmax_loss(x, w, y, backend="triton").backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    L.l2_softmax_loss(x, w, y, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (x.numel() + w.numel()) * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bound = grads + B * D * 4 + 2 * sms * 64 * 64 * 2 * 2 + 64 * B * 4 + (8 << 20)
    assert extra <= bound, (extra, grads, bound)
