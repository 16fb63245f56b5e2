"""l2sm_kernels.cosine_topk on every backend (backend is a fixture, conftest.py) against the float64
reference: torch in float64 with a stable sort (equal scores by the lower index, NaN above every number),
and reliability case 34 (docs/reliability.md): k out of range, duplicate / zero / NaN rows, ties."""
import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels.backends.registry import topk_op_for
from l2sm_kernels.backends.topk import TOPK_SCHEMA, decode_scores, encode_scores
from l2sm_kernels.testing import ATOL_REL, assert_accurate

from conftest import is_slow, supports_fp64


def reference(q, g, k, normalize_gallery=True, largest=True, eps=1e-12):
    """float64 scores, the first k by (score, index) with NaN above every number: (values, indices)."""
    qd, gd = q.detach().double().cpu(), g.detach().double().cpu()
    s = (qd / qd.norm(dim=1, keepdim=True).clamp_min(eps)) @ gd.T
    if normalize_gallery:
        s = s / gd.norm(dim=1).clamp_min(eps)
    v, i = torch.sort(s, dim=1, descending=largest, stable=True)
    return v[:, :k], i[:, :k], s


def plain(q, g, k, largest=True):
    """What users write in the input dtype (the promoted one when they differ): F.normalize both, matmul, topk."""
    dt = torch.promote_types(q.dtype, g.dtype)
    return (F.normalize(q.to(dt), dim=1) @ F.normalize(g.to(dt), dim=1).T).topk(k, dim=1, largest=largest).values


def check_topk(v, i, q, g, k, *, largest=True, normalize_gallery=True, gap=1e-4):
    """Values by the accuracy relation (positionally: sorted lists); each returned index has the score
    returned for it; indices distinct per row; and equal to the reference's wherever the reference's
    neighbouring scores are more than `gap` apart (no near-tie to resolve differently by rounding)."""
    Q = q.shape[0]
    rv, ri, s = reference(q, g, k, normalize_gallery, largest)
    assert v.shape == (Q, k) and i.shape == (Q, k) and i.dtype == torch.int64
    want = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    assert v.dtype == want
    dt = q.dtype if q.dtype != torch.float32 else g.dtype
    if normalize_gallery:
        assert_accurate("values", v, rv, plain(q, g, k, largest), dt)
    i = i.cpu()
    got = s.gather(1, i)
    tol = 10 * ATOL_REL[dt]
    assert max((got - v.cpu().double()).abs().max().item(), 0) <= tol
    assert all(len(set(r.tolist())) == k for r in i)
    full = torch.sort(s, dim=1, descending=largest, stable=True).values[:, : k + 1]
    d = (full[:, 1:] - full[:, :-1]).abs()  # gap to the next
    d = torch.cat([d, torch.full((Q, k - d.shape[1]), float("inf"), dtype=d.dtype)], 1)  # k = N: none after
    sep = torch.ones_like(rv, dtype=torch.bool)
    sep &= d > gap
    sep[:, 1:] &= d[:, :-1] > gap
    assert torch.equal(i[sep], ri[sep])
    assert_order(v, i, largest)


def _inputs(Q, N, D, dtype, device, seed=0, gdtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g).to(device=device, dtype=dtype)
    gal = torch.randn(N, D, generator=g).mul(3.0).to(device=device, dtype=gdtype or dtype)
    return q, gal


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("largest", [True, False])
def test_matches_reference(backend, device, dtype, largest):
    if dtype == torch.float64 and not supports_fp64(backend):
        pytest.skip("float64: eager and cpu")
    Q, N, D, k = (9, 83, 24, 5) if is_slow(backend) else (37, 1001, 40, 10)
    q, g = _inputs(Q, N, D, dtype, device)
    v, i = L.cosine_topk(q, g, k, largest=largest, backend=backend)
    check_topk(v, i, q, g, k, largest=largest)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 17, 5, 17), (4, 97, 33, 1), (5, 130, 7, 40), (2, 257, 16, 257),
                                   (0, 10, 8, 3)], ids=lambda s: "Q{}-N{}-D{}-k{}".format(*s))
def test_shapes(backend, device, shape):
    """k = 1, k = N, k larger than a tile (the interpreter's tiles are 16 wide), ragged N and D, Q = 0."""
    Q, N, D, k = shape
    q, g = _inputs(Q, N, D, torch.float32, device, seed=1)
    v, i = L.cosine_topk(q, g, k, backend=backend)
    assert v.shape == (Q, k) and i.shape == (Q, k)
    if Q:
        check_topk(v, i, q, g, k)


