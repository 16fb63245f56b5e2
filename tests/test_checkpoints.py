"""l2sm_kernels.compat.checkpoints and the reshard CLI: arcface_torch's three per-rank head forms read at
any world size into this library's modules, written back in their layout, and every malformed set
refused with an error naming the file. The resume test: a checkpoint written by 2 gloo ranks gives the
same loss at world size 1 (the compat head and L2SoftmaxLoss) and 3 (the compat head and
ClassParallelL2SoftmaxLoss)."""
import os

import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.compat import arcface_torch as AT
from l2sm_kernels.compat import checkpoints as CK
from l2sm_kernels.compat.arcface_torch import CombinedMarginLoss, PartialFC_V2
from l2sm_kernels.compat.reshard import main as reshard_main
from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss

from spawned import Pool

C, D = 23, 8


def _full(seed=0, n=C):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", sorted(CK.FORMS))
@pytest.mark.parametrize("world", [1, 2, 5])
def test_round_trip_any_world_size(tmp_path, form, world):
    w = _full()
    paths = CK.save_shards(w, str(tmp_path / "a"), world, form)
    assert [os.path.basename(p) for p in paths] == [CK.FORMS[form].format(rank=r) for r in range(world)]
    sizes = [n for _, n in CK.shard_layout(C, world)]
    first = torch.load(paths[0], weights_only=True)  # their structure, as their code reads it
    first = {"raw": lambda v: v, "state_dict": lambda v: v["weight"],
             "checkpoint": lambda v: v["state_dict_softmax_fc"]["weight"]}[form](first)
    assert torch.equal(first, w[: sizes[0]])
    ck = CK.find_checkpoint(str(tmp_path / "a"))
    assert (ck.form, ck.world_size, ck.num_classes, ck.embedding_size, ck.sizes) == (form, world, C, D, sizes)
    # into the compat head (world size 1 here), a single-process module, and another world size
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    CK.load_into(head, str(tmp_path / "a"))
    assert torch.equal(head.weight, w)
    module = L.ArcFaceLoss(D, C)
    CK.load_into(module, ck)
    assert torch.equal(module.weight, w)
    CK.reshard(str(tmp_path / "a"), str(tmp_path / "b"), 3)
    assert torch.equal(CK.read_rows(CK.find_checkpoint(str(tmp_path / "b")), 0, C), w)
    assert torch.equal(CK.read_rows(ck, 5, 17), w[5:17])


def test_their_files_load_unchanged(tmp_path):
    """Files as their code writes them: torch.save(module.state_dict()) / torch.save(dict(...))."""
    w = _full(1)
    for r, (start, n) in enumerate(CK.shard_layout(C, 2)):
        fc = torch.nn.Module()
        fc.weight = torch.nn.Parameter(w[start: start + n].clone())
        torch.save({"epoch": 3, "global_step": 70, "state_dict_backbone": {"fc.weight": torch.ones(2, 2)},
                    "state_dict_softmax_fc": fc.state_dict(), "state_optimizer": {}, "state_lr_scheduler": {}},
                   tmp_path / f"checkpoint_gpu_{r}.pt")
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    CK.load_into(head, str(tmp_path))
    assert torch.equal(head.weight, w)


