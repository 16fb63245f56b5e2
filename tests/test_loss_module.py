"""L2SoftmaxLoss as a module: initialization (meta device / FSDP path), the learned alpha, checkpoints
that carry the options, Partial FC in one process, and the scalar and layout arguments users pass.
"Reliability case N" refers to the numbered cases of docs/reliability.md."""
import math
import warnings

import numpy as np
import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.testing import max_err


# ---------------------------------------------------------------------------------------------
# initialization: every parameter and buffer, on the meta device too (reliability case 26)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(L.L2SoftmaxLoss, dict(alpha=7.0, bias=True)),
                                    (L.L2SoftmaxLoss, dict(alpha=7.0, learn_alpha=True)),
                                    (L.AdaFaceLoss, dict()), (L.ArcFaceLoss, dict(subcenters=3))])
def test_meta_device_then_to_empty_and_reset_parameters(cls, kw):
    with torch.device("meta"):
        m = cls(8, 5, **kw)
    m.to_empty(device="cpu")
    m.reset_parameters()
    fresh = cls(8, 5, **kw)
    for (name, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        if name == "weight":  # random, but drawn like nn.Linear's
            assert a.abs().max() <= 1 / math.sqrt(8) and a.std() > 0.05
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name  # alpha, bias, AdaFace's moving averages
    assert float(m.alpha.detach()) == pytest.approx(float(fresh.alpha.detach()))


# ---------------------------------------------------------------------------------------------
# a learned alpha stays above alpha_min (reliability case 27)
# ---------------------------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def test_learned_alpha_stays_positive_and_training_works():
    """The hardening issue's case: cosface, learned alpha from 8, SGD lr 0.1 momentum 0.9 on digits. A
    plain alpha parameter ends at about -21 with 0 % accuracy while the loss looks fine (seen on this
    machine); alpha = alpha_min + exp(alpha_raw) cannot cross alpha_min and the model learns."""
    torch.manual_seed(0)
    x, y = _digits()
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    head = L.L2SoftmaxLoss(32, 10, alpha=8, learn_alpha=True, normalize_weight=True, margin_type="cosface",
                           margin=0.2)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = head(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    alpha = float(head.alpha.detach())
    assert alpha > head.alpha_min > 0
    with torch.no_grad():
        acc = float((head.cosine(net(x)).argmax(1) == y).float().mean())
    assert acc > 0.9, (alpha, acc)


def test_alpha_min_rules():
    assert L.L2SoftmaxLoss(4, 10, learn_alpha=True).alpha_min == pytest.approx(L.alpha_lower_bound(10))
    with pytest.raises(ValueError, match="must be > alpha_min"):
        L.L2SoftmaxLoss(4, 1000, alpha=2.0, learn_alpha=True)
    m = L.L2SoftmaxLoss(4, 1000, alpha=2.0, learn_alpha=True, alpha_min=1.0)
    assert float(m.alpha) == pytest.approx(2.0)
    with torch.no_grad():
        m.alpha_raw.fill_(-1e4)  # whatever an optimizer does
    assert float(m.alpha) >= 1.0


# ---------------------------------------------------------------------------------------------
# checkpoints (reliability case 33)
# ---------------------------------------------------------------------------------------------
def test_checkpoint_refuses_another_model():
    """The model's options (class, sizes, sub-centers, normalize_weight, margin_type) must match, and a
    refused load writes nothing (the check runs before any tensor is copied)."""
    arc = L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="arcface", margin=0.5)
    sd = arc.state_dict()
    for other, what in ((dict(normalize_weight=True, margin_type="cosface", margin=0.5), "margin_type"),
                        (dict(normalize_weight=True, margin_type="arcface", margin=0.5, subcenters=2), "subcenters"),
                        (dict(normalize_weight=False, margin_type="arcface", margin=0.5), "normalize_weight")):
        cos = L.L2SoftmaxLoss(8, 5, **other)
        before = cos.weight.detach().clone()
        with pytest.raises(RuntimeError, match=f"checkpoint is of another model.*{what}: checkpoint"):
            cos.load_state_dict(sd)
        assert torch.equal(cos.weight, before), "a refused checkpoint was written into the module"
    with pytest.raises(RuntimeError, match="margin_type: checkpoint 'arcface', module 'cosface'"):
        L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="cosface", margin=0.5).load_state_dict(sd)
    # on purpose: the tensors alone
    cos = L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="cosface", margin=0.5)
    cos.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_extra_state")}, strict=False)
    assert torch.equal(cos.weight, arc.weight)