def test_large_k(backend, device):
    """k up to 1024 (triton: above its register limit, the documented chunked fallback)."""
    Q, N, D, k = (3, 1100, 8, 1024)
    q, g = _inputs(Q, N, D, torch.float32, device, seed=2)
    v, i = L.cosine_topk(q, g, k, backend=backend)
    check_topk(v, i, q, g, k)
    v, i = L.cosine_topk(q, g, k, largest=False, backend=backend)
    check_topk(v, i, q, g, k, largest=False)


def test_mixed_dtypes_and_no_gallery_normalization(backend, device):
    q, g = _inputs(6, 70, 12, torch.bfloat16, device, seed=3, gdtype=torch.float32)
    v, i = L.cosine_topk(q, g, 4, backend=backend)
    check_topk(v, i, q, g, 4)
    gn = F.normalize(g.float(), dim=1) * 2.0  # rows of norm 2: scores are 2 x the cosine
    v, i = L.cosine_topk(q, gn, 4, normalize_gallery=False, backend=backend)
    rv, ri, _ = reference(q, gn, 4, normalize_gallery=False)
    check_topk(v, i, q, gn, 4, normalize_gallery=False)
    torch.testing.assert_close(v.cpu().double(), rv, rtol=0, atol=1e-5)


def assert_order(v, i, largest=True):
    """The returned order is the one the returned values imply: value order (NaN above every number, as
    torch.sort), then the lower index among equal values. The tie rule is on the computed scores: identical
    gallery rows need not score identically (a BLAS may compute some columns of one product with another
    kernel), so this checks consistency, not that duplicates come out in index order."""
    v, i = v.cpu(), i.cpu()
    by_index = torch.argsort(i, dim=1)  # indices are distinct per row: no tie here
    vi, ii = v.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(vi, dim=1, descending=largest, stable=True).indices  # equal values keep index order
    assert torch.equal(ii.gather(1, order), i), (v, i)


def test_strides(backend, device):
    """Transposed gallery (stored (D, N)), queries with a column stride, an expanded (stride 0) gallery row."""
    q, g = _inputs(7, 90, 20, torch.float32, device, seed=4)
    qs = torch.zeros(7, 40, device=device)[:, ::2].copy_(q)  # stride (40, 2)
    gt = g.T.contiguous().T  # stride (1, 90)
    assert qs.stride() == (40, 2) and gt.stride() == (1, 90)
    v, i = L.cosine_topk(qs, gt, 6, backend=backend)
    v0, i0 = L.cosine_topk(q, g, 6, backend=backend)
    check_topk(v, i, q, g, 6)  # indices as the reference's wherever no near-tie exists
    check_topk(v0, i0, q, g, 6)  # the strides may change the product's rounding (another BLAS kernel), not more
    torch.testing.assert_close(v, v0, rtol=0, atol=1e-6)
    ge = g[:1].expand(30, 20)  # 30 duplicates of one row, stride (0, 1)
    for k in (5, 30):
        for largest in (True, False):
            v, i = L.cosine_topk(q, ge, k, largest=largest, backend=backend)
            assert_order(v, i, largest)  # ties to the lower index among equal computed scores
            assert all(len(set(r.tolist())) == k for r in i.cpu())
            want = F.cosine_similarity(q.cpu().double(), g[:1].cpu().double())[:, None]
            assert (v.cpu().double() - want).abs().max() <= 1e-6  # every duplicate's score within rounding
    # exactly representable duplicates score identically on every BLAS: then they are in index order
    qe, gx = exact_case()
    gxe = gx[3:4].to(device).expand(30, 16)
    v, i = L.cosine_topk(qe.to(device), gxe, 5, backend=backend)
    assert torch.equal(i.cpu(), torch.arange(5).expand(11, 5))


# ---------------------------------------------------------------------------------------------
# reliability case 34: ties, duplicates, zero rows, NaN rows -- identical on every backend
# ---------------------------------------------------------------------------------------------
def exact_rows(n, D, gen):
    """Rows with four entries +-1 (norm 2) times a power of two: normalized entries +-1/2, every cosine a
    multiple of 1/4, exact in fp16 / bf16 / fp32 whatever the order of the sums: many exact ties."""
    out = torch.zeros(n, D)
    for r in range(n):
        pos = torch.randperm(D, generator=gen)[:4]
        out[r, pos] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
    return out * (2.0 ** torch.randint(-2, 3, (n, 1), generator=gen).float())


