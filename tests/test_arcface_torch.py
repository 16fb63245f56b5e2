"""l2sm_kernels.compat.arcface_torch against a reference of InsightFace arcface_torch's forward, written
here from their formulas (../docs/arcface_torch.md; not their code): logits = clamp(normalize(emb) .
normalize(W)^T, -1, 1); filtering (non-target cosines above t set to 0 by a constant mask); ArcFace
cos(arccos c + m2) on the target column under no_grad (no fallback past pi; the gradient passes as if
there were no margin) or CosFace c - m3; times s; loss = mean over rows of -log(max(p_y, 1e-30)), whose
gradient is softmax - onehot. Their sampling: the unique positive classes, then if num_sample =
int(rate n) >= #positives a draw torch.rand(n) with the positives set to 2 and the top num_sample
indices sorted, else the positives alone.

The reference runs in float64 and in float32 (the accuracy relation of docs/conventions.md), one
process, and on every rank of 2 and 3 gloo processes (on the gathered batch and the full matrix)."""
import math

import pytest
import torch
import torch.nn.functional as F

from l2sm_kernels.compat import arcface_torch as AT
from l2sm_kernels.compat.arcface_torch import CombinedMarginLoss, PartialFC_V2
from l2sm_kernels.options import L2SMOptions
from l2sm_kernels.testing import assert_accurate

from conftest import backend_device, is_slow
from spawned import Pool

ARC, COS, COS_IGNORING = (1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.3, 0.35)


def _skip_unless_filter(backend, device):
    """The backends that do not implement negatives='filter' yet (issue 20 adds them in steps) say so."""
    try:
        AT.l2_softmax_loss(torch.randn(2, 4, device=device), torch.randn(3, 4, device=device),
                           torch.tensor([0, 1], device=device), backend=backend, negatives="filter", negatives_t=0.5)
    except NotImplementedError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------
# the reference: their forward from their formulas
# ---------------------------------------------------------------------------------------------
def their_sample(labels, num_local, num_sample):
    """Their Partial FC sample (local indices, sorted) for local labels (-1: not in the shard)."""
    positive = torch.unique(labels[labels >= 0], sorted=True)
    if num_sample - positive.numel() >= 0:
        perm = torch.rand(num_local, device=labels.device)  # theirs draws on the CPU: the same numbers there
        perm[positive] = 2.0
        return torch.topk(perm, k=num_sample)[1].sort()[0]
    return positive


def their_loss(emb, labels, weight, margins, threshold=0.0, dtype=torch.float64, sample=None):
    """Their mean loss over the rows of emb (all rows: labels are global = local at world size 1),
    differentiable with their gradient, computed in `dtype`."""
    s, (m1, m2, m3) = 64.0, margins
    emb, weight = emb.to(dtype), weight.to(dtype)
    if sample is not None:
        weight = weight[sample]
        labels = torch.searchsorted(sample, labels)
    logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    if threshold > 0:
        logits = logits * (~((logits > threshold) & ~onehot)).to(dtype)
    c = logits[onehot]
    if m1 == 1.0 and m3 == 0.0:
        f = c + (torch.cos(torch.acos(c.detach()) + m2) - c.detach())  # value with the margin, gradient 1
    elif m3 > 0:
        f = c - m3
    else:
        raise ValueError("their CombinedMarginLoss raises here")
    z = s * torch.where(onehot, torch.zeros_like(logits), logits)
    z = z + s * onehot.to(dtype) * f[:, None]
    loss = torch.logsumexp(z, dim=1) - z[onehot]
    cap = -math.log(float(torch.tensor(1e-30, dtype=torch.float32)))
    return (loss + (loss.clamp_max(cap) - loss).detach()).mean()


