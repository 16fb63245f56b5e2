"""The demo (l2sm_kernels.demo): its data split, augmentation, cosine scores, training through the
library's op, the end-to-end command at a tiny size, and the large-class mode's measurements."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels.demo import cli, digits as D, large_classes as LC, scores as S
from l2sm_kernels.testing import cpu_peak_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3])
def test_split_keeps_held_out_classes_out_of_training(seed):
    sp = D.load_split(seed, holdout=3, test_fraction=0.3)
    assert len(sp.unknown_classes) == 3 and len(sp.known_classes) == 7
    assert set(sp.unknown_classes).isdisjoint(sp.known_classes)
    assert set(sp.y_unknown.tolist()) == set(sp.unknown_classes)  # digits kept as labels
    assert set(sp.y_train.tolist()) == set(range(7)) == set(sp.y_test.tolist())  # remapped 0..K-1
    n_known = len(sp.x_train) + len(sp.x_test)
    assert n_known + len(sp.x_unknown) == 1797
    assert abs(len(sp.x_test) / n_known - 0.3) < 0.01
    # the test images are not training images
    tr = {bytes(x.numpy()) for x in sp.x_train}
    assert not any(bytes(x.numpy()) in tr for x in sp.x_test)
    assert sp.x_train.shape[1:] == (1, 8, 8) and 0 <= float(sp.x_train.min()) and float(sp.x_train.max()) <= 1
    again = D.load_split(seed, holdout=3, test_fraction=0.3)
    assert again.unknown_classes == sp.unknown_classes and torch.equal(again.y_train, sp.y_train)


def test_split_rejects_bad_holdout():
    with pytest.raises(ValueError, match="holdout must be in"):
        D.load_split(0, holdout=8)


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    x = torch.rand(64, 1, 8, 8) + 0.1  # no zeros inside: a shift's zero fill is visible
    out = D.random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    p = F.pad(x, (1, 1, 1, 1))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(out[i, 0], p[i, 0, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 4  # shifts vary per image


# ---------------------------------------------------------------------------------------------
# cosine scores
# ---------------------------------------------------------------------------------------------
def test_verification_auc_perfect_and_chance():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(30)
    centers = torch.eye(8)[:4]
    emb = (centers[labels] + 0.05 * torch.randn(120, 8)) * torch.rand(120, 1).mul(10).add(0.1)  # norms vary
    assert S.verification_auc(emb, labels) == 1.0  # cosine ignores the norms
    vm = S.verification_metrics(*S.verification_pairs(emb, labels))  # the library's metrics
    assert vm == {"auc": 1.0, "tar@0.01": 1.0, "tar@0.001": 1.0, "kfold_accuracy": 1.0}
    chance = S.verification_auc(torch.randn(400, 8), torch.randint(0, 4, (400,)))
    assert 0.45 < chance < 0.55
    score, same = S.verification_pairs(emb[:5], labels[:5])
    assert len(score) == 10 and same.sum() == 10  # 5 images of class 0: all pairs i < j are "same"
    with pytest.raises(ValueError, match="both genuine"):
        S.verification_auc(emb[:5], labels[:5])


def test_anomaly_scores_by_weights_and_knn():
    w = torch.eye(6)[:3] * 5.0  # class weights of norm 5 on 3 axes
    known = torch.eye(6)[[0, 1, 2, 0]] * torch.tensor([[0.3], [2.0], [7.0], [1.0]])
    unknown = torch.eye(6)[[3, 4, 5]]
    sk, su = S.weight_anomaly_score(known, w), S.weight_anomaly_score(unknown, w)
    torch.testing.assert_close(sk, torch.zeros(4), atol=1e-6, rtol=0)  # on a class direction
    torch.testing.assert_close(su, torch.ones(3), atol=1e-6, rtol=0)  # orthogonal to all
    assert S.anomaly_auc(sk, su) == 1.0 and S.anomaly_auc(su, sk) == 0.0
    gallery = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0]])
    q = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(S.knn_anomaly_score(q, gallery, k=1), torch.zeros(1), atol=1e-6, rtol=0)
    expect = 1 - (1 + 1 / math.sqrt(2)) / 2  # mean of cosines 1 and 1/sqrt(2)
    torch.testing.assert_close(S.knn_anomaly_score(q, gallery, k=2), torch.tensor([expect]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="k must be in"):
        S.knn_anomaly_score(q, gallery, k=3)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def test_alpha_default_follows_the_bound_but_not_below_16():
    assert D.alpha_for(7) == 16.0  # the bound is log(45) = 3.8 here
    assert D.alpha_for(10**9) == pytest.approx(L.alpha_lower_bound(10**9))
    assert D.DemoConfig(alpha=8.0).resolved_alpha(7) == 8.0


def test_both_losses_start_from_the_same_network():
    sp = D.load_split(0)
    a = D.train("softmax", sp, D.DemoConfig(epochs=0), seed=5)
    b = D.train("l2-softmax", sp, D.DemoConfig(epochs=0), seed=5)
    for (n, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), n
    assert isinstance(b.head, L.L2SoftmaxLoss) and isinstance(a.head, D.SoftmaxHead)


def test_l2_head_is_the_library_loss_and_predicts_by_cosine():
    torch.manual_seed(0)
    cfg = D.DemoConfig(embed_dim=16, alpha=12.0, normalize_weight=True, margin_type="cosface", margin=0.2)
    head = D.make_head("l2-softmax", cfg, 7, "cpu")
    f, y = torch.randn(32, 16), torch.randint(0, 7, (32,))
    ref = L.l2_softmax_loss_ref(f, head.weight, y, 12.0, normalize_weight=True, margin_type="cosface", margin=0.2)
    torch.testing.assert_close(head(f, y).double(), ref, rtol=1e-5, atol=1e-6)
    logits = D.predict_logits(head, f)  # no margin at test time: alpha * cosine
    cosine = F.normalize(f, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    torch.testing.assert_close(logits, 12.0 * cosine, rtol=1e-5, atol=1e-5)
    assert float(logits.abs().max()) <= 12.0 + 1e-4


@pytest.fixture(scope="module")
def tiny_runs():
    """Both losses, 1 seed, 4 epochs, 1 thread: a few seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sp = D.load_split(1)
        cfg = D.DemoConfig(epochs=4, embed_dim=32)
        runs = {loss: D.train(loss, sp, cfg, seed=1) for loss in D.LOSSES}
        return sp, cfg, runs, {loss: D.evaluate(t, sp, k=5) for loss, t in runs.items()}
    finally:
        torch.set_num_threads(n)