def test_training_state_is_resharded(tmp_path):
    """checkpoint_gpu files: epoch, step, backbone and scheduler from rank 0; the head's SGD momentum
    (their optimizer: the head's weight alone in the last param group) re-split with the weight."""
    w, mom = _full(2), _full(3)
    src = tmp_path / "src"
    src.mkdir()
    for r, (start, n) in enumerate(CK.shard_layout(C, 2)):
        backbone = torch.nn.Linear(3, 2)
        head_w = torch.nn.Parameter(w[start: start + n].clone())
        opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": [head_w]}], lr=0.1, momentum=0.9)
        (backbone.weight.sum() + head_w.sum()).backward()
        opt.step()
        opt.state[head_w]["momentum_buffer"].copy_(mom[start: start + n])
        with torch.no_grad():
            head_w.copy_(w[start: start + n])
        torch.save({"epoch": 1, "global_step": 9, "state_dict_backbone": backbone.state_dict(),
                    "state_dict_softmax_fc": {"weight": head_w.detach()}, "state_optimizer": opt.state_dict(),
                    "state_lr_scheduler": {"last_epoch": 9}}, src / f"checkpoint_gpu_{r}.pt")
    CK.reshard(str(src), str(tmp_path / "dst"), 3)
    for r, (start, n) in enumerate(CK.shard_layout(C, 3)):
        st = torch.load(tmp_path / "dst" / f"checkpoint_gpu_{r}.pt", weights_only=True)
        assert (st["epoch"], st["global_step"], st["state_lr_scheduler"]) == (1, 9, {"last_epoch": 9})
        assert torch.equal(st["state_dict_softmax_fc"]["weight"], w[start: start + n])
        assert torch.equal(st["state_optimizer"]["state"][2]["momentum_buffer"], mom[start: start + n])
        assert st["state_optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)  # the backbone's, as it was


def test_raw_momentum_files_reshard(tmp_path):
    w, mom = _full(4), _full(5)
    CK.save_shards(w, str(tmp_path / "a"), 2, "raw", momentum=mom)
    CK.reshard(str(tmp_path / "a"), str(tmp_path / "b"), 4)
    ck = CK.find_checkpoint(str(tmp_path / "b"))
    assert torch.equal(CK.read_rows(ck, 0, C, ck.momentum_files, "raw"), mom)


def test_save_rank(tmp_path):
    w = _full(7)
    module = L.ArcFaceLoss(D, C)
    with torch.no_grad():
        module.weight.copy_(w)
    for form in CK.FORMS:
        CK.save_rank(module, str(tmp_path / form), form)
        head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
        CK.load_into(head, str(tmp_path / form))
        assert torch.equal(head.weight, w)
    with pytest.raises(ValueError, match="only into the 'checkpoint' form"):
        CK.save_rank(module, str(tmp_path / "x"), "raw", epoch=1)


def _bad(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return d


def test_refusals_name_the_file(tmp_path):
    w = _full()
    # a missing rank
    d = _bad(tmp_path, "missing")
    CK.save_shards(w, str(d), 3)
    os.remove(d / "softmax_fc_gpu_1.pt")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_1.pt: missing"):
        CK.find_checkpoint(str(d))
    # a shard of another width
    d = _bad(tmp_path, "width")
    CK.save_shards(w, str(d), 2)
    torch.save({"weight": torch.zeros(11, D + 1)}, d / "softmax_fc_gpu_1.pt")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_1.pt: shard of shape"):
        CK.find_checkpoint(str(d))
    # sizes that are not their layout
    d = _bad(tmp_path, "layout")
    torch.save({"weight": w[:10]}, d / "softmax_fc_gpu_0.pt")
    torch.save({"weight": w[10:]}, d / "softmax_fc_gpu_1.pt")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt: 10 classes"):
        CK.find_checkpoint(str(d))
    # a state_dict of another model
    d = _bad(tmp_path, "other")
    torch.save({"weight": w, "bias": torch.zeros(C)}, d / "softmax_fc_gpu_0.pt")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt: a state_dict with more"):
        CK.find_checkpoint(str(d))
    d = _bad(tmp_path, "notrain")
    torch.save({"state_dict_backbone": {"weight": w}}, d / "checkpoint_gpu_0.pt")
    with pytest.raises(CK.CheckpointError, match="checkpoint_gpu_0.pt: not an arcface_torch training checkpoint"):
        CK.find_checkpoint(str(d))
    # another model's class count, embedding size, sub-centers
    d = _bad(tmp_path, "count")
    CK.save_shards(w, str(d), 2)
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt .*23 classes.*has 24"):
        CK.load_into(PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C + 1), str(d))
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt: embedding size 8"):
        CK.load_into(L.ArcFaceLoss(D * 2, C), str(d))
    with pytest.raises(ValueError, match="subcenters=3"):
        CK.load_into(L.ArcFaceLoss(D, C, subcenters=3), str(d))
    # not a torch file
    d = _bad(tmp_path, "garbage")
    (d / "softmax_fc_gpu_0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt: cannot be read"):
        CK.find_checkpoint(str(d))


class _Evil:
    """Unpickling it would create a marker file (any code could run there)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    d = _bad(tmp_path, "evil")
    torch.save({"weight": torch.zeros(C, D), "x": _Evil(str(marker))}, d / "softmax_fc_gpu_0.pt")
    with pytest.raises(CK.CheckpointError, match="softmax_fc_gpu_0.pt: refused by torch.load\\(weights_only=True\\)"):
        CK.find_checkpoint(str(d))
    assert not marker.exists()


def test_cli(tmp_path, capsys):
    w = _full(6)
    CK.save_shards(w, str(tmp_path / "a"), 2, "checkpoint")
    assert reshard_main([str(tmp_path / "a"), str(tmp_path / "b"), "--world-size", "3", "--out-form", "raw",
                         "--num-classes", str(C)]) == 0
    assert "23 classes x 8 (checkpoint, 2 files) -> 3 files" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "b" / "rank:2_softmax_weight.pt", weights_only=True), w[16:])
    assert reshard_main([str(tmp_path / "a"), str(tmp_path / "c"), "--world-size", "2", "--num-classes", "24"]) == 2
    assert "checkpoint_gpu_0.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# resume at another world size (gloo processes, the harness of test_class_parallel.py)
# ---------------------------------------------------------------------------------------------
B_GLOBAL = 6
MARGIN = (1.0, 0.5, 0.0)


def _batch():
    g = torch.Generator().manual_seed(9)
    return torch.randn(B_GLOBAL, D, generator=g), torch.randint(0, C, (B_GLOBAL,), generator=g)


def _rows(rank, world):
    b = B_GLOBAL // world
    return slice(rank * b, (rank + 1) * b)


def _work_save(rank, world, directory):
    """Train two steps at world size 2 from their init, save checkpoint_gpu_{rank}.pt as their
    train_v2 does, and the loss of a fixed batch with the saved weights."""
    torch.manual_seed(100 + rank)
    head = PartialFC_V2(CombinedMarginLoss(64, *MARGIN), D, C)
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(4 * world, D, generator=g), torch.randint(0, C, (4 * world,), generator=g)
        loss = head(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"epoch": 0, "global_step": 2, "state_dict_backbone": {}, "state_dict_softmax_fc": head.state_dict(),
                "state_optimizer": opt.state_dict(), "state_lr_scheduler": {}},
               os.path.join(directory, f"checkpoint_gpu_{rank}.pt"))
    x, y = _batch()
    with torch.no_grad():
        loss = head(x[_rows(rank, world)], y[_rows(rank, world)])
    if rank == 0:
        torch.save(loss, os.path.join(directory, "loss_world2.pt"))


def _work_resume(rank, world, directory):
    x, y = _batch()
    want = torch.load(os.path.join(directory, "loss_world2.pt"), weights_only=True)
    head = PartialFC_V2(CombinedMarginLoss(64, *MARGIN), D, C)
    CK.load_into(head, directory)
    cp = ClassParallelL2SoftmaxLoss(D, C, alpha=64.0, normalize_weight=True, margin_type="combined",
                                                  margin=MARGIN, margin_grad="detached", seed=0)
    CK.load_into(cp, directory)
    with torch.no_grad():
        torch.testing.assert_close(head(x[_rows(rank, world)], y[_rows(rank, world)]), want, rtol=2e-6, atol=2e-6)
        cp.reduction = "none"
        torch.testing.assert_close(_their_mean(cp(x[_rows(rank, world)], y[_rows(rank, world)])), want,
                                   rtol=2e-6, atol=2e-6)
    # each rank writes its own file of the class-parallel module: 3 files of their layout
    CK.save_rank(cp, os.path.join(directory, "world3"), "checkpoint", epoch=0, global_step=2)


def _their_mean(rows):
    """Their loss value from per-row losses: the mean of min(row, -log(1e-30)) (their p_y clamp; rows
    above it occur at s = 64 with the margin early in training)."""
    return rows.clamp_max(AT.LOSS_CAP).mean()


_POOL = Pool()


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    _POOL.close()


def test_resume_at_another_world_size(tmp_path):
    _POOL.spawn(_work_save, 2, str(tmp_path))
    _POOL.spawn(_work_resume, 3, str(tmp_path))
    x, y = _batch()
    want = torch.load(tmp_path / "loss_world2.pt", weights_only=True)
    head = PartialFC_V2(CombinedMarginLoss(64, *MARGIN), D, C)
    CK.load_into(head, str(tmp_path))
    module = L.CombinedMarginLoss(D, C, *MARGIN, s=64.0, margin_grad="detached", reduction="none")
    CK.load_into(module, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(head(x, y), want, rtol=2e-6, atol=2e-6)
        rows = module(x, y)
        torch.testing.assert_close(_their_mean(rows), want, rtol=2e-6, atol=2e-6)
    assert float(rows.max()) > AT.LOSS_CAP  # the cap matters in this example
    ck3 = CK.find_checkpoint(str(tmp_path / "world3"))
    assert (ck3.form, ck3.sizes) == ("checkpoint", [8, 8, 7])
    assert torch.equal(CK.read_rows(ck3, 0, C), head.weight)