def exact_case(Q=11, N=61, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, g = exact_rows(Q, D, gen), exact_rows(N, D, gen)
    g[7], g[20], g[40] = g[3], g[3] * 4, g[3]  # duplicates (and a scaled duplicate)
    g[11] = 0.0  # a zero row: cosine 0 to everything, ties with the many exact zeros
    q[2] = 0.0  # a zero query: every score 0, so the first k indices
    return q, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("largest", [True, False])
def test_exact_ties_identical_on_every_backend(backend, device, dtype, largest):
    """Exactly representable scores with many ties: bit-identical to the reference, lower index first."""
    q, g = exact_case()
    for k in (1, 9, 61):
        v, i = L.cosine_topk(q.to(device, dtype), g.to(device, dtype), k, largest=largest, backend=backend)
        rv, ri, _ = reference(q, g, k, largest=largest)
        assert torch.equal(i.cpu(), ri), (k, i, ri)
        assert torch.equal(v.cpu().double(), rv), k
    assert torch.equal(i[2].cpu(), torch.arange(61)) if largest else True
    v, i = L.cosine_topk(q.to(device, dtype), g.to(device, dtype), 5, backend=backend)
    assert torch.equal(i[2].cpu(), torch.arange(5)) and not v[2].any()  # zero query: scores 0, first indices
    assert float(L.cosine_topk(q.to(device, dtype)[:1], g.to(device, dtype), 61, backend=backend)[0][0].abs()
                 .max()) <= 1.0


@pytest.mark.parametrize("largest", [True, False])
def test_nan_rows(backend, device, largest):
    """NaN is larger than every number: NaN gallery rows come first (largest) or last (smallest), in index
    order, with value NaN; a NaN query gets NaN scores and the first k indices."""
    q, g = exact_case(seed=1)
    g[5, 0] = float("nan")
    g[9, 3] = float("nan")
    q[4, 1] = float("nan")
    N = g.shape[0]
    v, i = L.cosine_topk(q.to(device), g.to(device), N, largest=largest, backend=backend)
    v, i = v.cpu(), i.cpu()
    rv, ri, _ = reference(q, g, N, largest=largest)
    assert torch.equal(i, ri)
    assert torch.equal(v.isnan(), rv.isnan()) and torch.equal(v[~v.isnan()].double(), rv[~rv.isnan()])
    for r in (0, 1, 2, 3, 5):
        nan_at = [0, 1] if largest else [N - 2, N - 1]
        assert i[r, nan_at].tolist() == [5, 9] and v[r, nan_at].isnan().all()
        assert not v[r].isnan().sum() > 2
    assert v[4].isnan().all() and torch.equal(i[4], torch.arange(N))
    v1, i1 = L.cosine_topk(q.to(device), g.to(device), 1, largest=largest, backend=backend)
    assert torch.equal(i1[:, 0].cpu(), ri[:, 0]) and i1[4, 0] == 0  # the NaN query: index 0
    assert (i1[[0, 1, 2, 3, 5], 0].cpu() == 5).all() if largest else not v1[[0, 1, 2, 3, 5]].isnan().any()


def test_inf_and_huge_rows(backend, device):
    """A row with an infinite entry normalizes to NaN (inf / inf), as F.normalize does: it ranks as NaN."""
    q, g = exact_case(seed=2)
    g[6, 2] = float("inf")
    v, i = L.cosine_topk(q.to(device), g.to(device), 3, backend=backend)
    assert (i[:, 0].cpu() == 6).all() and v[:, 0].isnan().all()


@pytest.mark.parametrize("scale", [(1e20, 1.0), (1.0, 1e20), (1e30, 1.0), (1e-30, 1e20)], ids=str)
def test_rows_of_huge_norm(backend, device, scale):
    """Rows whose fp32 sum of squares overflows (|v| > 1.8e19; reliability case 46): the reference's
    neighbours and cosines on every backend, for k below and above triton's register limit (k > 256 runs
    its fallback, the eager algorithm). eager took fp32 norms: inf, every cosine 0 or NaN, wrong indices.
    (Triton's products take the inputs as stored: |q| |g| must stay below 3.4e38, docs/design.md.)"""
    qs, gs = scale
    q, g = _inputs(4, 300, 16, torch.float32, "cpu", seed=15)
    q, g = q * qs, g * gs
    for k in (3, 260):
        v, i = L.cosine_topk(q.to(device), g.to(device), k, backend=backend)
        check_topk(v, i, q, g, k)


# ---------------------------------------------------------------------------------------------
# errors (reliability case 34) and the API
# ---------------------------------------------------------------------------------------------
def test_errors(backend, device):
    q, g = _inputs(4, 10, 8, torch.float32, device)
    cases = [
        (dict(k=11), ValueError, r"k must be in \[1, N\] where N = 10"),
        (dict(k=0), ValueError, r"k must be in \[1, N\]"),
        (dict(k=-3), ValueError, r"k must be in \[1, N\]"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(k=2, gallery=g[:, :5]), ValueError, r"gallery must have shape \(N, 8\)"),
        (dict(k=2, queries=q[0]), ValueError, "queries must be 2-D"),
        (dict(k=2, queries=q.long()), TypeError, "queries must be float16"),
        (dict(k=2, gallery=[[1.0]]), TypeError, "gallery must be a torch.Tensor"),
        (dict(k=2, queries=q[:, :0], gallery=g[:, :0]), ValueError, "at least one feature"),
        (dict(k=2, gallery=g.to("meta")), ValueError, "one device"),
        (dict(k=2, largest=1), TypeError, "largest must be a bool"),
        (dict(k=2, normalize_gallery=None), TypeError, "normalize_gallery must be a bool"),
        (dict(k=2, eps=0.0), ValueError, "eps must be a positive"),
        (dict(k=2, backend="fast"), ValueError, "backend must be one of"),
    ]
    for kw, exc, msg in cases:
        args = dict(queries=q, gallery=g, backend=backend)
        args.update(kw)
        k = args.pop("k")
        with pytest.raises(exc, match=msg):
            L.cosine_topk(args.pop("queries"), args.pop("gallery"), k, **args)
    empty = g[:0]
    with pytest.raises(ValueError, match="N = 0"):
        L.cosine_topk(q, empty, 1, backend=backend)
    if not supports_fp64(backend):
        with pytest.raises(ValueError, match="does not take torch.float64"):
            L.cosine_topk(q.double(), g, 2, backend=backend)


def test_inputs_untouched_and_deterministic(backend, device):
    q, g = _inputs(13, 300, 20, torch.float32, device, seed=5)
    g[3] = 0.0
    q0, g0 = q.clone(), g.clone()
    a = L.cosine_topk(q, g, 7, backend=backend)
    b = L.cosine_topk(q, g, 7, backend=backend)
    assert torch.equal(q, q0) and torch.equal(g, g0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_no_gradient(backend, device):
    q, g = _inputs(3, 20, 8, torch.float32, device, seed=6)
    q.requires_grad_(True)
    v, i = L.cosine_topk(q, g, 2, backend=backend)
    assert not v.requires_grad and v.grad_fn is None


def test_auto_picks_cpu_for_cpu_tensors():
    if not L.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    q, g = _inputs(5, 50, 8, torch.float32, "cpu", seed=7)
    a = L.cosine_topk(q, g, 3)
    b = L.cosine_topk(q, g, 3, backend="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_op_schema_and_opcheck(backend, device):
    """The op of every backend (the cpu one defined in C++) has the shared schema; opcheck passes."""
    op = topk_op_for(backend)
    overload = op._opoverload if hasattr(op, "_opoverload") else op
    schema = str(overload._schema).replace("SymInt ", "int ")
    assert schema == f"l2sm::{backend}_cosine_topk{TOPK_SCHEMA}"
    if is_slow(backend):
        pytest.skip("opcheck's aot_dispatch test traces fake tensors, which the interpreter cannot run")
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    q, g = _inputs(4, 30, 8, dtype, device, seed=8)
    for largest in (True, False):
        torch.library.opcheck(op, (q, g, 3, True, largest, 1e-12))


def test_compile_fullgraph(backend, device):
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    q, g = _inputs(6, 40, 8, torch.float32, device, seed=9)

    def f(q, g):
        v, i = L.cosine_topk(q, g, 4, backend=backend)
        return 1.0 - v.mean(dim=1), i

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, g)
    want = f(q, g)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])


