"""l2sm_kernels.verification: the .bin reader (restricted unpickler, Pillow), the input transform, their
10-fold protocol against a reference written from their formulas (equal to the last digit), the flip test
and XNorm, IJB templates / TAR@FAR / 1:N, and the callback. Every .bin here is built from generated
images; nothing is downloaded."""
import heapq
import io
import math
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from l2sm_kernels import metrics as M
from l2sm_kernels import verification as V
from l2sm_kernels.verification import protocols as P

sklearn = pytest.importorskip("sklearn")
from sklearn.metrics import roc_curve  # noqa: E402
from sklearn.model_selection import KFold  # noqa: E402
from sklearn.preprocessing import normalize  # noqa: E402

pytest.importorskip("PIL")


# ---------------------------------------------------------------------------------------------
# the reference: their protocol, from their formulas (numpy, sklearn, the scipy <= 1.8 slinear)
# ---------------------------------------------------------------------------------------------
def _ref_rates(threshold, dist, same):
    """(tpr, fpr, accuracy, val, far) of "same when dist < threshold", one threshold, their formulas."""
    pred = np.less(dist, threshold)
    tp = np.sum(pred & same)
    fp = np.sum(pred & ~same)
    tn = np.sum(~pred & ~same)
    fn = np.sum(~pred & same)
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size, float(tp) / float(np.sum(same)), float(fp) / float(np.sum(~same))


def _ref_slinear(x, y, xp):
    """interp1d(x, y, kind='slinear')(xp) of scipy <= 1.8: sort by x (mergesort), then a degree-1 BSpline
    with knots (x0, x..., x_last), evaluated by scipy's own BSpline."""
    from scipy.interpolate import BSpline
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    return float(BSpline(np.r_[x[0], x, x[-1]], y, 1)(xp))


def _ref_evaluate(embeddings, issame, nfolds):
    emb = normalize(np.asarray(embeddings, dtype=np.float64))
    e1, e2 = emb[0::2], emb[1::2]
    same = np.asarray(issame, dtype=bool)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    folds = list(KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(same))))
    acc_th = np.arange(0, 4, 0.01)
    accuracy = np.zeros(nfolds)
    for i, (tr, te) in enumerate(folds):
        acc_train = np.array([_ref_rates(t, dist[tr], same[tr])[2] for t in acc_th])
        accuracy[i] = _ref_rates(acc_th[np.argmax(acc_train)], dist[te], same[te])[2]
    val_th = np.arange(0, 4, 0.001)
    val, far = np.zeros(nfolds), np.zeros(nfolds)
    for i, (tr, te) in enumerate(folds):
        far_train = np.array([_ref_rates(t, dist[tr], same[tr])[4] for t in val_th])
        th = _ref_slinear(far_train, val_th, 1e-3) if np.max(far_train) >= 1e-3 else 0.0
        val[i], far[i] = _ref_rates(th, dist[te], same[te])[3:]
    return {"accuracy": np.mean(accuracy), "accuracy_std": np.std(accuracy), "val": np.mean(val),
            "val_std": np.std(val), "far": np.mean(far), "fold_accuracies": accuracy}


def _pairs(n, d, seed, noise=0.6):
    g = np.random.default_rng(seed)
    a = g.standard_normal((n, d))
    same = g.random(n) < 0.5
    b = np.where(same[:, None], a + noise * g.standard_normal((n, d)), g.standard_normal((n, d)))
    e = np.empty((2 * n, d))
    e[0::2], e[1::2] = a, b
    return e, same


@pytest.mark.parametrize("n,d,nfolds,noise,seed", [(600, 16, 10, 0.6, 0), (203, 5, 10, 1.0, 1), (90, 8, 3, 0.3, 2)])
def test_evaluate_pairs_equals_their_protocol_to_the_last_digit(n, d, nfolds, noise, seed):
    e, same = _pairs(n, d, seed, noise)
    got = V.evaluate_pairs(torch.from_numpy(e), torch.from_numpy(same), nfolds=nfolds)
    ref = _ref_evaluate(e, same, nfolds)
    for k in ("accuracy", "accuracy_std", "val", "val_std", "far"):
        assert got[k] == ref[k], (k, got[k], ref[k])
    np.testing.assert_array_equal(got["fold_accuracies"], ref["fold_accuracies"])
    assert 0.5 < got["accuracy"] <= 1.0


