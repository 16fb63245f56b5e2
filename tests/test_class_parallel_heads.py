"""The face-recognition heads class-parallel (l2sm_kernels.distributed.class_parallel_heads) in 2 and 3
gloo processes against the single-process heads (heads.py) on the concatenated batch and the full
class matrix, in float64: the loss, each rank's feature rows' gradient and its shard's weight gradient,
and the per-row state (AdaFace's moving averages over two steps, ElasticFace's draws from the
rank-agreed generator, MagFace's margin gradient through the owner's target cosine)."""
import pytest
import torch

import l2sm_kernels as L
import l2sm_kernels.distributed as LD

from conftest import supports_fp64
from spawned import Pool

C, D = 13, 8
HEADS = {
    "arcface": (L.ArcFaceLoss, LD.ClassParallelArcFaceLoss, {}, 1.0),
    "subcenter-arcface": (L.ArcFaceLoss, LD.ClassParallelArcFaceLoss, {"subcenters": 2}, 1.0),
    "cosface": (L.CosFaceLoss, LD.ClassParallelCosFaceLoss, {}, 1.0),
    "combined": (L.CombinedMarginLoss, LD.ClassParallelCombinedMarginLoss, {"m2": 0.3, "m3": 0.2}, 1.0),
    "adaface": (L.AdaFaceLoss, LD.ClassParallelAdaFaceLoss, {}, 8.0),
    "magface": (L.MagFaceLoss, LD.ClassParallelMagFaceLoss, {}, 20.0),
    "elasticface-arc": (L.ElasticFaceLoss, LD.ClassParallelElasticFaceLoss, {}, 1.0),
    "elasticface-cos": (L.ElasticFaceLoss, LD.ClassParallelElasticFaceLoss, {"variant": "cos"}, 1.0),
    "mv-am-softmax": (L.heads.MVSoftmaxLoss, LD.ClassParallelMVSoftmaxLoss, {}, 1.0),
    "mv-arc-softmax": (L.heads.MVSoftmaxLoss, LD.ClassParallelMVSoftmaxLoss, {"margin_type": "arc"}, 1.0),
}


def _work(rank, world, backend, name, uneven):
    single_cls, cp_cls, kw, scale = HEADS[name]
    sizes = {2: [3, 6], 3: [2, 4, 3]}[world] if uneven else [4] * world
    K = kw.get("subcenters", 1)
    g = torch.Generator().manual_seed(7)
    W = torch.randn(C * K, D, generator=g, dtype=torch.float64) * 0.1
    extra = {"margin_seed": 5} if cp_cls is LD.ClassParallelElasticFaceLoss else {}
    single = single_cls(D, C, backend=backend, dtype=torch.float64, **kw)
    cp = cp_cls(D, C, backend=backend, dtype=torch.float64, seed=0, **kw, **extra)
    if extra:
        single.generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        single.weight.copy_(W)
        cp.weight.copy_(W[cp.class_start * K: (cp.class_start + cp.num_local) * K])
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    for step in range(2):  # AdaFace's moving averages after each step
        x = torch.randn(sum(sizes), D, generator=g, dtype=torch.float64) * scale
        y = torch.randint(0, C, (sum(sizes),), generator=g)
        y[1] = -100  # an ignored row
        xs, xc = x.clone().requires_grad_(True), x[rows].clone().requires_grad_(True)
        for m in (single, cp):
            m.weight.grad = None
        ls = single(xs, y)
        lc = cp(xc, y[rows], batch_sizes=sizes if uneven else None)
        ls.backward()
        lc.backward()
        tol = dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(lc, ls, **tol)
        torch.testing.assert_close(xc.grad, xs.grad[rows], **tol)
        torch.testing.assert_close(cp.weight.grad,
                                   single.weight.grad[cp.class_start * K: (cp.class_start + cp.num_local) * K], **tol)
        if name == "adaface":
            torch.testing.assert_close(cp.batch_mean, single.batch_mean.to(cp.batch_mean), rtol=1e-6, atol=0)
            torch.testing.assert_close(cp.batch_std, single.batch_std.to(cp.batch_std), rtol=1e-6, atol=0)
            assert float(cp.batch_mean) != 20.0


_POOL = Pool()


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    _POOL.close()


@pytest.mark.parametrize("world", [2, 3])
def test_heads_match_single_process(backend, world):
    if not supports_fp64(backend):
        pytest.skip("float64 comparison: eager and cpu")
    for i, name in enumerate(HEADS):
        _POOL.spawn(_work, world, backend, name, i % 2 == 1)