def test_checkpoint_schedule_options_may_differ():
    """The training schedule is not the model (issue 18): resume mid margin warm-up, fine-tune or evaluate
    a Partial FC checkpoint at sample_rate 1.0, change label smoothing, margin_grad, ignore_index, eps;
    the module keeps its own schedule. A tensor margin is recorded with its value ("per-row" for (B,))."""
    src = L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="arcface", margin=torch.tensor(0.25),
                          sample_rate=0.5, label_smoothing=0.1, margin_grad="detached")
    sd = src.state_dict()
    assert sd["_extra_state"]["options"]["margin"] == pytest.approx(0.25)
    assert sd["_extra_state"]["sample_rate"] == 0.5
    dst = L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="arcface", margin=0.5, sample_rate=1.0,
                          ignore_index=-1, eps=1e-6)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight, src.weight)
    assert dst.options.margin == 0.5 and dst.sample_rate == 1.0 and dst.options.label_smoothing == 0.0
    assert dst.options.margin_grad == "exact" and dst.options.ignore_index == -1
    rows = L.L2SoftmaxLoss(8, 5, normalize_weight=True, margin_type="cosface", margin=torch.full((3,), 0.2))
    assert rows.state_dict()["_extra_state"]["options"]["margin"] == "per-row"


def test_checkpoint_alpha_moves_between_learned_and_fixed_and_old_checkpoints_load():
    learned = L.L2SoftmaxLoss(8, 5, alpha=12.0, learn_alpha=True)
    sd = learned.state_dict()
    assert set(sd) == {"weight", "alpha", "_extra_state"} and float(sd["alpha"]) == pytest.approx(12.0)
    fixed = L.L2SoftmaxLoss(8, 5, alpha=1.0)
    fixed.load_state_dict(sd)
    assert float(fixed.alpha) == pytest.approx(12.0)
    again = L.L2SoftmaxLoss(8, 5, alpha=4.0, learn_alpha=True)
    again.load_state_dict(fixed.state_dict())
    assert float(again.alpha) == pytest.approx(12.0, rel=1e-6)
    # a checkpoint from before the options were stored (no _extra_state) loads strictly
    old = {"weight": torch.randn(5, 8), "alpha": torch.tensor(9.0)}
    again.load_state_dict(old)
    assert float(again.alpha) == pytest.approx(9.0, rel=1e-6) and torch.equal(again.weight, old["weight"])
    # a negative radius (a plain alpha gone through 0) is refused for a learned alpha
    with pytest.raises(RuntimeError, match="not above alpha_min"):
        again.load_state_dict({"weight": torch.randn(5, 8), "alpha": torch.tensor(-19.4)})


def test_head_checkpoint_hyperparameters_are_schedule_the_class_is_model():
    a = L.AdaFaceLoss(8, 5, m=0.4)
    b = L.AdaFaceLoss(8, 5, m=0.3)
    b.load_state_dict(a.state_dict())  # a margin hyperparameter: schedule, b keeps its own
    assert b.m == 0.3 and torch.equal(a.weight, b.weight)
    with pytest.raises(RuntimeError, match="class: checkpoint 'AdaFaceLoss'"):
        L.MagFaceLoss(8, 5).load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="class: checkpoint 'ArcFaceLoss'"):
        L.CosFaceLoss(8, 5).load_state_dict(L.ArcFaceLoss(8, 5).state_dict())


