"""Helpers shared by the tests and the benchmark scripts: inputs, running the loss with its
gradients, and the accuracy relation (docs/conventions.md, "Accuracy relation": a backend's error against the float64 reference is at
most 2x the error of plain torch in the same dtype, plus a small atol)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..loss import l2_softmax_loss
from ..reference import l2_softmax_logits_ref, l2_softmax_loss_ref

# atol of the accuracy relation, relative to the largest reference value of the compared tensor
ATOL_REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@dataclass
class Case:
    """One problem: tensors (leaves; those in `grads` require grad) and loss keyword arguments."""

    x: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    alpha: object = 16.0
    bias: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)

    def leaves(self) -> dict:
        out = {"x": self.x, "weight": self.weight, "bias": self.bias}
        if isinstance(self.alpha, torch.Tensor):
            out["alpha"] = self.alpha
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def make_case(B=8, D=16, C=37, *, dtype=torch.float32, wdtype=None, device="cpu", seed=0, bias=False,
              alpha=16.0, alpha_grad=False, ignore_rows=0, weight_scale=0.05, grad=True, **kwargs) -> Case:
    """Random inputs in face-recognition proportions: x ~ N(0, 1), W ~ N(0, weight_scale^2) with
    C x subcenters rows (kwargs' subcenters, default 1), targets uniform in [0, C), the first
    `ignore_rows` rows ignored."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(C * kwargs.get("subcenters", 1), D, generator=g) * weight_scale).to(device=device, dtype=wdtype)
    t = torch.randint(0, C, (B,), generator=g)
    ignore_index = kwargs.get("ignore_index", -100)
    t[:ignore_rows] = ignore_index
    t = t.to(device)
    b = (torch.randn(C, generator=g) * 0.5).to(device=device, dtype=wdtype) if bias else None
    a = torch.tensor(float(alpha), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=device) if alpha_grad else alpha
    if grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
        if alpha_grad:
            a.requires_grad_(True)
    return Case(x, w, t, a, b, kwargs)


def _detached(case: Case, upcast: bool) -> Case:
    def d(t):
        if not isinstance(t, torch.Tensor):
            return t
        u = t.detach().to(torch.float64) if upcast and t.is_floating_point() else t.detach().clone()
        return u.requires_grad_(t.requires_grad)

    return Case(d(case.x), d(case.weight), case.target, d(case.alpha), d(case.bias), dict(case.kwargs))


def loss_and_grads(fn, case: Case, grad_output=None) -> tuple[torch.Tensor, dict]:
    """Run fn(x, weight, target, alpha, bias, **kwargs) on fresh leaves and backpropagate
    grad_output (default: ones); returns (loss, {leaf name: grad})."""
    out = fn(case.x, case.weight, case.target, case.alpha, case.bias, **case.kwargs)
    leaves = case.leaves()
    if not leaves:
        return out.detach(), {}
    go = torch.ones_like(out) if grad_output is None else grad_output.to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), go, allow_unused=True)
    return out.detach(), {k: g for k, g in zip(leaves, grads)}


def run(case: Case, backend: str, grad_output=None, op_kwargs=None):
    """The backend's loss and gradients; op_kwargs: extra keywords for l2_softmax_loss alone (settings the
    reference does not take, such as max_logits_bytes)."""
    c = _detached(case, upcast=False)
    extra = op_kwargs or {}
    return loss_and_grads(lambda *a, **k: l2_softmax_loss(*a, backend=backend, **k, **extra), c, grad_output)