def _problem(B=7, D=12, C=19, seed=0, deep_rows=2, dtype=torch.float32, device="cpu"):
    """Embeddings, labels and a weight (their init scale), the first `deep_rows` rows with a target
    cosine below -0.95 (deep in the region where the library's default arcface uses its fallback)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g) * 0.01
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g)
    x[:deep_rows] = -F.normalize(w[y[:deep_rows]]) * 3 + 0.05 * torch.randn(deep_rows, D, generator=g)
    return x.to(device=device, dtype=dtype), y.to(device), w.to(device)


def _compat_loss(head, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = head(x, y, **kw)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad.clone()


def _ref_loss(x, w, y, margins, dtype, threshold=0.0, sample=None):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = their_loss(x, y, w, margins, threshold, dtype, sample)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _check_against_reference(got, x, w, y, margins, threshold=0.0, sample=None):
    ref = _ref_loss(x, w, y, margins, torch.float64, threshold, sample)
    plain = _ref_loss(x, w, y, margins, torch.float32, threshold, sample)
    for name, a, r, p in zip(("loss", "grad x", "grad weight"), got, ref, plain):
        assert_accurate(name, a, r, p, torch.float32)


@pytest.fixture
def head_factory(backend, device):
    def make(margins, C, D, sample_rate=1.0, threshold=0):
        if threshold > 0:
            _skip_unless_filter(backend, device)
        return PartialFC_V2(CombinedMarginLoss(64, *margins, interclass_filtering_threshold=threshold), D, C,
                            sample_rate, backend=backend, device=device)
    return make


# ---------------------------------------------------------------------------------------------
# one process (world size 1, no torch.distributed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margins", [ARC, COS, COS_IGNORING], ids=["arcface", "cosface", "cosface-m1m2-ignored"])
def test_forward_matches_theirs(head_factory, device, margins):
    x, y, w = _problem(device=device)
    head = head_factory(margins, 19, 12)
    with torch.no_grad():
        head.weight.copy_(w)
    got = _compat_loss(head, x, y)
    _check_against_reference(got, x, w, y, margins)
    if margins == ARC:  # the rows past pi: no fallback (the library's default would differ by > 1 here)
        fallback = PartialFC_V2(CombinedMarginLoss(64, *margins), 12, 19, device=device)
        with torch.no_grad():
            fallback.weight.copy_(w)
        lib = AT.l2_softmax_loss(x, w, y, 64.0, reduction="none", **dict(fallback.options, margin_fallback=True))
        ours = AT.l2_softmax_loss(x, w, y, 64.0, reduction="none", **fallback.options)
        assert float((lib - ours)[:2].abs().min()) > 1.0


def test_sampling_matches_theirs(head_factory, device):
    """sample_rate 0.5 (num_sample 9 of 19, more than the positives) and 0 (positives only)."""
    x, y, w = _problem(deep_rows=0, device=device)
    for rate in (0.5, 0.0):
        head = head_factory(ARC, 19, 12, sample_rate=rate)
        with torch.no_grad():
            head.weight.copy_(w)
        torch.manual_seed(5)
        got = _compat_loss(head, x, y)
        torch.manual_seed(5)
        sample = their_sample(y, 19, int(rate * 19))
        assert torch.equal(head.weight_index, sample)
        _check_against_reference(got, x, w, y, ARC, sample=sample)
        unsampled = torch.ones(19, dtype=torch.bool, device=device)
        unsampled[sample] = False
        assert torch.all(got[2][unsampled] == 0)


@pytest.mark.parametrize("margins", [ARC, COS], ids=["arcface", "cosface"])
def test_interclass_filtering_matches_theirs(head_factory, device, margins):
    """t = 0.1: many non-target cosines above it (set to 0, no gradient), and targets above it too
    (rows 2-4 near their class: the target column is never filtered)."""
    x, y, w = _problem(deep_rows=1, device=device)
    noise = torch.randn(3, 12, generator=torch.Generator().manual_seed(3)).to(device)
    x[2:5] = F.normalize(w[y[2:5]]) * 2 + 0.02 * noise
    cos = F.normalize(x) @ F.normalize(w).T
    target = F.one_hot(y, 19).bool()
    assert int(((cos > 0.1) & ~target).sum()) > 10 and bool((cos[target][2:5] > 0.1).all())
    head = head_factory(margins, 19, 12, threshold=0.1)
    with torch.no_grad():
        head.weight.copy_(w)
    got = _compat_loss(head, x, y)
    _check_against_reference(got, x, w, y, margins, threshold=0.1)
    unfiltered = _ref_loss(x, w, y, margins, torch.float64)[0]
    assert abs(float(unfiltered - got[0])) > 0.1  # the filter changed the loss


def test_filtering_runs_through_the_op_option():
    opts = AT.loss_options(AT.margin_spec(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.3)))
    assert opts["negatives"] == "filter" and opts["negatives_t"] == 0.3


def _train(head_or_ref, steps, seed, margins, sample_rate, backend="auto", threshold=0.0, device="cpu"):
    """A few SGD steps of a linear 'backbone' (6 -> 12) and the head: their classes (the reference) or
    the compat ones, from the same initialization and the same RNG stream. Returns the losses."""
    torch.manual_seed(seed)
    backbone = torch.nn.Linear(6, 12).to(device)
    C = 40
    if head_or_ref == "compat":
        head = PartialFC_V2(CombinedMarginLoss(64, *margins, threshold), 12, C, sample_rate, backend=backend)
        weight = head.to(device).weight
    else:
        weight = torch.nn.Parameter(torch.normal(0, 0.01, (C, 12)).to(device))  # their init, the same draw
    opt = torch.optim.SGD([*backbone.parameters(), weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        B = 6 if step % 2 == 0 else 4  # a batch size that changes (theirs asserts it does not)
        img, y = torch.randn(B, 6, generator=g).to(device), torch.randint(0, C, (B, 1), generator=g).to(device)
        y_before = y.clone()
        emb = backbone(img)
        if head_or_ref == "compat":
            loss = head(emb, y)
        else:
            labels = y.view(-1)
            sample = their_sample(labels, C, int(sample_rate * C)) if sample_rate < 1 else None
            loss = their_loss(emb, labels, weight, margins, threshold, dtype=torch.float32, sample=sample)
        assert torch.equal(y, y_before)  # labels untouched
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("sample_rate,threshold", [(1.0, 0.0), (0.3, 0.0),
                                                    (0.3, 0.05)])
@pytest.mark.parametrize("margins", [ARC, COS], ids=["arcface", "cosface"])
def test_training_matches_theirs(backend, device, margins, sample_rate, threshold):
    steps = 3 if is_slow(backend) else 6
    if threshold > 0:
        _skip_unless_filter(backend, device)
    ref = _train("reference", steps, 3, margins, sample_rate, threshold=threshold, device=device)
    got = _train("compat", steps, 3, margins, sample_rate, backend, threshold, device)
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-5)
    assert len(set(ref)) == len(ref)  # every step a different loss: the steps moved the parameters


def test_state_and_layout():
    torch.manual_seed(11)
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 16, 1000)
    torch.manual_seed(11)
    assert torch.equal(head.weight, torch.normal(0, 0.01, (1000, 16)))  # their init, their draw
    sd = head.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].dtype == torch.float32 and sd["weight"].shape == (1000, 16)
    assert (head.num_local, head.class_start, head.world_size, head.rank) == (1000, 0, 1, 0)


def test_half_precision_embeddings_any_batch():
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 23, 0.5, fp16=True)
    for dtype in (torch.bfloat16, torch.float16):
        for B in (1, 5):
            x = (torch.randn(B, 8) * 300).to(dtype).requires_grad_(True)  # |x| beyond fp16's comfort
            y = torch.randint(0, 23, (B,)).to(torch.int32)
            loss = head(x, y)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_memory_is_the_kernels_not_b_x_c():
    """B = 64, C = 80,000 on the cpu backend with the memory dial at 0 (max_logits_bytes=0: no logits
    kept): forward + backward allocate the gradients plus the kernel's workspace, one workspace budget
    per thread (measured 3.7 MB at 1 thread, 7.4 MB at 2), under one B x C fp32 matrix (20.5 MB; theirs
    holds several: logits, their exponentials, the gradient). With the default budget the op keeps the
    logits (20.5 MB < 256 MiB), and no more."""
    from l2sm_kernels.backends import cpu as cpu_backend
    from l2sm_kernels.testing import cpu_peak_bytes

    B, D, C = 64, 16, 80000
    workspace = torch.get_num_threads() * cpu_backend.get_workspace_bytes() + (1 << 20)
    assert workspace < B * C * 4  # the bound below says something
    for budget, bound in ((0, workspace), (None, workspace + B * C * 4)):
        head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, backend="cpu", max_logits_bytes=budget)
        x = torch.randn(B, D).requires_grad_(True)
        y = torch.randint(0, C, (B,))

        def step():
            head(x, y).backward()

        step()
        x.grad = head.weight.grad = None
        peak = cpu_peak_bytes(step) - (x.numel() + head.weight.numel()) * 4
        assert peak < bound, (budget, peak)


def test_refusals():
    for bad in [(0.9, 0.5, 0.0), (1.0, 0.5, -0.1), (1.2, 0.0, 0.0), (1.0, 4.0, 0.0)]:
        with pytest.raises(ValueError, match="CombinedMarginLoss"):
            CombinedMarginLoss(64, *bad)
    with pytest.raises(ValueError, match="s must be > 0"):
        CombinedMarginLoss(0, 1.0, 0.5, 0.0)
    with pytest.raises(TypeError, match="margin_loss"):
        PartialFC_V2(torch.nn.Identity(), 8, 10)
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10, sample_rate=1.5)
    with pytest.raises(ValueError, match="local_labels"):
        head(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        head(torch.randn(2, 8), torch.tensor([1, 10]))


def test_their_arcface_and_cosface_classes_are_accepted():
    """Their losses.ArcFace(s, margin) / CosFace(s, m) and their CombinedMarginLoss (attributes only)."""
    class ArcFace(torch.nn.Module):
        def __init__(self, s=64.0, margin=0.5):
            super().__init__()
            self.s, self.margin, self.easy_margin = s, margin, False

    class CosFace(torch.nn.Module):
        def __init__(self, s=64.0, m=0.40):
            super().__init__()
            self.s, self.m = s, m

    assert AT.margin_spec(ArcFace()) == {"s": 64.0, "m2": 0.5, "m3": 0.0, "threshold": 0.0}
    assert AT.margin_spec(CosFace()) == {"s": 64.0, "m2": 0.0, "m3": 0.4, "threshold": 0.0}
    assert AT.margin_spec(CombinedMarginLoss(32, 0.9, 0.3, 0.35))["m2"] == 0.0  # CosFace ignores m1, m2


def test_margin_loss_forward_on_logits():
    """Their CombinedMarginLoss.forward(logits, labels) (B x C, for code using it directly)."""
    x, y, w = _problem(deep_rows=1)
    cos = F.linear(F.normalize(x.double()), F.normalize(w.double())).clamp(-1, 1).requires_grad_(True)
    labels = y.clone()
    labels[2] = -1  # a row whose target is not among the columns
    z = CombinedMarginLoss(64, 1.0, 0.5, 0.0)(cos, labels)
    rows = torch.arange(len(y))
    expect = 64 * cos.detach().clone()
    keep = labels != -1
    expect[rows[keep], labels[keep]] = 64 * torch.cos(torch.acos(cos.detach()[rows[keep], labels[keep]]) + 0.5)
    assert torch.allclose(z, expect, rtol=0, atol=1e-12)
    z.sum().backward()
    assert torch.equal(cos.grad, torch.full_like(cos, 64.0))  # detached margin


# ---------------------------------------------------------------------------------------------
# class-parallel: 2 and 3 gloo processes (the harness of test_class_parallel.py)
# ---------------------------------------------------------------------------------------------
def _work_class_parallel(rank, world, backend, margins, rate, uneven, threshold=0.0):
    """Every rank builds the same global problem, holds its shard (their layout) and its rows; the
    loss, the rows' embedding gradient (world_size times the global mean's, as their AllGather) and
    the shard's weight gradient match the reference on the whole batch and matrix."""
    C, D = 19, 12
    sizes = {2: [2, 4], 3: [1, 3, 2]}[world] if uneven else [6 // world] * world
    x, y, w = _problem(B=sum(sizes), D=D, C=C, seed=4)
    head = PartialFC_V2(CombinedMarginLoss(64, *margins, threshold), D, C, rate, backend=backend)
    q, rem = divmod(C, world)
    assert (head.num_local, head.class_start) == (q + (rank < rem), q * rank + min(rank, rem))
    shard = slice(head.class_start, head.class_start + head.num_local)
    with torch.no_grad():
        head.weight.copy_(w[shard])
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    labels = y[rows].clone().view(-1, 1)
    torch.manual_seed(20 + rank)  # each rank draws its own negatives
    got = _compat_loss(head, x[rows], labels, batch_sizes=sizes if uneven else None)
    assert torch.equal(labels.view(-1), y[rows])
    sample = None
    if rate < 1:  # the global sample: every rank's sampled classes, in rank order
        box = [None] * world
        torch.distributed.all_gather_object(box, (head.weight_index + head.class_start).tolist())
        sample = torch.tensor([c for part in box for c in part])
        local = y - head.class_start
        positives = torch.unique(local[(local >= 0) & (local < head.num_local)])
        want = max(int(rate * head.num_local), positives.numel())
        assert head.weight_index.numel() == want and bool(torch.isin(positives, head.weight_index).all())
        if rate == 0:
            assert torch.equal(sample, torch.unique(y))  # positives only
    ref = _ref_loss(x, w, y, margins, torch.float64, threshold, sample=sample)
    plain = _ref_loss(x, w, y, margins, torch.float32, threshold, sample=sample)
    assert_accurate("loss", got[0], ref[0], plain[0], torch.float32)
    assert_accurate("grad x", got[1], world * ref[1][rows], world * plain[1][rows], torch.float32)
    assert_accurate("grad weight", got[2], ref[2][shard], plain[2][shard], torch.float32)


_POOL = Pool()


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    _POOL.close()


@pytest.mark.parametrize("world", [2, 3])
def test_class_parallel_matches_theirs(backend, world):
    if backend_device(backend) != "cpu":
        pytest.skip("the gloo processes run CPU tensors")
    cases = [(ARC, 1.0, False, 0.0), (ARC, 1.0, True, 0.1), (COS, 0.0, True, 0.0), (ARC, 0.5, False, 0.0)]
    for margins, rate, uneven, t in cases[:2] if is_slow(backend) else cases:
        _POOL.spawn(_work_class_parallel, world, backend, margins, rate, uneven, t)