def test_tiny_training_learns_and_metrics_are_probabilities(tiny_runs):
    sp, cfg, runs, evals = tiny_runs
    for loss, (metrics, raw) in evals.items():
        assert set(metrics) == set(D.METRICS)
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
        assert metrics["accuracy"] > 0.6, (loss, metrics)  # chance is 1/7 = 0.14
        assert metrics["verification_auc"] > 0.6 and metrics["anomaly_auc_knn"] > 0.6, (loss, metrics)
        assert metrics["verification_tar_far1e-3"] <= metrics["verification_tar_far1e-2"]
        assert metrics["verification_kfold_accuracy"] > 0.6
        losses = runs[loss].epoch_losses
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        assert len(raw["verification_same"]) + len(raw["verification_different"]) == math.comb(len(sp.x_unknown), 2)
        assert len(raw["anomaly_knn_known"]) == len(sp.x_test) and len(raw["anomaly_knn_unknown"]) == len(sp.x_unknown)
        for key in ("anomaly_weights_known", "anomaly_weights_unknown", "anomaly_knn_known"):
            assert raw[key].min() >= -1e-5 and raw[key].max() <= 2 + 1e-5  # 1 - cosine


def test_l2_softmax_features_on_the_sphere(tiny_runs):
    sp, cfg, runs, _ = tiny_runs
    t = runs["l2-softmax"]
    f = D.embed(t.net, sp.x_test)
    x_hat = F.normalize(f, dim=1)
    torch.testing.assert_close(x_hat.norm(dim=1), torch.ones(len(f)), rtol=0, atol=1e-5)
    # the loss sees alpha * x_hat . W: its logits are bounded by alpha |W_j| whatever the feature norm
    logits = D.predict_logits(t.head, f)
    bound = float(t.head.alpha) * t.head.weight.norm(dim=1)
    assert bool((logits.abs() <= bound + 1e-4).all())
    # and rescaling a feature changes nothing the L2 head computes
    torch.testing.assert_close(D.predict_logits(t.head, 37.0 * f), logits, rtol=1e-5, atol=1e-5)


def test_summarize_mean_std_and_paired_difference():
    per_seed = {"softmax": {"accuracy": [0.5, 0.7, 0.6]}, "l2-softmax": {"accuracy": [0.6, 0.7, 0.8]}}
    s = D.summarize(per_seed)
    assert s["softmax"]["accuracy"] == pytest.approx((0.6, 0.1))
    assert s["l2-softmax"]["accuracy"] == pytest.approx((0.7, 0.1))
    mean, std, wins, n = s["diff"]["l2-softmax"]["accuracy"]
    assert (mean, std, wins, n) == (pytest.approx(0.1), pytest.approx(0.1), 2, 3)