# ---------------------------------------------------------------------------------------------
# arguments users pass (the hardening issue's "uneven scalar handling")
# ---------------------------------------------------------------------------------------------
def test_numpy_scalars_and_tensor_alpha():
    x, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    ref = L.l2_softmax_loss(x, w, t, 16.0, margin_type="cosface", margin=0.2, eps=1e-12, ignore_index=-100,
                            backend="eager")
    out = L.l2_softmax_loss(x, w, t, np.float32(16.0), margin_type="cosface", margin=np.float32(0.2),
                            eps=np.float32(1e-12), ignore_index=np.int64(-100), backend="eager")
    assert max_err(out, ref) < 1e-6
    m = L.L2SoftmaxLoss(8, 5, alpha=torch.tensor(16.0), margin_type="cosface", margin=np.float64(0.2),
                        ignore_index=np.int32(-100), backend="eager")
    assert float(m.alpha) == 16.0
    with pytest.raises(ValueError, match="alpha must be > 0"):
        L.L2SoftmaxLoss(8, 5, alpha=torch.tensor(-1.0))


def test_layouts_and_dtypes_named_clearly():
    x, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="features must be a dense"):
        L.l2_softmax_loss(x.to_sparse(), w, t)
    with pytest.raises(TypeError, match="weight must be a dense"):
        L.l2_softmax_loss(x, w.to_sparse(), t)
    with pytest.raises(ValueError, match="looks transposed"):
        L.l2_softmax_loss(x, w.T.contiguous(), t)
    with pytest.raises(TypeError, match=r"int64 \(or int32\)"):
        L.l2_softmax_loss(x, w, t.float())


# ---------------------------------------------------------------------------------------------
# Partial FC in one process
# ---------------------------------------------------------------------------------------------
def test_partial_fc_single_process_equals_the_op_over_the_sample(backend, device):
    torch.manual_seed(0)
    B, D, C, K = 12, 16, 40, 2
    x = torch.randn(B, D, device=device, requires_grad=True)
    m = L.L2SoftmaxLoss(D, C, bias=True, normalize_weight=True, margin_type="arcface", margin=0.4, subcenters=K,
                        sample_rate=0.25, backend=backend, ignore_index=3).to(device)
    m.generator = torch.Generator(device=device).manual_seed(5)
    y = torch.randint(0, C, (B,), device=device)
    y[0] = 3  # ignore_index is a class id here: that row is ignored, class 3 may still be sampled
    loss = m(x, y)
    loss.backward()
    sampled = m.last_sampled
    positives = set(y[y != 3].tolist())
    assert positives <= set(sampled.tolist()) and len(sampled) == max(int(0.25 * C), len(positives))
    # the full op over exactly the sampled classes
    rows = (sampled[:, None] * K + torch.arange(K, device=device)).reshape(-1)
    w_s = m.weight.detach()[rows].clone().requires_grad_(True)
    b_s = m.bias.detach()[sampled].clone().requires_grad_(True)
    valid = y != 3
    local = torch.where(valid, torch.searchsorted(sampled, y), torch.full_like(y, -1))
    x2 = x.detach().clone().requires_grad_(True)
    ref = L.l2_softmax_loss(x2, w_s, local, 16.0, b_s, normalize_weight=True, margin_type="arcface", margin=0.4,
                            subcenters=K, ignore_index=-1, backend=backend)
    ref.backward()
    assert max_err(loss, ref) <= 1e-6 * float(ref.abs())
    assert max_err(x.grad, x2.grad) <= 1e-5 * float(x2.grad.abs().max())
    dw = m.weight.grad
    unsampled = torch.ones(C * K, dtype=torch.bool, device=device)
    unsampled[rows] = False
    assert torch.count_nonzero(dw[unsampled]) == 0 and torch.count_nonzero(m.bias.grad[~torch.isin(
        torch.arange(C, device=device), sampled)]) == 0
    assert max_err(dw[rows], w_s.grad) <= 1e-5 * float(w_s.grad.abs().max())


def test_angular_margin_without_normalized_weights_warns_once():
    from l2sm_kernels import loss as loss_mod

    loss_mod._WARNED_UNNORMALIZED.clear()
    x, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            L.l2_softmax_loss(x, w, t, margin_type="arcface", margin=0.5, backend="eager")
        L.l2_softmax_loss(x, w, t, margin_type="arcface", margin=0.5, normalize_weight=True, backend="eager")
        L.l2_softmax_loss(x, w, t, margin_type="cosface", margin=0.5, backend="eager")
    msgs = [str(r.message) for r in rec if "normalize_weight=False" in str(r.message)]
    assert len(msgs) == 1 and "arccos" in msgs[0]