def test_evaluate_pairs_ties_on_the_grid_and_an_exact_far_hit():
    """Distances exactly on the threshold grid (0 and 2: strict < rejects them), a training FAR that hits
    1e-3 exactly (1000 impostors in each training half), and a fold set whose FAR never reaches 1e-3."""
    d = 3
    ax = np.eye(d)
    n = 4000
    same = np.zeros(n, dtype=bool)
    same[1000:2000] = True
    same[3000:] = True  # 2 folds of 2000 pairs: 1000 impostors + 1000 genuine each
    g = np.random.default_rng(3)
    e = np.empty((2 * n, d))
    a = g.standard_normal((n, d))
    b = np.where(same[:, None], a + 0.5 * g.standard_normal((n, d)), g.standard_normal((n, d)))
    b[:50], a[:50] = ax[1], ax[0]  # impostors at distance exactly 2
    a[1000:1050], b[1000:1050] = ax[2], ax[2]  # genuine pairs at distance exactly 0
    a[1050:1100], b[1050:1100] = ax[0], ax[1]  # genuine pairs at distance exactly 2
    e[0::2], e[1::2] = a, b
    got = V.evaluate_pairs(e, same, nfolds=2)
    ref = _ref_evaluate(e, same, 2)
    for k in ("accuracy", "accuracy_std", "val", "val_std", "far"):
        assert got[k] == ref[k], (k, got[k], ref[k])
    # impostors only at distance 4 (opposite vectors): no threshold reaches FAR 1e-3 -> threshold 0, VAL 0
    e2 = e.copy()
    e2[1::2][~same] = -e2[0::2][~same]
    got2, ref2 = V.evaluate_pairs(e2, same, nfolds=2), _ref_evaluate(e2, same, 2)
    assert got2["val"] == ref2["val"] == 0.0 and got2["far"] == ref2["far"] == 0.0
    assert (got2["fold_val_thresholds"] == 0).all()


@pytest.mark.parametrize("p_same", [0.4, 0.6])
def test_evaluate_pairs_many_distances_exactly_on_a_threshold(p_same):
    """A third of the pairs at distance exactly 2.0 (orthogonal axis vectors; 2.0 is on both grids), genuine
    with probability p_same; genuine pairs at 1.995 (between two grid points) and impostors at 4 (opposite
    vectors) around them. The best threshold is then 2.0 itself (p_same 0.4: accept the 1.995 pairs, reject
    the 2.0 ones) or 2.01 (0.6): strict < and the first best threshold decide every fold's accuracy."""
    g = np.random.default_rng(7)
    n, d = 300, 4
    kind = g.integers(0, 3, n)  # 0: at 2.0, 1: genuine at 1.995, 2: impostor at 4
    same = np.where(kind == 0, g.random(n) < p_same, kind == 1)
    c = 0.0025  # cosine of the 1.995 pairs: 2 - 2c
    a = np.tile(ax := np.eye(d)[0], (n, 1))
    b = np.where((kind == 0)[:, None], np.eye(d)[1], np.where((kind == 1)[:, None], c * ax + math.sqrt(1 - c * c) *
                                                                  np.eye(d)[2], -ax))
    e = np.empty((2 * n, d))
    e[0::2], e[1::2] = a, b
    got, ref = V.evaluate_pairs(e, same, nfolds=4), _ref_evaluate(e, same, 4)
    for k in ("accuracy", "accuracy_std", "val", "val_std", "far"):
        assert got[k] == ref[k], (k, got[k], ref[k])
    assert P.ACC_THRESHOLDS[200 if p_same < 0.5 else 201] in got["fold_thresholds"]  # 2.0, or the next one


@pytest.mark.parametrize("seed", range(6))
def test_slinear_matches_scipy_bspline_with_repeated_values(seed):
    g = np.random.default_rng(seed)
    x = np.sort(np.round(g.random(40) * 20) / 1000)  # many repeats, some equal to 1e-3 exactly
    x[0] = 0.0
    y = np.arange(40) * 0.001
    for xp in (1e-3, float(x[-1]), float(x[5]), 0.0):
        assert P.slinear_at(x, y, xp) == _ref_slinear(x, y, xp)
    # where scipy's interp1d still accepts the points (no repeats), it agrees too
    from scipy.interpolate import interp1d
    xu = np.unique(x)
    yu = np.arange(len(xu)) * 0.01
    assert P.slinear_at(xu, yu, 1e-3) == float(interp1d(xu, yu, kind="slinear")(1e-3))