# ---------------------------------------------------------------------------------------------
# backend specifics: the cpu kernel's blocks and threads, the triton tiles
# ---------------------------------------------------------------------------------------------
def test_cpu_blocks_and_threads_do_not_change_the_result():
    if not L.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    from l2sm_kernels.backends.cpu_topk import set_blocks

    gen = torch.Generator().manual_seed(10)
    q, g = exact_rows(45, 24, gen), exact_rows(2000, 24, gen)  # exact scores whatever the BLAS: many ties
    g[100:140] = g[50]  # ties across chunks and threads
    qr, gr = _inputs(45, 2000, 24, torch.float32, "cpu", seed=10)  # inexact scores
    refs = {largest: reference(q, g, 50, largest=largest)[:2] for largest in (True, False)}
    n = torch.get_num_threads()
    old = set_blocks()
    try:
        for blocks in [(1, 1), (7, 33), (1000, 5000), (16, 64)]:
            for threads in (1, 2, 3):
                set_blocks(*blocks)
                torch.set_num_threads(threads)
                for largest in (True, False):
                    v, i = L.cosine_topk(q, g, 50, largest=largest, backend="cpu")
                    ref = refs[largest]
                    assert torch.equal(i, ref[1]), (blocks, threads, largest)
                    assert torch.equal(v.double(), ref[0]), (blocks, threads, largest)
                    # inexact scores: the product's rounding depends on the block shapes and the thread
                    # split (BLAS kernels), the selection does not: indices as the reference's away from
                    # near-ties, and the order the returned values imply
                    v, i = L.cosine_topk(qr, gr, 50, largest=largest, backend="cpu")
                    check_topk(v, i, qr, gr, 50, largest=largest)
                    assert_order(v, i, largest)
                    again = L.cosine_topk(qr, gr, 50, largest=largest, backend="cpu")
                    assert torch.equal(again[0], v) and torch.equal(again[1], i)  # bitwise reproducible
    finally:
        set_blocks(*old)
        torch.set_num_threads(n)
    with pytest.raises(ValueError, match="query_block must be an int"):
        set_blocks(-1)