# ---------------------------------------------------------------------------------------------
# the command, end to end at a tiny size
# ---------------------------------------------------------------------------------------------
def test_main_writes_figures_json_and_prints_the_table_last(tmp_path, capsys):
    out = tmp_path / "demo"
    torch.set_num_threads(2)  # main runs the digits on 1 thread and gives the caller its 2 back
    res = cli.main(["--seeds", "2", "--epochs", "1", "--geometry-epochs", "1", "--embed-dim", "16",
                    "--out", str(out), "--no-progress", "--alpha", "10", "--normalize-weight"])
    text = capsys.readouterr().out
    for name in ("geometry.png", "scores.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000, name  # a real figure, not an empty canvas
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["alpha"] == 10.0 and saved["config"]["normalize_weight"] is True
    assert saved["backend"] in ("eager", "cpu", "triton") and saved["backend"] in text
    assert len(saved["holdout_classes"]) == 2
    for loss in D.LOSSES:
        for m in D.METRICS:
            v = saved["per_seed"][loss][m]
            assert len(v) == 2 and all(0 <= x <= 1 for x in v)
            assert saved["summary"][loss][m][0] == pytest.approx(np.mean(v))
            assert saved["summary"][loss][m][1] == pytest.approx(np.std(v, ddof=1))
    for loss in D.LOSSES[1:]:
        assert res["summary"]["diff"][loss]["accuracy"][3] == 2
    lines = text.rstrip().splitlines()
    assert lines[-1].startswith("mean ± sample std over 2 seed(s)")
    table = lines[-(len(D.LOSSES) * len(D.METRICS) + 1):-1]  # a row group per head, a row per metric
    for i, loss in enumerate(D.LOSSES):
        group = table[i * len(D.METRICS):(i + 1) * len(D.METRICS)]
        assert group[0].startswith(D.HEAD_NAMES[loss])
        for m, line in zip(D.METRICS, group):
            assert D.METRIC_NAMES[m] in line
    # the header announces every epoch the progress bar counts: 2 seeds x 7 heads x 1 + 2 2-D runs x 1
    assert "2 seed(s) x 7 heads x 1 epochs + 2 2-D runs x 1 epochs (the geometry figure) = 16 epochs" in text
    assert "TAR @ FAR 1e-3" in text and "10-fold accuracy" in text
    assert "alpha=10" in text
    assert torch.get_num_threads() == 2


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "l2sm_kernels.demo", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--large" in r.stdout and "--normalize-weight" in r.stdout and "--alpha" in r.stdout


# ---------------------------------------------------------------------------------------------
# large-class mode
# ---------------------------------------------------------------------------------------------
def test_cpu_peak_bytes_sees_the_peak_not_the_end():
    def fn():
        a = torch.ones(2_000_000)  # 8 MB
        b = torch.ones(1_000_000)  # 4 MB, both alive: 12 MB
        del a
        c = torch.ones(500_000)  # 2 MB after 8 MB were freed
        return b, c

    peak = cpu_peak_bytes(fn)
    assert 12_000_000 <= peak < 12_000_000 + 1_000_000


def test_large_mode_tiny_compares_same_model_and_measures(capsys):
    cfg = LC.LargeConfig(classes=3000, batch=32, dim=16, in_dim=8, steps=6, warmup=2, lr=0.05)
    res = LC.run_large(cfg, torch.device("cpu"), progress=False)
    assert res["backend"] == LC.backend_used("auto", torch.device("cpu"))[0]
    assert res["backend"] in ("eager", "cpu")
    a, b = res["l2sm"], res["plain"]
    # same initialization and batches: the op and the formula give the same training trajectory
    assert a["first_loss"] == pytest.approx(b["first_loss"], rel=1e-5)
    assert len(a["losses"]) == 6 and res["max_loss_difference"] < 1e-3
    assert a["losses"][-1] != a["losses"][0]  # it trains
    grad_w = cfg.classes * cfg.dim * 4
    for r in (a, b):
        assert r["timed_steps"] == 4 and r["samples_per_s"] > 0 and r["step_ms_median"] > 0
        assert math.isfinite(r["last_loss"])
        assert r["peak_bytes"] >= grad_w  # the step allocates W's gradient (set to None before it)
    assert b["peak_bytes"] >= grad_w + res["logits_bytes"]  # the plain formula holds the B x C logits
    text = LC.format_large(res)
    assert "l2sm backend used: " + res["backend"] in text and "3,000 synthetic identities" in text