def test_evaluate_pairs_rejects_bad_input():
    e, same = _pairs(30, 4, 0)
    with pytest.raises(ValueError, match="embeddings must be"):
        V.evaluate_pairs(e[:-1], same)
    with pytest.raises(ValueError, match="issame"):
        V.evaluate_pairs(e, same[:-1])
    with pytest.raises(ValueError, match="nfolds"):
        V.evaluate_pairs(e, same, nfolds=1)
    with pytest.raises(ValueError, match="at least nfolds"):
        V.evaluate_pairs(e[:8], same[:4], nfolds=10)
    bad = e.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        V.evaluate_pairs(bad, same)


def test_normalize_rows_is_sklearns():
    e, _ = _pairs(50, 7, 4)
    e[3] = 0.0
    np.testing.assert_array_equal(P.normalize_rows(e), normalize(e))


# ---------------------------------------------------------------------------------------------
# .bin files
# ---------------------------------------------------------------------------------------------
def _images(n2, h=12, w=10, seed=0):
    return torch.randint(0, 256, (n2, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_read_bin_round_trip_png_is_exact(tmp_path):
    imgs, same = _images(8), torch.tensor([True, False, True, False])
    V.write_bin(tmp_path / "s.bin", imgs, same, format="PNG")
    got = V.read_bin(tmp_path / "s.bin")
    assert got.images.dtype == torch.uint8 and got.images.shape == (8, 3, 12, 10)
    assert torch.equal(got.images, imgs) and torch.equal(got.issame, same) and got.issame.dtype == torch.bool


def test_read_bin_jpeg_and_channel_order(tmp_path):
    # a red / green / blue image: RGB order survives the JPEG round trip (within JPEG's error)
    imgs = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    imgs[0, 0] = 250
    imgs[1, 2] = 250
    V.write_bin(tmp_path / "j.bin", imgs, [True], format="JPEG")
    got = V.read_bin(tmp_path / "j.bin")
    assert (got.images.int() - imgs.int()).abs().max() <= 8
    assert got.images[0, 0].float().mean() > 200 > got.images[0, 2].float().mean()


def _py2_pickle(bins, flags):
    """A protocol-2 pickle as Python 2 writes (list of str, list of bool): str as BINSTRING opcodes."""
    out = [b"\x80\x02", b"]", b"("]
    for b in bins:
        out.append(b"T" + struct.pack("<I", len(b)) + b)
    out += [b"e", b"]", b"("]
    out += [b"\x88" if f else b"\x89" for f in flags]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def _png(img):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_read_bin_python2_and_numpy_pickles(tmp_path):
    imgs = _images(4, seed=1)
    bins = [_png(i) for i in imgs]
    (tmp_path / "py2.bin").write_bytes(_py2_pickle(bins, [True, False]))
    with pytest.raises(UnicodeDecodeError):  # what makes the reader retry with encoding="bytes"
        pickle.loads((tmp_path / "py2.bin").read_bytes())
    got = V.read_bin(tmp_path / "py2.bin")
    assert torch.equal(got.images, imgs) and got.issame.tolist() == [True, False]
    # Python 3, protocol 2 (bytes through _codecs.encode), numpy bools and a numpy bool array
    for flags in ([np.bool_(True), np.bool_(False)], np.array([True, False])):
        with open(tmp_path / "np.bin", "wb") as f:
            pickle.dump((bins, flags), f, protocol=2)
        got = V.read_bin(tmp_path / "np.bin")
        assert torch.equal(got.images, imgs) and got.issame.tolist() == [True, False]


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_read_bin_refuses_a_malicious_pickle(tmp_path):
    target = str(tmp_path / "pwned")
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([_Evil(target), b"x"], [True]), f)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.bin.*posix\.mkdir|evil\.bin.*os\.mkdir"):
        V.read_bin(tmp_path / "evil.bin")
    assert not os.path.exists(target)
    with open(tmp_path / "eval.bin", "wb") as f:
        f.write(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        V.read_bin(tmp_path / "eval.bin")


def test_read_bin_errors_name_the_file(tmp_path):
    imgs = _images(4)
    bins = [_png(i) for i in imgs]
    cases = {"count.bin": (bins[:3], [True, False]), "shape.bin": [bins, [True, False], 1],
             "decode.bin": (bins[:3] + [b"not an image"], [True, False])}
    for name, obj in cases.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            V.read_bin(tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01junk")
    with pytest.raises((ValueError, pickle.UnpicklingError), match=r"junk\.bin"):
        V.read_bin(tmp_path / "junk.bin")
    big = _images(2, h=14, w=10)
    with open(tmp_path / "size.bin", "wb") as f:
        pickle.dump(([_png(imgs[0]), _png(big[0])], [True]), f)
    with pytest.raises(ValueError, match=r"size\.bin.*image_size"):
        V.read_bin(tmp_path / "size.bin")
    assert V.read_bin(tmp_path / "size.bin", image_size=(12, 10)).images.shape == (2, 3, 12, 10)


def test_read_bin_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        V.read_bin(tmp_path / "any.bin")


def test_to_model_input_is_their_transform_and_bgr_swaps():
    imgs = _images(3, seed=5)
    x = V.to_model_input(imgs)
    assert x.dtype == torch.float32
    assert torch.equal(x, ((imgs.float() / 255) - 0.5) / 0.5)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(V.to_model_input(imgs, bgr=True), x[:, [2, 1, 0]])


# ---------------------------------------------------------------------------------------------
# embedding a set
# ---------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 12 * 10, 6)
        self.bn = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def test_embed_pairs_flip_test_and_xnorm():
    torch.manual_seed(0)
    net = _Net().train()
    imgs = _images(10, seed=2)
    out = V.embed_pairs(net, imgs, batch_size=3)
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        f = net(V.to_model_input(imgs)).double().numpy()
        ff = net(V.to_model_input(imgs.flip(-1))).double().numpy()
    np.testing.assert_allclose(out.embeddings.numpy(), normalize(f + ff), rtol=0, atol=1e-6)
    norms = np.r_[np.linalg.norm(f, axis=1), np.linalg.norm(ff, axis=1)]
    assert math.isclose(out.xnorm, float(norms.mean()), rel_tol=1e-6)
    plain = V.embed_pairs(net, imgs, batch_size=4, flip=False)
    np.testing.assert_allclose(plain.embeddings.numpy(), normalize(f), rtol=0, atol=1e-6)
    # the mirror changes the answer (the flip is horizontal: the width axis)
    assert not np.allclose(out.embeddings.numpy(), plain.embeddings.numpy(), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# IJB
# ---------------------------------------------------------------------------------------------
def _ref_templates(feats, templates, medias):
    ids = np.unique(templates)
    out = np.zeros((len(ids), feats.shape[1]))
    for i, t in enumerate(ids):
        f, m = feats[templates == t], medias[templates == t]
        out[i] = sum(f[m == u].mean(0) for u in np.unique(m))
    return ids, out / np.sqrt(np.sum(out ** 2, -1, keepdims=True))


def test_template_features_media_average_then_template_sum():
    g = np.random.default_rng(0)
    feats = g.standard_normal((40, 5))
    templates = g.integers(0, 6, 40)
    medias = g.integers(0, 3, 40) + 10 * templates  # some medias with several images
    ids, tf = V.template_features(feats, templates, medias)
    rid, rtf = _ref_templates(feats, templates, medias)
    np.testing.assert_array_equal(ids.numpy(), rid)
    np.testing.assert_allclose(tf.numpy(), rtf, rtol=0, atol=1e-12)
    # faceness scales each image first
    s = g.random(40)
    _, tf2 = V.template_features(feats, templates, medias, faceness=s)
    np.testing.assert_allclose(tf2.numpy(), _ref_templates(feats * s[:, None], templates, medias)[1], atol=1e-12)
    sc = V.pair_scores(ids, tf, [int(rid[0]), int(rid[1])], [int(rid[2]), int(rid[0])])
    np.testing.assert_allclose(sc.numpy(), [rtf[0] @ rtf[2], rtf[1] @ rtf[0]], atol=1e-12)
    with pytest.raises(ValueError, match="p2 names template 999"):
        V.pair_scores(ids, tf, [int(rid[0])], [999])


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_far_nearest_is_their_convention_and_at_most_the_librarys(seed):
    g = np.random.default_rng(seed)
    n = 3000
    y = g.random(n) < 0.3
    s = np.round(g.standard_normal(n) + 2 * y, 1)  # rounded: ties and collinear runs sklearn drops
    fars = [1e-3, 1e-2, 0.05, 0.1, 0.5]
    got = V.tar_at_far(torch.from_numpy(s), y, fars)
    fpr, tpr, _ = roc_curve(y, s)
    their = [tpr[min(zip(abs(fpr - f), range(len(fpr))))[1]] for f in fars]
    np.testing.assert_array_equal(got["nearest"], their)
    np.testing.assert_array_equal(got["at_most"], M.tar_at_far(s, y, fars))


def _ref_identification(q, qi, g, gi, fars):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = q @ g.T
    mask = np.array([list(gi).index(i) for i in qi])
    top = np.argsort(-sim, kind="stable")
    res = {f"top{k}": float(np.mean([mask[i] in top[i, :k] for i in range(len(q))])) for k in (1, 5, 10)}
    need = [math.ceil(len(q) * f) for f in fars]
    pos = sim[np.arange(len(q)), mask].copy()
    sim[np.arange(len(q)), mask] = -2.0
    neg = heapq.nlargest(max(need), sim[sim > -2.0])
    res["tpir"] = [float(np.sum(pos > neg[m - 1]) / len(q)) for m in need]
    return res


def test_identification_matches_a_dense_reference():
    g = np.random.default_rng(1)
    G, D = 30, 8
    gallery = g.standard_normal((G, D))
    gids = g.permutation(100)[:G]
    pick = g.integers(0, G, 50)
    probes = gallery[pick] + 0.9 * g.standard_normal((50, D))
    out = V.identification(probes, gids[pick], gallery, gids, fpirs=(0.01, 0.1, 0.3))
    ref = _ref_identification(probes, gids[pick], gallery, gids, (0.01, 0.1, 0.3))
    for k in ("top1", "top5", "top10"):
        assert out[k] == ref[k]
    np.testing.assert_array_equal(out["tpir"], ref["tpir"])
    assert 0 < out["top1"] <= out["top5"] <= out["top10"] <= 1
    with pytest.raises(ValueError, match="not in the gallery"):
        V.identification(probes, np.full(50, 1000), gallery, gids)
    with pytest.raises(ValueError, match="unique"):
        V.identification(probes, gids[pick], gallery, np.zeros(G, dtype=np.int64))


def test_identification_ties_on_axis_vectors():
    """Cosines of axis vectors are exactly 0 or 1 in any arithmetic: a mated score equal to the threshold
    is not above it (their strict >), and equal scores rank the lower gallery index first."""
    gallery, gids = np.eye(4), np.array([10, 11, 12, 13])
    probes, pids = np.eye(4)[[0, 0, 2]], np.array([10, 11, 12])  # probe 1's mate (e1) scores 0, e0 scores 1
    out = V.identification(probes, pids, gallery, gids, ks=(1, 2), fpirs=(0.5,))
    assert out["thresholds"][0] == 0.0 and out["tpir"][0] == pytest.approx(2 / 3)
    assert out["top1"] == pytest.approx(2 / 3) and out["top2"] == 1.0  # probe 1: e0 first, e1 (lower index) next
    ref = _ref_identification(probes, pids, gallery, gids, (0.5,))
    assert out["tpir"][0] == ref["tpir"][0] and out["top1"] == ref["top1"]


def test_tar_at_far_nearest_reads_only_the_points_sklearn_keeps():
    """One genuine and one impostor pair at each of 100 scores: a straight ROC whose middle points sklearn
    drops, so their nearest point to FAR 0.3 is an end of the segment, not the point at 0.3."""
    s = np.repeat(np.arange(100.0), 2)
    y = np.tile([True, False], 100)
    got = V.tar_at_far(s, y, [0.3])
    fpr, tpr, _ = roc_curve(y, s)
    assert len(fpr) == 3
    assert got["nearest"][0] == tpr[np.argmin(np.abs(fpr - 0.3))] == 0.01
    assert got["at_most"][0] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------
def test_callback_runs_every_n_steps_on_rank_0_and_logs(tmp_path):
    torch.manual_seed(0)
    imgs = _images(40, seed=3)
    same = torch.arange(20) % 2 == 0
    V.write_bin(tmp_path / "lfw.bin", imgs, same, format="PNG")
    lines = []
    cb = V.VerificationCallback({"lfw": tmp_path / "lfw.bin"}, every=2, batch_size=8, nfolds=5, log=lines.append)
    net = _Net()
    assert cb(1, net) is None and lines == []
    r = cb(2, net)
    assert set(r) == {"lfw"} and len(lines) == 1 and lines[0].startswith("[lfw][2] XNorm:")
    emb = V.embed_pairs(net, imgs, batch_size=8)
    assert r["lfw"]["accuracy"] == V.evaluate_pairs(emb.embeddings, same, nfolds=5, normalize=False)["accuracy"]
    assert r["lfw"]["highest_accuracy"] >= r["lfw"]["accuracy"]
    other = V.VerificationCallback({"lfw": tmp_path / "missing.bin"}, every=2, rank=1)  # reads nothing
    assert other(2, net) is None
    with pytest.raises(ValueError, match="every"):
        V.VerificationCallback({}, every=0)