def test_triton_tiles_and_splits():
    if not L.available_backends()["triton"].available:
        pytest.skip("triton backend unavailable")
    from l2sm_kernels.backends.triton import cosine_topk as T

    q, g = exact_case(Q=9, N=77, D=20, seed=11)
    q, g = q.to(_triton_device()), g.to(_triton_device())
    rv, ri, _ = reference(q, g, 20)
    for tiles in [(16, 16, 16, 4), (16, 32, 8, 4)]:
        v, i = T.cosine_topk(q, g, 20, True, True, 1e-12, tiles=tiles)
        assert torch.equal(i.cpu(), ri) and torch.equal(v.cpu().double(), rv), tiles
    comp = torch.tensor([[(5 << 32) | (2**32 - 1 - 3)]], dtype=torch.int64)
    val, idx = decode_scores(comp, True)
    assert idx.item() == 3 and val.dtype == torch.float32


def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# memory: no Q x N buffer
# ---------------------------------------------------------------------------------------------
def test_workspace_is_bounded(backend, device):
    """Peak allocation of one call beyond its inputs and outputs: the documented workspace, far below the
    Q x N score matrix (128 MiB here)."""
    if is_slow(backend):
        pytest.skip("the interpreter's memory is not the kernel's; measured on the GPU")
    from l2sm_kernels.backends.eager_topk import CHUNK_BYTES
    from l2sm_kernels.testing import peak_bytes

    Q, N, D, k = 256, 131072, 8, 10
    q, g = _inputs(Q, N, D, torch.float32, device, seed=12)
    peak, _ = peak_bytes(lambda: L.cosine_topk(q, g, k, backend=backend), device)
    out = Q * k * 12
    qxn = Q * N * 4
    if backend == "eager":
        bound = 4 * CHUNK_BYTES + 2 * Q * D * 4 + out + (1 << 20)
    elif backend == "cpu":
        threads = torch.get_num_threads()
        cap = k + 64
        bound = threads * (256 * 512 * 4 + 512 * 4 + Q * cap * 16) + 3 * Q * D * 4 + out + (1 << 20)
    else:  # triton on CUDA: inverse norms and the split partials, (2 SMs x BLOCK_Q + Q) x KP x 8 bytes at most
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        bound = (Q + N) * 4 + (2 * sms * 32 + Q) * 16 * 8 * 2 + out + (1 << 20)
    assert peak <= bound < qxn / 3, (peak, bound, qxn)


