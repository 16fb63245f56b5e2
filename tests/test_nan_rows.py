"""NaN where the newer code paths meet it, on every backend: a NaN in any sub-center (not only the
first) of any class of the loss (the class cosine is the maximum over sub-centers, and NaN must win it
as in torch.max, so no row's loss is a plausible number); and in the cosine top-k, many NaN gallery
rows before and after the running threshold (more than the candidate buffer holds, in every thread's
share and chunk), with largest=True (NaN first, by index) and largest=False (NaN never chosen while
numbers remain), against the float64 reference of tests/test_cosine_topk.py."""
import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.testing import make_case, run, run_reference

from conftest import is_slow
from test_cosine_topk import exact_rows, reference


# ---------------------------------------------------------------------------------------------
# the loss: NaN in one sub-center
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize_weight", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_nan_in_any_subcenter(backend, device, K, normalize_weight):
    """One NaN entry in sub-center k of class j, for every k and the first, a middle and the last class:
    every row's loss is NaN (that class competes in every row), as in the float64 reference; so is every
    row's feature gradient. A target row of class j included."""
    B, D, C = 4, 8, 5
    for j in (0, 2, C - 1):
        for k in range(K):
            case = make_case(B, D, C, device=device, seed=10 * j + k, subcenters=K, normalize_weight=normalize_weight,
                             margin_type="arcface", margin=0.5, reduction="none")
            with torch.no_grad():
                case.weight[j * K + k, (j + k) % D] = float("nan")
                case.target[1] = j
            go = torch.ones(B, device=device)
            out, grads = run(case, backend, go)
            ref, rgrads = run_reference(case, True, go)
            where = f"class {j} sub-center {k}"
            assert ref.isnan().all() and out.isnan().all(), (where, out)
            assert grads["x"].isnan().any(dim=1).all() and rgrads["x"].isnan().any(dim=1).all(), where


def test_nan_feature_row_with_subcenters(backend, device):
    """A NaN feature row with K = 3: that row's loss is NaN, the others match the reference (finite)."""
    case = make_case(5, 8, 6, device=device, seed=3, subcenters=3, normalize_weight=True, reduction="none",
                     margin_type="combined", margin=(1.0, 0.3, 0.1))
    with torch.no_grad():
        case.x[2, 5] = float("nan")
    out, _ = run(case, backend)
    ref, _ = run_reference(case, True)
    assert torch.equal(out.isnan().cpu(), torch.tensor([False, False, True, False, False]))
    torch.testing.assert_close(out.double().cpu()[~out.isnan().cpu()], ref.cpu()[~ref.isnan().cpu()],
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the top-k: many NaN rows before (and after) the running threshold
# ---------------------------------------------------------------------------------------------
def _gallery(N, D, nan_rows, seed):
    """Rows whose cosines are exact multiples of 1/4 (tests/test_cosine_topk.py, exact_rows): the many
    ties are broken by index on every backend, with no rounding to decide them."""
    g = torch.Generator().manual_seed(seed)
    q, gal = exact_rows(6, D, g), exact_rows(N, D, g)
    gal[nan_rows, 1] = float("nan")
    return q, gal


def _check(v, i, q, gal, k, largest):
    rv, ri, _ = reference(q, gal, k, largest=largest)
    v, i = v.cpu(), i.cpu()
    assert torch.equal(v.isnan(), rv.isnan())
    assert torch.equal(i, ri)
    assert torch.equal(v[~v.isnan()].double(), rv[~rv.isnan()])


LAYOUTS = {
    "first-200": (lambda N: list(range(200))),  # more than k + 64 candidates of NaN before any number
    "every-other": (lambda N: list(range(0, 300, 2))),
    "both-shares": (lambda N: list(range(0, 90)) + list(range(N // 2, N // 2 + 90))),  # each thread's share
    "late": (lambda N: list(range(N - 120, N))),  # after the threshold is established
}


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_topk_many_nan_rows(backend, device, layout, largest):
    N, D = (400, 8) if is_slow(backend) else (640, 16)
    nan_rows = LAYOUTS[layout](N)
    q, gal = _gallery(N, D, nan_rows, seed=len(layout))
    for k in ((3, 100) if not is_slow(backend) else (3,)):
        v, i = L.cosine_topk(q.to(device), gal.to(device), k, largest=largest, backend=backend)
        _check(v, i, q, gal, k, largest)
        if largest:
            assert torch.equal(i.cpu()[:, :k], torch.tensor(nan_rows[:k]).expand(6, k))
        else:
            assert not v.isnan().any()


@pytest.mark.parametrize("largest", [True, False])
def test_topk_nan_rows_cpu_small_blocks(largest):
    """The cpu kernel with 1 and 2 threads and small chunks (the threshold is set after the first chunk of
    16 rows; NaN rows arrive in later chunks and fill whole candidate buffers)."""
    if not L.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    from l2sm_kernels.backends.cpu_topk import set_blocks

    N = 700
    nan_rows = list(range(40, 240)) + list(range(400, 420))
    q, gal = _gallery(N, 12, nan_rows, seed=9)
    q[4, 0] = float("nan")  # a NaN query: NaN scores, the first k indices
    n = torch.get_num_threads()
    old = set_blocks()
    try:
        for blocks in [(2, 16), (1000, 5000)]:
            for threads in (1, 2):
                set_blocks(*blocks)
                torch.set_num_threads(threads)
                for k in (1, 5, 70):
                    v, i = L.cosine_topk(q, gal, k, largest=largest, backend="cpu")
                    _check(v, i, q, gal, k, largest)
                    assert torch.equal(i[4], torch.arange(k)) and v[4].isnan().all()
    finally:
        set_blocks(*old)
        torch.set_num_threads(n)