def run_reference(case: Case, upcast: bool, grad_output=None):
    """upcast=True: the float64 reference; upcast=False: plain torch in the input dtype."""
    c = _detached(case, upcast=upcast)
    return loss_and_grads(lambda *a, **k: l2_softmax_loss_ref(*a, upcast=upcast, **k), c, grad_output)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference; NaN where exactly one side is NaN counts as infinite."""
    a, ref = a.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if a.shape != ref.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}")
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(ref)
    same_inf = torch.isinf(a) & (a == ref)
    diff = (a - ref).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def assert_accurate(name: str, out: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, dtype=None) -> None:
    """The accuracy relation (docs/conventions.md): err(out) <= 2 err(plain) + atol, errors against the float64 reference."""
    dtype = dtype or out.dtype
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    atol = ATOL_REL[dtype] * max(scale, 1e-30)
    err, base = max_err(out, ref), max_err(plain, ref)
    if base == float("inf"):  # plain torch itself broke (e.g. NaN): hold the backend to atol alone
        base = 0.0
    assert err <= 2 * base + atol, (
        f"{name}: error {err:.3e} against the float64 reference exceeds 2 x plain torch's {base:.3e} "
        f"+ atol {atol:.3e} (scale {scale:.3e}, {dtype})"
    )


def check_case(case: Case, backend: str, grad_output=None, dtype=None, op_kwargs=None) -> None:
    """Loss and every gradient of `backend` against the float64 reference, by the accuracy relation
    (op_kwargs: see run)."""
    out, grads = run(case, backend, grad_output, op_kwargs)
    ref, rgrads = run_reference(case, True, grad_output)
    plain, pgrads = run_reference(case, False, grad_output)
    assert out.dtype == (torch.float64 if ref.dtype == torch.float64 and _any64(case) else torch.float32)
    assert_accurate("loss", out, ref, plain, dtype or case.x.dtype)
    for k, g in grads.items():
        leaf = case.leaves()[k]
        assert g is not None, f"no gradient for {k}"
        assert g.dtype == leaf.dtype, f"grad {k} has dtype {g.dtype}, its input {leaf.dtype}"
        assert g.shape == leaf.shape
        assert_accurate(f"grad {k}", g, rgrads[k], pgrads[k], dtype or leaf.dtype)


def _any64(case: Case) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in (case.x, case.weight, case.bias))


# ----------------------------------------------------------------------------- confident rows
def confident_case(dtype, margin_type, margin, q_wanted):
    """Row i: target class i, one competitor B + i; W = identity (D = C) and x_i = e_i + beta_i e_{B+i},
    so that z_ii - z_i,B+i alone sets 1 - p_y (the other classes, at cosine 0, and the other rows'
    logits on class i are ~exp(-58) below: 1e-12 of q at most). beta_i is solved in float64 by
    bisection on the reference's 1 - p_y; the reference then sees the rounded inputs."""
    B = len(q_wanted)
    C = 2 * B + 2
    alpha = 64.0
    kw = dict(normalize_weight=True, margin_type=margin_type, margin=margin, reduction="none")
    t = torch.arange(B)
    W = torch.eye(C, dtype=torch.float64)
    want = torch.tensor(q_wanted, dtype=torch.float64)

    def xs(beta):
        x = torch.zeros(B, C, dtype=torch.float64)
        x[t, t] = 1.0
        x[t, B + t] = beta
        return x

    lo, hi = torch.zeros(B, dtype=torch.float64), torch.full((B,), 0.95, dtype=torch.float64)
    for _ in range(60):  # 1 - p_y grows with beta
        mid = (lo + hi) / 2
        q = -torch.expm1(-l2_softmax_loss_ref(xs(mid), W, t, alpha, **kw))
        lo, hi = torch.where(q < want, mid, lo), torch.where(q < want, hi, mid)
    return xs(lo).to(dtype), W.to(dtype), t, alpha, kw


def confident_exact(x, W, t, alpha, kw):
    """Each row's loss and db of its target class in float64 without cancellation: from the float64
    reference logits z (l2_softmax_logits_ref), loss_i = log1p(sum_{j != y} exp(z_ij - z_iy)) (the
    target leads), q_i = -expm1(-loss_i), db_y = -q_i + sum_{i' != i} p_i'y. (F.cross_entropy in float64,
    lse - z_y, is itself off by ~1e-16 absolute: 1e-3 relative at q = 1e-13.)"""
    opts = {k: v for k, v in kw.items() if k != "reduction"}
    z = l2_softmax_logits_ref(x.double(), W.double(), t, alpha, **opts)
    B = z.shape[0]
    zt = z[torch.arange(B), t]
    others = z.clone()
    others[torch.arange(B), t] = -math.inf
    loss = torch.log1p(torch.exp(others - zt[:, None]).sum(1))
    q = -torch.expm1(-loss)
    p = torch.softmax(z, dim=1)  # tiny probabilities keep their relative precision
    p[torch.arange(B), t] = 0.0
    return loss, -q + p[:, t].sum(0)