def test_score_keys_order_and_round_trip():
    """The int64 keys (eager's fp32 selection, triton's merge): the order (score, then lower index, NaN
    above every number) and an exact round trip of the score (-0.0 comes back as +0.0)."""
    s = torch.tensor([[0.5, -0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 0.5, -2.0,
                       float("-nan"), 3.4e38]])
    for largest in (True, False):
        keys = encode_scores(s.clone(), 7, largest)
        order = torch.argsort(keys, dim=1, descending=True)
        want = torch.sort(s.double(), dim=1, descending=largest, stable=True)[1]
        # -0.0 / +0.0 and the two NaNs are ties: the lower index first, as the stable sort of the reference
        assert torch.equal(order, want), (largest, order, want)
        v, i = decode_scores(keys, largest)
        assert torch.equal(i, torch.arange(7, 7 + s.shape[1]).expand_as(i))
        assert torch.equal(v.isnan(), s.isnan()) and torch.equal(v[~v.isnan()], s[~s.isnan()])
        assert not torch.signbit(v[0, 1])  # -0.0 -> +0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eager_chunks_do_not_change_the_result(dtype):
    """The eager backend's chunked merge (unique keys for fp32, the stable sort for fp64) over small chunks:
    the same exact ties and order as the reference, whatever the chunk."""
    from l2sm_kernels.backends.eager_topk import cosine_topk_chunked

    q, g = exact_case(seed=3)
    g[30, 1] = float("nan")
    for largest in (True, False):
        rv, ri, _ = reference(q, g, 20, largest=largest)
        for chunk in (20, 23, 64):
            v, i = cosine_topk_chunked(q.to(dtype), g.to(dtype), 20, True, largest, 1e-12, chunk=chunk)
            assert torch.equal(i, ri), (chunk, largest)
            assert torch.equal(v.isnan(), rv.isnan()) and torch.equal(v[~v.isnan()].double(), rv[~rv.isnan()])
    qr, gr = _inputs(9, 500, 16, dtype, "cpu", seed=13)
    v, i = cosine_topk_chunked(qr, gr, 12, True, True, 1e-12, chunk=37)
    check_topk(v, i, qr, gr, 12)


@pytest.mark.parametrize("largest", [True, False])
def test_nan_row_after_the_running_threshold(backend, device, largest):
    """A NaN gallery row far into the gallery (after the running top-k has a threshold: the cpu kernel's
    filter, triton's later tiles, eager's later chunks) still ranks as NaN: first (largest) or not at all."""
    q, g = _inputs(5, 700, 16, torch.float32, "cpu", seed=14)
    g[613, 4] = float("nan")
    rv, ri, s = reference(q, g, 3, largest=largest)
    top = torch.sort(s.nan_to_num(0.0), dim=1, descending=largest).values[:, :5]
    assert float((top[:, :-1] - top[:, 1:]).abs().min()) > 1e-5  # no near-tie: the same indices on any BLAS
    v, i = L.cosine_topk(q.to(device), g.to(device), 3, largest=largest, backend=backend)
    assert torch.equal(i.cpu(), ri)
    if largest:
        assert (i[:, 0].cpu() == 613).all() and v[:, 0].isnan().all() and not v[:, 1:].isnan().any()
    else:
        assert not v.isnan().any()


_COMPILE_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import compile_report as CR
from l2sm_kernels.backends.triton import cosine_topk as T
rows = []
for dt, k in ((torch.bfloat16, 10), (torch.float32, 256)):
    q = torch.empty(2048, 512, device="meta", dtype=dt)
    g = torch.empty(262144, 512, device="meta", dtype=dt)
    rec = CR.Recorder()
    T.cosine_topk(q, g, k, True, True, 1e-12, launch=rec, tiles=T._tiles(torch.device("cuda"), 512))
    rows += [dict(r, k=k, dtype=str(dt)) for r in CR.compile_calls(rec.calls, 90)]
print(json.dumps(rows, default=str))
"""


def test_triton_topk_compiles_for_hopper():
    """The split kernel with the GPU tiles (its runtime-bounded selection loop included) compiles for sm_90
    with no GPU present (triton's bundled ptxas): no error, shared memory within 227 KiB, spills bounded."""
    if not L.available_backends()["triton"].available:
        pytest.skip("triton backend unavailable")
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"_inv_norm_kernel", "_topk_split_kernel"}
    for r in rows:
        assert "error" not in r, r
        assert r["shared"] <= 227 * 1024 and r["stack"] <= 1024, r
